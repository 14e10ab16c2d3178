"""BENCHMARKS.md from the measurements: the conditions they were taken in,
the targets table, each section's own tables, then bench/NOTES.md."""
import os

from bench.common import check_targets, table


def target_rows(results, sections):
    """The targets of every section that ran without error, in report order."""
    return [row for name, section in sections.items()
            if name in results and "error" not in results[name]
            for row in check_targets(section.TARGETS, results[name])]


def conditions(results, meta):
    kind = "QUICK smoke run: sizes too small to mean anything" if meta["quick"] else "full run"
    sections = ", ".join(f"{k} {v['load_1min'][0]:.1f} → {v['load_1min'][1]:.1f} ({v['section_seconds']:.0f} s)"
                         for k, v in results.items() if isinstance(v, dict) and "load_1min" in v)
    return [
        "# Benchmarks\n",
        f"Written by `{meta['command']}` ({kind}).\n",
        "## Conditions\n",
        f"- date: {meta['date']}; commit {meta['commit']}; wall time {meta['wall_seconds']:.0f} s",
        f"- machine: {meta['cpu']}, {meta['cores']} cores, {meta['memory_gb']:.0f} GB; torch {meta['torch']} "
        f"({meta['torch_threads']} threads), numpy {meta['numpy']}, Python {meta['python']}",
        f"- load average (1/5/15 min) at start {meta['load_start']}, at end {meta['load_end']} (the benchmark "
        f"itself accounts for about {meta['torch_threads']}; more means other processes shared the cores)",
        f"- 1-minute load average at the start → end of each section: {sections}",
        "- fp32 everywhere except the extraction modes named bf16; no GPU",
        "- every figure: median [min–max] of the repeats; ratios are taken within a round "
        "(contenders run back to back), then summarised",
        *(f"- section {name} comes from another run (`--merge`): {m['date']}, commit {m['commit']}, {m['cpu']}"
          + (", QUICK sizes" if m.get("quick") else "")
          for name, m in ((k, v.get("measured")) for k, v in results.items() if isinstance(v, dict))
          if m and m["date"] != meta["date"]),
        "",
    ]


def markdown(results, sections, notes_path=None):
    """The report as one string; sections: name -> module (TARGETS, render), in report order."""
    meta = results["meta"]
    lines = conditions(results, meta)
    lines.append("## Targets\n")
    lines += table(("figure", "measured", "target", "met"), [
        (row["figure"], row["measured"], row["target"], "yes" if row["met"] else "NO — " + row["shortfall"])
        for row in target_rows(results, sections)]) + [""]
    errors = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v}
    if errors:
        lines.append("## Sections that failed\n")
        lines += [f"- **{k}**: `{e.splitlines()[-1] if e else e}`" for k, e in errors.items()]
        lines.append("")
    for name, section in sections.items():
        if name in results and "error" not in results[name]:
            lines += section.render(results[name], meta)
    if notes_path and os.path.isfile(notes_path):
        with open(notes_path) as f:
            lines.append(f.read().rstrip() + "\n")
    return "\n".join(lines)
