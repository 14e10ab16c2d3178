"""Evaluate video retrieval on FIVR-5K / FIVR-200K, CC_WEB_VIDEO, EVVE or VCDB.

Two ways in:

  precomputed similarities, no model:
    python evaluation.py --dataset FIVR-200K --similarities sims.npz
  a trained model (or the untrained baseline) on HDF5 frame features:
    python evaluation.py --dataset FIVR-5K --feature_path fivr5k.hdf5 --model_path runs/tca/model.pth --metric cosine
    python evaluation.py --dataset FIVR-5K --feature_path fivr5k.hdf5 --baseline

Similarity files: JSON {query: {video: score}} (the ViSiL / FIVR-200K result
format), or .npz / .h5 holding `queries` (Q ids), `database` (D ids) and
`similarities` (Q x D, NaN = not computed). --save_similarities writes them.

Model mode is deterministic: no random crops. A video longer than
--padding_size frames is cut into consecutive chunks of at most that many
frames (np.array_split, so the chunks differ by at most one frame), each chunk
is encoded on its own, and the chunks are put back together: the frame
embeddings are concatenated (chamfer metrics), the video embedding is the
L2-normalised, length-weighted mean of the chunk embeddings (cosine).
--padding_size 0 encodes every video whole. Videos are read and encoded in
order of length, in batches of similar length, so little compute goes to
padding; the database is streamed (never held in memory), which is what lets
frame-level metrics run on FIVR-200K.

--dataset NAME --annotation_dir DIR reads the benchmark's annotation file from
DIR (fivr.pickle, cc_web_video.pickle or cc_web_video_tca.pickle, evve.pickle,
vcdb.pickle); a custom benchmark in the same format (e.g. a small fivr.pickle
with a '5k' entry) is evaluated the same way.
"""
import argparse
import json
import os
import sys

import numpy as np

import report
from data import ANNOTATION_FILES, DATASETS, DATASETS_DIR, load_benchmark
from retrieval import (METRICS, PADDING_SIZE, evaluate_similarities, load_model, load_similarities, parse_metrics,
                       save_similarities, score_benchmark, shortlist_similarities)
from utils import (FRAMES_PER_BATCH, UserError, atomic_path, check_outputs_apart, check_writable, init_distributed,
                   local_device, os_error_line, run_main)

# The model-mode work (features -> embeddings -> similarities) is retrieval.py's,
# shared with training's validation, index.py and search.py. torch is imported
# in model mode only (a similarity file needs none of it: `import torch` alone
# is most of that run's start-up, bench/NOTES.md); pandas likewise, where a CSV is written.


def get_args_parser():
    parser = argparse.ArgumentParser(description="Evaluate video retrieval (mAP) on a benchmark.")
    parser.add_argument("-d", "--dataset", type=str, required=True,
                        help=f"Benchmark: {', '.join(DATASETS)}")
    parser.add_argument("--annotation_dir", type=str, default=DATASETS_DIR,
                        help="Directory holding the benchmark's annotation pickle, e.g. fivr.pickle "
                             "(default: the repository's datasets/, which ships them; see datasets/README.md). A custom benchmark in the same "
                             "format is evaluated from its own directory")
    # precomputed similarities
    parser.add_argument("--similarities", type=str, default=None,
                        help="Evaluate these precomputed similarities (.json, .npz, .h5) instead of a model. A top-k "
                             "file (search.py --json_out) lists k videos per query: evaluate it on FIVR with "
                             "--protocol full, where unlisted relevant videos count as misses")
    # model mode
    parser.add_argument("-fp", "--feature_path", type=str, default=None,
                        help="HDF5 file of frame features, one (T, C) dataset per video id")
    parser.add_argument("-mp", "--model_path", type=str, default=None,
                        help="Checkpoint: train.py's model.pth describes its own architecture (no architecture "
                             "flag needed; one that contradicts it is an error); a bare state dict (upstream's, "
                             "or an earlier model.pth) is built from the architecture flags, else from the "
                             "args.json next to it, else upstream's defaults")
    parser.add_argument("--baseline", action="store_true",
                        help="No model: the video embedding is the L2-normalised mean of the frame features, "
                             "the frame embeddings are the L2-normalised frame features (the untrained baseline)")
    parser.add_argument("--aggregator", type=str, default=None,
                        help="Architecture of a bare state dict: tca, tca_netvlad, netvlad, nextvlad, lstm or gru "
                             "(model.AGGREGATORS; default: from args.json, else tca)")
    parser.add_argument("-pc", "--pca_components", type=int, default=None,
                        help="Feature size the model takes (default: from args.json, else 1024)")
    parser.add_argument("-nl", "--num_layers", type=int, default=None,
                        help="Transformer / recurrent layers (default: from args.json, else 1)")
    parser.add_argument("-nc", "--num_clusters", type=int, default=None,
                        help="NetVLAD/NeXtVLAD/tca_netvlad clusters (default: from args.json, else 256); accepted for the "
                             "upstream README command, no effect on tca, lstm, gru")
    parser.add_argument("-od", "--output_dim", type=int, default=None,
                        help="NetVLAD/NeXtVLAD/tca_netvlad embedding size, LSTM/GRU hidden size (default: from args.json, "
                             "else 1024); accepted for the upstream README command, no effect on tca")
    parser.add_argument("-ni", "--normalize_input", action="store_true", default=None,
                        help="NetVLAD/NeXtVLAD were trained with input normalisation (default: from args.json); "
                             "no effect on tca, lstm, gru")
    parser.add_argument("-ps", "--padding_size", type=int, default=PADDING_SIZE,
                        help="Encode videos in consecutive chunks of at most this many frames (upstream crops "
                             "a random window of this size instead; its README evaluates with 300, the training "
                             "window); 0 encodes every video whole (default: %(default)s)")
    parser.add_argument("-m", "--metric", type=str, default="cosine",
                        help="Similarity: cosine of video embeddings (TCA_c), chamfer (TCA_f) or symmetric_chamfer "
                             "(TCA_sym) of frame embeddings; a comma-separated list or 'all' scores every one from "
                             "a single read and encoding of each video, one table row per metric "
                             "(default: %(default)s)")
    parser.add_argument("--shortlist", type=int, default=None,
                        help="Coarse to fine, as search.py: each query's TCA_c top-K re-scored by --metric "
                             "(chamfer or symmetric_chamfer) and ranked above the rest, which keep their TCA_c order "
                             "(saved scores: the frame-level score + 3 for the shortlist, the cosine for the rest); "
                             "prints the frame pairs compared, as a fraction of exhaustive")
    parser.add_argument("--frames_per_batch", type=int, default=FRAMES_PER_BATCH,
                        help="Padded frames encoded per forward pass, bounds memory (default: %(default)s)")
    parser.add_argument("--device", type=str, default=None,
                        help="torch device for model mode (default: cuda if available, else cpu)")
    parser.add_argument("--save_similarities", type=str, default=None,
                        help="Write the model's similarities to this .npz, .h5 or .json file (several metrics: "
                             "a.npz becomes a.cosine.npz, a.chamfer.npz, ...)")
    # outputs
    parser.add_argument("--json_out", type=str, default=None,
                        help="Write the metrics to this JSON file (several metrics: {metric: metrics})")
    parser.add_argument("--results_csv", type=str, default=None,
                        help="Append one row per metric (dataset, checkpoint, metric, scores, s/query) to this CSV file")
    parser.add_argument("--protocol", type=str, default="available",
                        help="FIVR: 'available' counts only the relevant videos that have results (DnS, S2VS); 'full' "
                             "is the official FIVR-200K evaluator's, a relevant video without a result is a miss "
                             "(default: %(default)s)")
    parser.add_argument("--pr_curve", type=str, default=None,
                        help="Write each task's 21-point interpolated precision-recall curve (the official FIVR-200K "
                             "evaluator's, mean over the queries) to this CSV file")
    parser.add_argument("--plot", type=str, default=None, help="Draw those curves, one line per task, into this PNG")
    parser.add_argument("--per_query", type=str, default=None,
                        help="Write each query's AP, number of relevant videos and rank of the first relevant one, "
                             "per task, to this CSV file")
    return parser


# --------------------------------------------------------------------------
# outputs

def _json_ready(value):
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    return None if isinstance(value, float) and np.isnan(value) else value


def write_json(path, value):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(_json_ready(value), f, indent=2)


def append_results_csv(path, rows):
    """Append rows (dicts) to a results CSV, adding columns as needed."""
    import pandas as pd
    table = pd.DataFrame(rows)
    if os.path.isfile(path):
        try:
            table = pd.concat([pd.read_csv(path), table], ignore_index=True)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not a results CSV ({e})") from None
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def similarity_path(path, metric, metrics):
    """Where --save_similarities writes `metric`: the path itself for one
    metric, a.<metric>.npz for several."""
    if len(metrics) == 1:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.{metric}{ext}"


def main():
    args = get_args_parser().parse_args()
    if args.similarities and (args.feature_path or args.model_path or args.baseline):
        raise UserError("--similarities evaluates precomputed scores: drop --feature_path/--model_path/--baseline")
    if not args.similarities:
        if not args.feature_path:
            raise UserError("give --similarities, or --feature_path with --model_path or --baseline")
        if bool(args.model_path) == args.baseline:
            raise UserError("model mode needs exactly one of --model_path and --baseline")
        if args.padding_size < 0 or args.frames_per_batch < 1:
            raise UserError("--padding_size must be >= 0 and --frames_per_batch >= 1")
    elif args.save_similarities:
        raise UserError("--save_similarities writes a model's similarities; it needs model mode")
    metrics = parse_metrics(args.metric) if not args.similarities else ["precomputed"]
    if args.shortlist is not None and (args.similarities or args.shortlist < 1
                                       or metrics not in (["chamfer"], ["symmetric_chamfer"])):
        raise UserError("--shortlist K (>= 1) re-ranks a model's TCA_c top-K: give it with --metric chamfer or "
                        "--metric symmetric_chamfer")
    outputs = {f"--{flag}": getattr(args, flag) for flag in ("json_out", "results_csv", "pr_curve", "plot", "per_query")}
    for m in metrics if args.save_similarities else []:
        outputs["--save_similarities" + (f" ({m})" if len(metrics) > 1 else "")] = similarity_path(
            args.save_similarities, m, metrics)
    inputs = {"--feature_path": args.feature_path, "--model_path": args.model_path, "--similarities": args.similarities,
              "--model_path's args.json": args.model_path and os.path.join(os.path.dirname(args.model_path), "args.json")}
    inputs.update({f"--annotation_dir's {name}": os.path.join(args.annotation_dir, name) for name in ANNOTATION_FILES})
    check_outputs_apart(outputs, inputs)
    for path in outputs.values():
        if path:
            check_writable(path)  # now, not after encoding the whole benchmark

    benchmark = load_benchmark(args.dataset, args.annotation_dir)
    benchmark.check_protocol(args.protocol)
    stats, dist = {}, None
    if args.similarities:
        query_ids, database_ids, similarities = load_similarities(args.similarities)
        similarities = {"precomputed": similarities}
        evaluations = evaluate_similarities(benchmark, query_ids, database_ids, similarities, args.protocol)
    else:
        dist = init_distributed()
        device = local_device(dist, args.device)
        model = None
        if not args.baseline:
            from model import ARCHITECTURE_FLAGS
            flags = {flag: getattr(args, flag) for flag in ARCHITECTURE_FLAGS}
            model = load_model(args.model_path, flags, device)
        if args.shortlist is not None:
            if dist.size > 1:
                raise UserError("--shortlist runs in one process (not under horovodrun)")
            query_ids, database_ids, similarities, stats = shortlist_similarities(
                model, benchmark, args.feature_path, metrics[0], args.shortlist, args.padding_size,
                args.frames_per_batch, device)
            evaluations = evaluate_similarities(benchmark, query_ids, database_ids, similarities, args.protocol)
        else:
            query_ids, database_ids, similarities, stats, evaluations = score_benchmark(
                model, benchmark, args.feature_path, metrics, padding_size=args.padding_size,
                frames_per_batch=args.frames_per_batch, device=device, dist=dist, protocol=args.protocol)
        if dist.rank != 0:
            return  # rank 0 evaluates and writes every output

    results = {m: e.metrics for m, e in evaluations.items()}
    title = f"{benchmark.name}, protocol {args.protocol}" if len(benchmark.protocols) > 1 else benchmark.name
    print(f"===== {benchmark.name} =====" + (f" protocol: {args.protocol}" if len(benchmark.protocols) > 1 else ""))
    tca = not args.similarities and not args.baseline and type(model).__name__ == "TCA"
    print(report.results_table(benchmark, evaluations, METRICS if tca else None))  # the paper's rows: TCA only
    if stats:
        storage = ", ".join(f"{stats['storage_kb_per_video'][m]:.2f} KB/video ({m})" for m in metrics)
        print(f"{stats['s_per_query']:.4f} s/query, {storage}, "
              f"database encoding {stats['database_s_per_video'] * 1000:.2f} ms/video; "
              f"encoded and scored in {stats['seconds']:.2f} s" + (f" on {dist.size} ranks" if dist.size > 1 else ""))
    if "frame_pairs" in stats:
        print(f"shortlist {args.shortlist}: {stats['frame_pairs']:,} frame pairs compared, "
              f"{stats['frame_pairs'] / stats['exhaustive_frame_pairs']:.2%} of exhaustive {metrics[0]}")

    # every output is tried: one that fails (disk full, ...) is reported and does not stop the others
    failed = []

    def write(path, save):
        try:
            save()
        except (UserError, OSError) as e:
            print(f"error: {e if isinstance(e, UserError) else os_error_line(e, path)}", file=sys.stderr)
            failed.append(path)

    if args.save_similarities:
        for m in metrics:
            path = similarity_path(args.save_similarities, m, metrics)
            write(path, lambda: save_similarities(path, query_ids, database_ids, similarities[m]))
            if path not in failed:
                print(f"saved similarities to {path}")
    if args.json_out:
        write(args.json_out, lambda: write_json(args.json_out, results[metrics[0]] if len(metrics) == 1 else results))
    for path, save in ((args.pr_curve, report.write_pr_curves), (args.per_query, report.write_per_query),
                       (args.plot, lambda path, e: report.plot_pr_curves(path, e, title))):
        if path:
            write(path, lambda: save(path, evaluations))
    if args.results_csv:
        rows = []
        for m in metrics:
            row = {"dataset": benchmark.name,
                   "checkpoint": args.similarities or ("baseline" if args.baseline else args.model_path),
                   "metric": m}
            row.update({k: v for k, v in results[m].items() if k != "events"})
            row.update({f"EVVE/{event}": v for event, v in results[m].get("events", {}).items()})
            row["s_per_query"] = stats.get("s_per_query", float("nan"))
            row["storage_kb_per_video"] = stats["storage_kb_per_video"][m] if stats else float("nan")
            rows.append(row)
        write(args.results_csv, lambda: append_results_csv(args.results_csv, rows))
    if failed:
        sys.exit(2)


if __name__ == "__main__":
    run_main(main)
