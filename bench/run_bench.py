"""Speed of the TCA reimplementation on the machine it runs on, against the
naive way of doing the same job and against the machine's own limit.

    python bench/run_bench.py --out BENCHMARKS.md --json bench/results.json   (make bench, ~5 min on 2 cores)
    python bench/run_bench.py --quick --out /tmp/B.md --json /tmp/b.json   (smoke run, under a minute)
    python bench/run_bench.py --render_only --out BENCHMARKS.md --json bench/results.json

Each section is a module of bench/ that measures the project's own functions
against a baseline written there, on purpose naive, as the upstream code
does the job; it holds its problem sizes (SIZES), the targets it is held to
(TARGETS), run() and render():
  peak        fp32 matrix multiply, GFLOP/s: the yardstick of every other figure
  tca         TCA_c video embeddings (model.TCA through retrieval.encode_videos)
              vs upstream's loop: batch size 1, every video padded to 300 frames
  chamfer     similarity.chamfer_similarity / symmetric_chamfer_similarity vs
              a per-pair loop (upstream's `chamfer`, one matrix product per pair)
  retrieval   FIVR-200K scale: 100 queries x 225,960 embeddings, cosine + top-100
  index       (index.py) search.py's first stage at 10^6 videos: exact FAISS
              search (one process, and 2 shards) vs IVF-PQ (fast-scan and
              8-bit) and IVF-SQ8 on synthetic clustered / isotropic collections
              with planted copies: speed, bytes/video, copies kept, mAP
  rerank      (rerank.py) search.py's second stage: frame-store reads and
              chamfer for shortlists of 50, 100, 1,000 videos
  shortlist   (shortlist.py) coarse to fine on make demo's benchmark:
              evaluation.py --shortlist K against K (needs make demo's outputs)
  query       (query.py) a 60 s query video file end to end, stage by stage
  map         (fivr_map.py) `evaluation.py --similarities` on a full FIVR-200K
              matrix vs ViSiL's evaluator, timed on a few queries
  train       (training.py) train.py steps on synthetic VCDB-style data,
              1 and 2 Horovod workers
  extraction  pre-processing/extract_features.py pipeline vs the ResNet-50
              forward alone, fp32 / channels_last / bf16
  scaling     evaluation.py under horovodrun (2 ranks vs 1 process), --metric
              all vs one metric and vs three runs, float16 storage, and
              FIVR-200K's hours on paper from the measured per-frame costs

Every figure is the median of several repeats with min and max. Ratios are
taken within one round: each round runs every contender once, back to back,
so a ratio compares them under the same load on a shared machine.
"""
import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

os.environ.setdefault("TQDM_DISABLE", "1")  # the project's progress bars would flood the log

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the project's modules, and bench/ as a package
sys.path.insert(1, os.path.join(REPO, "pre-processing"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import (chamfer, common, extraction, fivr_map, index, peak, query, render, rerank, retrieval,  # noqa: E402
                   scaling, shortlist, tca, training)
from utils import UserError, available_cores, run_main  # noqa: E402

SECTIONS = {"peak": peak, "tca": tca, "chamfer": chamfer, "retrieval": retrieval, "index": index,
            "rerank": rerank, "shortlist": shortlist, "query": query, "map": fivr_map,
            "train": training, "extraction": extraction, "scaling": scaling}  # in the report's order


def get_args_parser():
    parser = argparse.ArgumentParser(description="Measure the project's speed and write BENCHMARKS.md + JSON.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="BENCHMARKS.md", help="Markdown report to write")
    parser.add_argument("--json", default="bench/results.json", help="JSON file of every measurement")
    parser.add_argument("--quick", action="store_true",
                        help="Tiny problem sizes: a smoke run that checks every section works (numbers meaningless)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"Comma-separated sections to run, of: {', '.join(SECTIONS)}")
    parser.add_argument("--annotation_dir", default=None,
                        help="Directory holding fivr.pickle for the map section (default: $TCA_ANNOTATION_DIR, "
                             "else the repository's datasets/, which ships it)")
    parser.add_argument("--resnet_weights", default=None,
                        help="Local ResNet-50 state dict for the extraction section (default: seeded random "
                             "weights, which run at the same speed; the bf16 deviation is then indicative only)")
    parser.add_argument("--notes", default=os.path.join(REPO, "bench", "NOTES.md"),
                        help="Hand-written analysis appended to the report ('' for none)")
    parser.add_argument("--merge", action="store_true",
                        help="Keep the other sections' measurements already in --json (each says when, at which "
                             "commit and on which CPU it was measured) and replace only those of --sections")
    parser.add_argument("--render_only", action="store_true",
                        help="Measure nothing: rewrite --out from the measurements already in --json "
                             "(e.g. after editing --notes or a section's render); the report says which size "
                             "they were measured at")
    return parser


def machine_info():
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory_gb = float("nan")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        if dirty:  # name them: other people's work in progress may be what was measured
            commit += " with uncommitted changes to " + ", ".join(line.split(maxsplit=1)[1]
                                                                  for line in dirty.splitlines())
    except OSError:
        commit = "unknown"
    return {"cpu": cpu, "cores": available_cores(), "memory_gb": memory_gb, "commit": commit,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "numpy": np.__version__,
            "python": platform.python_version()}


def measure(names, sizes, args):
    """Run the sections `names`; a section that fails is recorded with its
    traceback and the others still run."""
    peak_yardstick = common.peak_contender(sizes["peak"]["n"], sizes["peak"]["matmuls"])
    workdir = tempfile.mkdtemp(prefix="tca_bench_")
    calls = {  # what each section needs besides its size
        "peak": peak.run,
        "tca": lambda size: tca.run(size, peak_yardstick),
        "chamfer": lambda size: chamfer.run(size, peak_yardstick),
        "retrieval": lambda size: retrieval.run(size, peak_yardstick),
        "index": index.run,
        "rerank": rerank.run,
        "shortlist": shortlist.run,
        "query": query.run,
        "map": lambda size: fivr_map.run(size, args.annotation_dir, workdir),
        "train": lambda size: training.run(size, workdir),
        "extraction": lambda size: extraction.run(size, args.resnet_weights),
        "scaling": lambda size: scaling.run(size, workdir, results),  # after extraction: its rates
    }
    results = {}
    try:
        for name in names:
            print(f"[bench] {name} ...", flush=True)
            start, load = time.perf_counter(), os.getloadavg()[0]
            try:
                results[name] = calls[name](sizes[name])
            except UserError:
                raise
            except Exception:  # one broken section must not lose the others' results
                results[name] = {"error": traceback.format_exc()}
                print(results[name]["error"], file=sys.stderr)
            results[name]["section_seconds"] = time.perf_counter() - start
            results[name]["load_1min"] = [load, os.getloadavg()[0]]  # at the section's start and end
            print(f"[bench] {name} done in {results[name]['section_seconds']:.1f} s", flush=True)
            gc.collect()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def write_report(path, results, notes_path):
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(render.markdown(results, SECTIONS, notes_path))


def main():
    args = get_args_parser().parse_args()
    if args.render_only:
        try:
            with open(args.json) as f:
                results = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{args.json}: cannot read measurements ({e})") from None
        write_report(args.out, results, args.notes)
        print(f"wrote {args.out} from {args.json}")
        return
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        raise UserError(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    kind = "quick" if args.quick else "full"
    # warm-up rounds (not timed) are skipped in the smoke run
    sizes = {name: section.SIZES[kind] | {"warmup": 0 if args.quick else 1} for name, section in SECTIONS.items()}
    meta = machine_info() | {
        "command": " ".join(["python bench/run_bench.py"] + sys.argv[1:]), "quick": args.quick,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_start": " / ".join(f"{x:.2f}" for x in os.getloadavg())}
    started = time.perf_counter()
    results = measure(names, sizes, args)
    for name in names:  # where each section comes from, once sections of several runs share a file (--merge)
        results[name]["measured"] = {k: meta[k] for k in ("date", "commit", "cpu", "quick")}
    if args.merge and os.path.isfile(args.json):
        try:
            with open(args.json) as f:
                earlier = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{args.json}: cannot read the measurements to merge with ({e})") from None
        for name, value in earlier.items():
            if name in SECTIONS and name not in results:
                value.setdefault("measured", {k: earlier["meta"][k] for k in ("date", "commit", "cpu", "quick")})
                results[name] = value
    meta["wall_seconds"] = time.perf_counter() - started
    meta["load_end"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    results["meta"] = meta
    if os.path.dirname(args.json):
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:  # the measurements first: a report that fails to render loses nothing
        json.dump(results, f, indent=1)
    results["targets"] = render.target_rows(results, SECTIONS)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    write_report(args.out, results, args.notes)
    for row in results["targets"]:
        print(f"{'ok  ' if row['met'] else 'MISS'} {row['figure']}: {row['measured']} (target {row['target']})")
    print(f"wrote {args.out} and {args.json} in {meta['wall_seconds']:.0f} s")
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    if failed:
        raise UserError(f"section(s) failed: {', '.join(failed)} (tracebacks in {args.json})")


if __name__ == "__main__":
    run_main(main)
