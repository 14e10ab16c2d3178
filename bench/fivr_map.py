"""FIVR-200K mAP: `evaluation.py --dataset FIVR-200K --similarities sims.npz`
on a full 100 x 225,960 matrix with the real fivr.pickle (and S2VS's easy
duplicates: every key, mAP and µAP, normal and hard), against ViSiL's
evaluator (a Python sort of a dict per query and task) and an S2VS-style
evaluator of the same twelve keys (Python loops over each query's dict, one
argsort per list), both timed on a few queries."""
import os
import subprocess
import sys

import numpy as np

from bench.common import Target, fmt, interleaved, per_round, summary, table
from data import DATASETS_DIR, FIVR, load_benchmark
from retrieval import save_similarities

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"full": dict(queries=100, database=None, baseline_queries=4, repeats=3),
         "quick": dict(queries=10, database=20_000, baseline_queries=2, repeats=1)}
TARGETS = (
    Target("FIVR-200K every key (mAP, µAP; normal, hard), `evaluation.py --similarities` "
           "({matrix_shape[0]} × {matrix_shape[1]:,})", ("cli_seconds",), 2.5, "< 2.5 s", higher_is_better=False),
)


def visil_fivr_map(annotation, similarities, all_db):
    """ViSiL's FIVR evaluator (MKLab-ITI/visil, datasets/__init__.py,
    FIVR.calculate_mAP): for every query and task, sort the query's
    {video: score} dict and walk it. Returns task -> mean AP."""
    result = {}
    for task, labels in FIVR.TASKS.items():
        aps = []
        for query, res in similarities.items():
            gt_sets = annotation[query]
            query_gt = {v for label in labels for v in gt_sets.get(label, ())} & all_db
            hits, ranked, total = 0.0, 0, 0.0
            for video in sorted(res.keys(), key=lambda x: res[x], reverse=True):
                if video != query and video in all_db:
                    ranked += 1
                    if video in query_gt:
                        hits += 1.0
                        total += hits / ranked
            aps.append(total / len(query_gt))
        result[task] = float(np.mean(aps))
    return result


def s2vs_fivr_keys(annotation, similarities, all_db, easy):
    """An S2VS-style evaluator (gkordo/s2vs, datasets/fivr.py, FIVR.evaluate)
    of our twelve keys: for the database with and without the easy duplicates,
    per query and task a walk over the query's {video: score} dict and an
    argsort (mAP), per task the pooled lists of every query's pairs and one
    argsort (µAP). One walk serves both (S2VS walks twice), which flatters
    it. Unlike S2VS, a query labelled relevant to itself stays in its
    relevant set, as in our protocol. Returns key -> value."""
    def metric(y_true, y_score, num_relevant):  # S2VS's calculate_metric
        y_true = np.array(y_true)[np.argsort(y_score)[::-1]]
        return np.sum(np.cumsum(y_true) / (np.arange(len(y_true)) + 1) * y_true / num_relevant)

    result = {}
    for database, suffix in ((all_db, ""), (all_db - easy, "_hard")):
        for task, labels in FIVR.TASKS.items():
            aps, pool_true, pool_score, pool_relevant = [], [], [], 0
            for query, targets in similarities.items():
                query_gt = {v for label in labels for v in annotation[query].get(label, ())} & database
                y_true, y_score = [], []
                for target, score in targets.items():
                    if target != query and target in database:
                        y_true.append(int(target in query_gt))
                        y_score.append(score)
                if query_gt:
                    aps.append(metric(y_true, y_score, len(query_gt)))
                pool_true += y_true
                pool_score += y_score
                pool_relevant += len(query_gt)
            result[task + suffix] = float(np.mean(aps))
            result[task.replace("R", "D") + suffix] = float(metric(pool_true, pool_score, pool_relevant))
    return result


def find_annotation_dir(given):
    """--annotation_dir, else $TCA_ANNOTATION_DIR, else the repository's datasets/ (which ships fivr.pickle)."""
    return given or os.environ.get("TCA_ANNOTATION_DIR") or DATASETS_DIR


def fivr_similarities(benchmark, num_queries, num_database, seed=5):
    """Scores for the real FIVR-200K ids: uniform noise, raised for each
    query's annotated videos (the more related the label, the higher), so the
    APs are neither 0 nor 1."""
    rng = np.random.default_rng(seed)
    queries = benchmark.queries[:num_queries]
    database = benchmark.database
    if num_database is not None and num_database < len(database):
        # a random subset that keeps the queries' annotated videos
        annotated = {v for q in queries for vs in benchmark.annotation.get(q, {}).values() for v in vs}
        keep = set(rng.choice(len(database), num_database, replace=False).tolist())
        database = [v for j, v in enumerate(database) if j in keep or v in annotated]
    column_of = {v: j for j, v in enumerate(database)}
    similarities = rng.random((len(queries), len(database)), dtype=np.float32) * 0.6
    boost = {"ND": 0.4, "DS": 0.3, "CS": 0.2, "IS": 0.1}
    for i, q in enumerate(queries):
        for label, videos in benchmark.annotation.get(q, {}).items():
            columns = [column_of[v] for v in videos if v in column_of]
            similarities[i, columns] += boost.get(label, 0.0) * rng.random(len(columns), dtype=np.float32)
    return queries, database, similarities


def parse_table(stdout):
    """The DSVR/CSVR/ISVR values of evaluation.py's printed table."""
    lines = stdout.splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.split() == list(FIVR.TASKS):
            return dict(zip(FIVR.TASKS, map(float, lines[i + 1].split())))
    raise RuntimeError(f"evaluation.py printed no FIVR table:\n{stdout[-2000:]}")


def run(size, annotation_dir, workdir):
    annotation_dir = find_annotation_dir(annotation_dir)
    benchmark = load_benchmark("FIVR-200K", annotation_dir)
    queries, database, similarities = fivr_similarities(benchmark, size["queries"], size["database"])
    path = os.path.join(workdir, "sims.npz")
    save_similarities(path, queries, database, similarities)
    command = [sys.executable, "evaluation.py", "--dataset", "FIVR-200K", "--similarities", path,
               "--annotation_dir", annotation_dir]
    printed = {}

    def run_cli():
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-2000:]}")
        printed.update(parse_table(proc.stdout))

    def run_in_process():
        return benchmark.evaluate(queries, database, similarities, log=lambda *_: None)

    seconds = interleaved({"cli": run_cli, "in_process": run_in_process}, size["repeats"], size["warmup"])

    # ViSiL's evaluator on a few queries, extrapolated linearly to all of them
    # (its cost is one sort per query and task). Its input is the {query:
    # {video: score}} dict a result JSON loads into; building it is not timed.
    n = size["baseline_queries"]
    results = {q: dict(zip(database, map(float, similarities[i]))) for i, q in enumerate(queries[:n])}
    all_db = set(database)
    baseline = interleaved({"visil": lambda: visil_fivr_map(benchmark.annotation, results, all_db)},
                           size["repeats"], warmup=0)["visil"]
    visil = visil_fivr_map(benchmark.annotation, results, all_db)
    ours = benchmark.evaluate(queries[:n], database, similarities[:n], log=lambda *_: None)
    extrapolated = [s * len(queries) / n for s in baseline]
    # the S2VS-style evaluator of every key, likewise (its pooled argsort grows
    # a little faster than linearly, so the extrapolation flatters it)
    easy = benchmark.easy_duplicates or set()
    s2vs_rounds = interleaved({"s2vs": lambda: s2vs_fivr_keys(benchmark.annotation, results, all_db, easy)},
                              size["repeats"], warmup=0)["s2vs"]
    s2vs = s2vs_fivr_keys(benchmark.annotation, results, all_db, easy)
    s2vs_extrapolated = [s * len(queries) / n for s in s2vs_rounds]
    keys = list(ours)
    return {
        "config": size | {"database": len(database), "annotation_dir": os.path.relpath(annotation_dir, REPO),
                          "command": "python evaluation.py --dataset FIVR-200K --similarities sims.npz "
                                     f"--annotation_dir {os.path.relpath(annotation_dir, REPO)}"},
        "matrix_shape": list(similarities.shape),
        "cli_seconds": summary(seconds["cli"], "s"),
        "in_process_seconds": summary(seconds["in_process"], "s"),
        "visil_seconds_extrapolated": summary(extrapolated, "s"),
        "visil_seconds_per_query": summary([s / n for s in baseline], "s"),
        "speedup_cli": summary(per_round(lambda b, c: b / c, extrapolated, seconds["cli"]), "x"),
        "speedup_in_process": summary(per_round(lambda b, c: b / c, extrapolated, seconds["in_process"]), "x"),
        "mAP": printed,
        "max_abs_diff_vs_visil": max(abs(ours[t] - visil[t]) for t in FIVR.TASKS),
        "keys": keys,
        "s2vs_seconds_extrapolated": summary(s2vs_extrapolated, "s"),
        "s2vs_seconds_per_query": summary([s / n for s in s2vs_rounds], "s"),
        "speedup_cli_vs_s2vs": summary(per_round(lambda b, c: b / c, s2vs_extrapolated, seconds["cli"]), "x"),
        "max_abs_diff_vs_s2vs": max(abs(ours[k] - s2vs[k]) for k in s2vs),
    }


def render(result, meta):
    c = result["config"]
    rows, columns = result["matrix_shape"]
    return ["## FIVR-200K mAP\n",
            f"A {rows} × {columns:,} float32 similarity matrix for the real FIVR-200K ids (synthetic scores) in a "
            f"`.npz`, evaluated by `{c['command']}` (wall time of the whole process: interpreter start, annotation "
            f"and matrix loading, every key: {', '.join(result.get('keys', FIVR.TASKS))}).\n",
            *table(("", "seconds"), [
                ("`evaluation.py` command", fmt(result["cli_seconds"])),
                ("`FIVR.evaluate` in process (annotation already loaded)", fmt(result["in_process_seconds"])),
                (f"ViSiL-style evaluator (dict sort per query and task), extrapolated from {c['baseline_queries']} "
                 f"queries ({fmt(result['visil_seconds_per_query'])} per query)",
                 fmt(result["visil_seconds_extrapolated"])),
                *([(f"S2VS-style evaluator of every key (Python loops, one argsort per list), extrapolated from "
                    f"{c['baseline_queries']} queries ({fmt(result['s2vs_seconds_per_query'])} per query)",
                    fmt(result["s2vs_seconds_extrapolated"]))] if "s2vs_seconds_extrapolated" in result else [])]),
            f"\nSpeed-up over the ViSiL-style evaluator: in process **{fmt(result['speedup_in_process'])}**; "
            f"the whole command, start-up and loading included (which the ViSiL figure leaves out), "
            f"{fmt(result['speedup_cli'])}. Same mAP on the timed queries: max |difference| "
            f"{result['max_abs_diff_vs_visil']:.1e}. mAP printed: "
            + ", ".join(f"{k} {v:.4f}" for k, v in result["mAP"].items()) + ".\n",
            *([f"Every key against the S2VS-style evaluator: the command is **{fmt(result['speedup_cli_vs_s2vs'])}** "
               f"faster, start-up included; same values on the timed queries: max |difference| "
               f"{result['max_abs_diff_vs_s2vs']:.1e} (equal scores may rank apart: its argsort is not stable).\n"]
              if "s2vs_seconds_extrapolated" in result else [])]
