"""Coarse to fine on the demo benchmark: `evaluation.py --metric chamfer
--shortlist K` against K (DSVR/CSVR/ISVR mAP and the frame pairs compared,
as a fraction of an exhaustive TCA_f), beside TCA_c alone and the exhaustive
TCA_f; the smallest K keeping >= 99% of the exhaustive mAP on every task is
what search.py's --shortlist defaults to (retrieval.DEFAULT_SHORTLIST).

It reads what `make demo` wrote (its benchmark, PCA features of the eval split
and trained model); without them the section says so and measures nothing.
"""
import os

from bench.common import Target, summary, table
from data import load_benchmark
from retrieval import (DEFAULT_SHORTLIST, PADDING_SIZE, evaluate_model, evaluate_similarities, load_model,
                       shortlist_similarities)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORTLISTS = (5, 10, 20, 50, 100)
SIZES = {"full": dict(demo_dir=os.path.join(REPO, "demo_output"), shortlists=SHORTLISTS, metric="chamfer", keep=0.99),
         "quick": dict(demo_dir=os.path.join(REPO, "demo_output"), shortlists=SHORTLISTS, metric="chamfer",
                       keep=0.99)}
TARGETS = (
    Target(f"search.py's default --shortlist {DEFAULT_SHORTLIST} on the demo benchmark: worst task's mAP / "
           "exhaustive TCA_f's", ("default_kept",), 0.99, "≥ 99%"),
)


def sweep(model_path, annotation_dir, feature_path, shortlists, metric="chamfer", keep=0.99,
          padding_size=PADDING_SIZE, dataset="FIVR-5K", device="cpu"):
    """mAP of TCA_c alone, of each shortlist K re-scored by `metric`, and of the
    exhaustive `metric`, on a FIVR-format benchmark; the smallest K keeping
    `keep` of the exhaustive mAP on every task."""
    benchmark = load_benchmark(dataset, annotation_dir)
    model = load_model(model_path, {}, device)
    quiet = dict(log=lambda *a: None, device=device)
    exhaustive = evaluate_model(model, benchmark, feature_path, ("cosine", metric), padding_size, **quiet)
    rows = {}
    for k in shortlists:
        query_ids, database_ids, similarities, stats = shortlist_similarities(
            model, benchmark, feature_path, metric, k, padding_size, device=device)
        evaluation = evaluate_similarities(benchmark, query_ids, database_ids, similarities, log=lambda *a: None)
        rows[str(k)] = {"mAP": evaluation[metric].metrics, "frame_pairs": stats["frame_pairs"],
                        "work": stats["frame_pairs"] / stats["exhaustive_frame_pairs"]}
    for row in rows.values():
        row["kept"] = min(row["mAP"][task] / exhaustive[metric][task] for task in exhaustive[metric])
    smallest = next((int(k) for k, row in rows.items() if row["kept"] >= keep), None)
    return {"cosine": exhaustive["cosine"], "exhaustive": exhaustive[metric], "shortlists": rows,
            "smallest_keeping": smallest, "metric": metric, "keep": keep}


def run(size):
    demo = size["demo_dir"]
    paths = dict(model_path=os.path.join(demo, "model", "model.pth"), annotation_dir=os.path.join(demo, "benchmark"),
                 feature_path=os.path.join(demo, "features", "eval_pca.h5"))
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing:
        return {"skipped": f"{missing[0]}: missing; run `make demo` first (this section reads its outputs)"}
    result = sweep(**paths, shortlists=size["shortlists"], metric=size["metric"], keep=size["keep"])
    result["default"] = DEFAULT_SHORTLIST
    if str(DEFAULT_SHORTLIST) in result["shortlists"]:
        result["default_kept"] = summary([result["shortlists"][str(DEFAULT_SHORTLIST)]["kept"]])
    return result


def render(result, meta):
    lines = ["## Coarse to fine on the demo benchmark (`evaluation.py --shortlist K`)\n"]
    if "skipped" in result:
        return lines + [f"Not measured: {result['skipped']}.\n"]
    tasks = list(result["exhaustive"])
    rows = [("TCA_c alone", "0", *(f"{result['cosine'][t]:.4f}" for t in tasks), "")]
    for k, row in result["shortlists"].items():
        mark = " (search.py's default)" if int(k) == result["default"] else ""
        rows.append((f"{k}{mark}", f"{100 * row['work']:.1f}%", *(f"{row['mAP'][t]:.4f}" for t in tasks),
                     f"{100 * row['kept']:.1f}%"))
    rows.append((f"exhaustive {result['metric']}", "100%", *(f"{result['exhaustive'][t]:.4f}" for t in tasks), "100%"))
    smallest = result["smallest_keeping"]
    return lines + [*table(("K", "frame pairs (of exhaustive)", *tasks, "worst task / exhaustive"), rows), "",
                    f"Smallest K keeping ≥ {100 * result['keep']:.0f}% of the exhaustive mAP on every task: "
                    f"{smallest if smallest is not None else 'none of those tried'}; search.py's default "
                    f"--shortlist is {result['default']}.\n"]
