"""What evaluation.py reports beside the measured numbers: the TCA paper's
published rows under them, the precision-recall curves (--pr_curve CSV,
--plot PNG) and the per-query results (--per_query CSV).

Everything here works on data.Evaluation (one per scored metric); pandas and
matplotlib are imported only when their file is written.
"""
import numpy as np

from metrics import RECALL_LEVELS
from utils import atomic_path, save_figure

# The TCA paper's published mAP (Shao et al., "Temporal Context Aggregation for
# Video Retrieval with Contrastive Learning", WACV 2021, arXiv:2008.01334v2):
# the comparison with the state of the art on FIVR-200K (the paper's FIVR-200K
# table; the same rows are on paperswithcode.com). TCA_c = cosine of video
# embeddings, TCA_sym = symmetric chamfer, TCA_f = chamfer of frame
# embeddings. Benchmark -> (queries, database videos) of the real benchmark
# (a custom one in the same format is not the paper's), {method: {key: mAP}}.
# FIVR-5K has no row on purpose: the paper's FIVR-5K numbers are its ablation
# study's, whose settings are not the final configurations' (the authors,
# xwen99/temporal_context_aggregation issue #5, 2021-11-15).
# CC_WEB_VIDEO: the paper's CC_WEB_VIDEO table as copied in the
# sejong-rcv/VVS README (its Table 2; the same rows are in sejong-rcv/TNIP's
# README), cc_web / cc_web* / cc_web_c / cc_web*_c. The sizes are the real
# benchmark's as both annotation files give them (cc_web_video.pickle and
# cc_web_video_tca.pickle list the same 24 queries and 13,115 videos).
# EVVE has no row: the paper's EVVE numbers are in no source readable where
# this was written, and numbers are not guessed.
PAPER = {
    "FIVR-200K": ((100, 225960), {
        "TCA_c": {"DSVR": 0.570, "CSVR": 0.553, "ISVR": 0.473},
        "TCA_sym": {"DSVR": 0.728, "CSVR": 0.698, "ISVR": 0.592},
        "TCA_f": {"DSVR": 0.877, "CSVR": 0.830, "ISVR": 0.703},
    }),
    "CC_WEB_VIDEO": ((24, 13115), {
        # cc_web_star: the TNIP README gives 0.949 here (VVS: 0.947)
        "TCA_c": {"cc_web": 0.973, "cc_web_star": 0.947, "cc_web_c": 0.983, "cc_web_star_c": 0.965},
        "TCA_sym": {"cc_web": 0.982, "cc_web_star": 0.962, "cc_web_c": 0.992, "cc_web_star_c": 0.981},
        "TCA_f": {"cc_web": 0.983, "cc_web_star": 0.969, "cc_web_c": 0.994, "cc_web_star_c": 0.990},
    }),
}


def paper_row(benchmark, method, evaluation):
    """The paper's {key: mAP} for `method` (TCA_c, TCA_sym, TCA_f) on this
    benchmark, or None: not published, not the real benchmark, or a run that
    left out queries or database videos."""
    sizes, rows = PAPER.get(benchmark.name, (None, {}))
    if method not in rows or (len(benchmark.queries), len(benchmark.database)) != sizes:
        return None
    if len(evaluation.queries) != sizes[0] or evaluation.num_database != sizes[1]:
        return None
    return rows[method]


def results_table(benchmark, evaluations, paper_names=None):
    """The run's table: one measured row per metric ({metric: Evaluation});
    with paper_names ({metric: paper method}, model mode), under each measured
    row the paper reports: the paper's row and the difference (measured - paper)."""
    rows = {}
    for metric, evaluation in evaluations.items():
        rows[metric] = evaluation.metrics
        name = (paper_names or {}).get(metric)
        paper = paper_row(benchmark, name, evaluation) if name else None
        if paper:
            rows[f"{name} (paper)"] = paper
            rows[f"{metric} - paper"] = {k: evaluation.metrics[k] - v for k, v in paper.items()}
    if len(rows) == 1:
        return benchmark.table(rows[next(iter(rows))])
    return benchmark.table_rows(rows)


def per_query_rows(evaluation):
    """One dict per (query, mAP key) with a relevant set: query, task, AP,
    num_relevant (the AP's denominator), first_relevant_rank (1-based; NaN
    when none was retrieved)."""
    rows = []
    for task, (hits, k, num_relevant, trapezoid) in evaluation.tasks.items():
        ap = hits.average_precision(num_relevant, trapezoid)[k]
        first = hits.first_rank()[k]
        counts = hits.num_relevant if num_relevant is None else np.reshape(num_relevant, hits.num_relevant.shape)
        rows += [{"query": q, "task": task, "AP": ap[i], "num_relevant": int(counts[k, i]),
                  "first_relevant_rank": first[i]}
                 for i, q in enumerate(evaluation.queries) if counts[k, i] > 0]
    return rows


def precision_recall_curves(evaluation):
    """{mAP key: (21,) interpolated precision at metrics.RECALL_LEVELS}, the
    mean over the queries that have a relevant set, as the official FIVR-200K
    evaluator draws it (its -rl relevant labels are our tasks)."""
    curves = {}
    for task, (hits, k, num_relevant, _) in evaluation.tasks.items():
        per_query = hits.interpolated_precision(num_relevant)[k]  # (Q, 21), NaN rows: no relevant video
        has_relevant = ~np.isnan(per_query[:, 0])
        curves[task] = per_query[has_relevant].mean(0) if has_relevant.any() else np.full(len(RECALL_LEVELS), np.nan)
    return curves


def _runs(evaluations, function):
    """function(evaluation) of each metric, as (metric or None for a lone run, value)."""
    return [(None if len(evaluations) == 1 else metric, function(e)) for metric, e in evaluations.items()]


def write_per_query(path, evaluations):
    import pandas as pd
    frames = [pd.DataFrame(per_query_rows(e)) for e in evaluations.values()]
    for metric, frame in zip(evaluations, frames):
        frame.insert(0, "metric", metric)
    with atomic_path(path) as tmp:
        pd.concat(frames, ignore_index=True).to_csv(tmp, index=False)


def write_pr_curves(path, evaluations):
    """The 21-point curves as a CSV: metric, task, recall, precision."""
    import pandas as pd
    rows = [{"metric": metric, "task": task, "recall": round(recall, 2), "precision": precision}
            for metric, e in evaluations.items()
            for task, curve in precision_recall_curves(e).items()
            for recall, precision in zip(RECALL_LEVELS, curve)]
    with atomic_path(path) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)


def plot_pr_curves(path, evaluations, title):
    """One figure, one line per (metric, task): the interpolated
    precision-recall curves, written as a PNG (matplotlib's Agg backend, no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(8, 6))
    for metric, curves in _runs(evaluations, precision_recall_curves):
        for task, curve in curves.items():
            axes.plot(RECALL_LEVELS, curve, marker="o", markersize=3, linestyle="--" if task.endswith("_hard") else "-",
                      label=task if metric is None else f"{metric} {task}")
    axes.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.05), title=title)
    axes.grid(True, linestyle="dotted")
    axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    save_figure(figure, path)
