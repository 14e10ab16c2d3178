"""Chamfer and symmetric chamfer similarity (similarity.py) against a
per-pair loop: upstream's `chamfer`, one matrix product per video pair."""
import torch

from bench.common import Target, fmt, gflops_summary, interleaved, pct, per_round, random_lengths, random_videos, \
    rates_against_peak, summary, table
from similarity import chamfer_similarity, symmetric_chamfer_similarity
from utils import pad_sequences

SIZES = {"full": dict(queries=12, database=120, min_frames=30, max_frames=300, channels=1024, repeats=3),
         "quick": dict(queries=3, database=6, min_frames=5, max_frames=40, channels=256, repeats=2)}
METRICS = (("chamfer", chamfer_similarity, False), ("symmetric_chamfer", symmetric_chamfer_similarity, True))
TARGETS = tuple(Target(f"{name} GFLOP/s / matmul peak", (name, "project", "fraction_of_peak"), 0.5, "≥ 50%")
                for name, _, _ in METRICS)


def pairwise_chamfer_loop(queries, database, symmetric):
    """Upstream's evaluation: `chamfer(query, target)` (and `chamfer(target,
    query)` for the symmetric metric) called for every pair, one matrix product each."""
    out = torch.zeros(len(queries), len(database))
    for i, q in enumerate(queries):
        for j, d in enumerate(database):
            score = (q @ d.t()).max(dim=1)[0].sum().item() / q.shape[0]
            if symmetric:
                score = (score + (d @ q.t()).max(dim=1)[0].sum().item() / d.shape[0]) / 2
            out[i, j] = score
    return out


def run(size, peak):
    C = size["channels"]
    q_lengths = random_lengths(size["queries"], size["min_frames"], size["max_frames"], seed=2)
    d_lengths = random_lengths(size["database"], size["min_frames"], size["max_frames"], seed=3)
    queries, database = random_videos(q_lengths, C, seed=2), random_videos(d_lengths, C, seed=3)
    q_padded, q_frames = pad_sequences(queries)  # (Q, T, C), (Q,)
    d_padded, d_frames = pad_sequences(database)  # (D, T, C), (D,)
    pairs = float(q_lengths.sum()) * float(d_lengths.sum())
    flops = 2.0 * C * pairs  # the symmetric metric reuses the same products
    peak_run, peak_flops = peak
    result = {"config": size, "frame_pairs": pairs}
    for name, fn, symmetric in METRICS:
        with torch.no_grad():
            max_diff = float((fn(q_padded, q_frames, d_padded, d_frames)
                              - pairwise_chamfer_loop(queries, database, symmetric)).abs().max())
        seconds = interleaved({
            "pair_loop": lambda: pairwise_chamfer_loop(queries, database, symmetric),
            "project": lambda: fn(q_padded, q_frames, d_padded, d_frames),
            "peak": peak_run,
        }, size["repeats"], size["warmup"])
        entry = {"max_abs_diff_vs_loop": max_diff,
                 "peak_gflops": gflops_summary(peak_flops, seconds["peak"])}
        for contender in ("pair_loop", "project"):
            gflops, fraction = rates_against_peak(seconds[contender], flops, seconds["peak"], peak_flops)
            entry[contender] = {"frame_pairs_per_s": summary([pairs / s for s in seconds[contender]], "pairs/s"),
                                "gflops": gflops, "fraction_of_peak": fraction}
        entry["speedup"] = summary(per_round(lambda a, b: a / b, seconds["pair_loop"], seconds["project"]), "x")
        result[name] = entry
    return result


def render(result, meta):
    rows = [(name, label, fmt(result[name][contender]["frame_pairs_per_s"]), fmt(result[name][contender]["gflops"]),
             pct(result[name][contender]["fraction_of_peak"]))
            for name, _, _ in METRICS
            for contender, label in (("pair_loop", "per-pair loop"), ("project", f"`similarity.{name}_similarity`"))]
    c = result["config"]
    lines = ["## Chamfer similarity\n",
             f"{c['queries']} queries × {c['database']} database videos of {c['min_frames']}–{c['max_frames']} "
             f"frames at {c['channels']}-d: {result['frame_pairs']:.3g} frame pairs, 2·C FLOPs each (the symmetric "
             "metric reuses the same products). Baseline: upstream's per-pair `chamfer` (one matrix product per "
             "video pair; twice for the symmetric metric).\n",
             *table(("metric", "contender", "frame pairs/s", "GFLOP/s", "of peak"), rows), ""]
    for name, _, _ in METRICS:
        lines.append(f"- {name}: speed-up over the loop {fmt(result[name]['speedup'])}; max |difference| "
                     f"{result[name]['max_abs_diff_vs_loop']:.1e}; peak in these rounds "
                     f"{fmt(result[name]['peak_gflops'])}")
    lines.append("")
    return lines
