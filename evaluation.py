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
import time

import h5py
import numpy as np
import torch
from tqdm import tqdm

from data import DATASETS, load_benchmark
from model import chamfer_similarity, cosine_similarity, symmetric_chamfer_similarity
from train import AGGREGATORS, build_encoder
from utils import UserError, atomic_path, l2_normalize, load_state_dict, open_features, pad_sequences, run_main

# pandas is imported in the function that uses it. torch is imported here:
# utils.py, data.py and train.py (for the aggregator list) import it anyway,
# which is most of a --similarities run's ~2 s start-up (bench/NOTES.md).

# A batch's longest chunk is at most this many times its shortest (plus a few
# frames, so short videos do not end up one length per batch): attention runs
# on the padded (n, T, T) batch, and with a frame budget alone one batch of
# 30-300 frame videos spans 30 to ~234 frames, twice the useful attention work.
BATCH_LENGTH_SPREAD, BATCH_LENGTH_SLACK = 1.15, 8


def get_args_parser():
    parser = argparse.ArgumentParser(description="Evaluate video retrieval (mAP) on a benchmark.")
    parser.add_argument("-d", "--dataset", type=str, required=True,
                        help=f"Benchmark: {', '.join(DATASETS)}")
    parser.add_argument("--annotation_dir", type=str, default="datasets",
                        help="Directory holding the benchmark's annotation pickle, e.g. fivr.pickle "
                             "(default: %(default)s; see datasets/README.md). A custom benchmark in the same "
                             "format is evaluated from its own directory")
    # precomputed similarities
    parser.add_argument("--similarities", type=str, default=None,
                        help="Evaluate these precomputed similarities (.json, .npz, .h5) instead of a model")
    # model mode
    parser.add_argument("-fp", "--feature_path", type=str, default=None,
                        help="HDF5 file of frame features, one (T, C) dataset per video id")
    parser.add_argument("-mp", "--model_path", type=str, default=None,
                        help="Model state dict (train.py's model.pth); architecture flags not given on the "
                             "command line are read from the args.json train.py writes next to it")
    parser.add_argument("--baseline", action="store_true",
                        help="No model: the video embedding is the L2-normalised mean of the frame features, "
                             "the frame embeddings are the L2-normalised frame features (the untrained baseline)")
    parser.add_argument("--aggregator", type=str, default=None, choices=AGGREGATORS,
                        help="Architecture of --model_path (default: from args.json, else tca)")
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
    parser.add_argument("-ps", "--padding_size", type=int, default=300,
                        help="Encode videos in consecutive chunks of at most this many frames (upstream crops "
                             "a random window of this size instead; its README evaluates with 300, the training "
                             "window); 0 encodes every video whole (default: %(default)s)")
    parser.add_argument("-m", "--metric", type=str, default="cosine", choices=["cosine", "chamfer", "symmetric_chamfer"],
                        help="Similarity: cosine of video embeddings, or (symmetric) chamfer of frame embeddings "
                             "(default: %(default)s)")
    parser.add_argument("--frames_per_batch", type=int, default=16384,
                        help="Padded frames encoded per forward pass, bounds memory (default: %(default)s)")
    parser.add_argument("--device", type=str, default=None,
                        help="torch device for model mode (default: cuda if available, else cpu)")
    parser.add_argument("--save_similarities", type=str, default=None,
                        help="Write the model's similarities to this .npz, .h5 or .json file")
    # outputs
    parser.add_argument("--json_out", type=str, default=None,
                        help="Write the metrics to this JSON file")
    parser.add_argument("--results_csv", type=str, default=None,
                        help="Append one row (dataset, checkpoint, metric, scores, s/query) to this CSV file")
    return parser


# --------------------------------------------------------------------------
# similarity files

def load_similarities(path):
    """Read a similarity file. Returns (query ids, database ids, (Q, D) array);
    entries a JSON file does not give are NaN."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: similarity file not found")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".json":
            return _similarities_from_json(path)
        if ext == ".npz":
            with np.load(path, allow_pickle=False) as f:
                queries, database, similarities = f["queries"], f["database"], f["similarities"]
        elif ext in (".h5", ".hdf5"):
            with h5py.File(path, "r") as f:
                queries, database, similarities = (f["queries"].asstr()[:], f["database"].asstr()[:],
                                                   f["similarities"][:])
        else:
            raise UserError(f"{path}: unknown similarity file type {ext!r} (use .json, .npz, .h5)")
    except KeyError as e:
        raise UserError(f"{path}: missing {e} (expected 'queries', 'database', 'similarities')") from None
    except UserError:
        raise
    except Exception as e:  # zip/HDF5/pickle errors of a damaged file come in many kinds
        raise UserError(f"{path}: cannot read similarities ({type(e).__name__}: {e})") from None
    if queries.ndim != 1 or database.ndim != 1:
        raise UserError(f"{path}: 'queries' and 'database' must be 1-D lists of video ids")
    queries, database = [str(q) for q in queries.tolist()], [str(v) for v in database.tolist()]
    if similarities.shape != (len(queries), len(database)) or not np.issubdtype(similarities.dtype, np.floating):
        raise UserError(f"{path}: 'similarities' must be a float array of shape "
                        f"({len(queries)}, {len(database)}), got {similarities.dtype} {similarities.shape}")
    return queries, database, similarities


def _similarities_from_json(path):
    try:
        with open(path) as f:
            results = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(results, dict) or not all(isinstance(r, dict) for r in results.values()):
        raise UserError(f"{path}: expected a JSON object {{query: {{video: score}}}}")
    # columns: the videos in order of first appearance (usually every query lists the same ones)
    column_of, previous = {}, None
    for res in results.values():
        if previous is None or res.keys() != previous:
            for video in res:
                column_of.setdefault(video, len(column_of))
        previous = res.keys()
    similarities = np.full((len(results), len(column_of)), np.nan)
    for i, res in enumerate(results.values()):
        try:
            columns = np.fromiter(map(column_of.__getitem__, res), np.int64, len(res))
            similarities[i, columns] = np.fromiter(res.values(), np.float64, len(res))
        except (TypeError, ValueError):
            raise UserError(f"{path}: scores must be numbers") from None
    return list(results), list(column_of), similarities


def save_similarities(path, queries, database, similarities):
    """Write similarities as .npz, .h5/.hdf5 or .json (NaN entries left out of JSON)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".npz", ".h5", ".hdf5", ".json"):
        raise UserError(f"{path}: unknown similarity file type {ext!r} (use .json, .npz, .h5)")
    with atomic_path(path) as tmp:
        if ext == ".npz":
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
                np.savez(f, queries=np.array(queries, dtype=str), database=np.array(database, dtype=str),
                         similarities=similarities)
        elif ext == ".json":
            with open(tmp, "w") as f:
                json.dump({q: {v: s for v, s in zip(database, row.tolist()) if s == s}  # s != s: NaN
                           for q, row in zip(queries, similarities)}, f)
        else:
            with h5py.File(tmp, "w") as f:
                f["queries"], f["database"] = np.array(queries, dtype=object), np.array(database, dtype=object)
                f["similarities"] = similarities


# --------------------------------------------------------------------------
# model mode

def build_model(args):
    """The model of --model_path (eval mode), or None for --baseline."""
    # architecture: flags given > train.py's args.json next to the checkpoint > upstream defaults
    defaults = {"aggregator": "tca", "pca_components": 1024, "num_layers": 1, "num_clusters": 256,
                "output_dim": 1024, "normalize_input": False}
    args_json = os.path.join(os.path.dirname(os.path.abspath(args.model_path)), "args.json")
    if os.path.isfile(args_json):
        try:
            with open(args_json) as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{args_json}: cannot read ({e})") from None
        defaults.update({k: saved[k] for k in defaults if k in saved})
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.dropout = 0.0  # eval mode: no dropout anyway
    model = build_encoder(args)
    state_dict = load_state_dict(args.model_path)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0:2]
        raise UserError(f"{args.model_path}: does not fit a {args.aggregator} model with these flags "
                        f"({' '.join(first)})") from None
    return model.to(args.device).eval()


def _chunk_bounds(num_frames, padding_size):
    """Deterministic chunks [(start, stop)] of at most padding_size frames (0: whole video)."""
    if padding_size <= 0 or num_frames <= padding_size:
        return [(0, num_frames)]
    pieces = -(-num_frames // padding_size)  # ceil
    # as np.array_split: the first num_frames % pieces chunks get one frame more
    sizes = [num_frames // pieces + (i < num_frames % pieces) for i in range(pieces)]
    edges = np.cumsum([0] + sizes)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def find_features(features, benchmark, ids, what, args, model):
    """The ids of `ids` that have features (of at least one frame), their keys
    in the HDF5 file and their lengths; the others are reported and left out,
    as upstream leaves them out of the available subset."""
    channels = getattr(model, "feature_size", None)
    found, missing = [], []
    for v in tqdm(ids, desc=f"{what}: finding features", leave=False):
        key = next((k for k in benchmark.feature_keys(v) if k in features), None)
        shape = features[key].shape if key is not None else (0,)
        if shape[0] == 0:
            missing.append(v)
            continue
        channels = channels or shape[-1]
        if len(shape) != 2 or shape[1] != channels:
            raise UserError(f"{args.feature_path}: video {key} has features of shape {shape}, expected "
                            f"(frames, {channels})" + (" (see --pca_components)" if model is not None else ""))
        found.append((v, key, shape[0]))
    if missing:
        print(f"warning: {len(missing)} of {len(ids)} {what} have no features in {args.feature_path} "
              f"(e.g. {missing[0]}); they are left out")
    return [f[0] for f in found], [f[1] for f in found], np.array([f[2] for f in found], dtype=np.int64)


def encode_videos(model, features, keys, lengths, args, desc):
    """Yield (indices into keys, representations) in batches of similar length.

    Representations: (n, C) video embeddings for cosine, or padded frame
    embeddings (n, T, C) and their num_frames (n,) for the chamfer metrics.
    """
    # sort by chunk length (= video length up to --padding_size): the chunks of
    # a batch then differ by a few frames; about 0.1% padding at FIVR-200K scale
    pieces = -(-lengths // args.padding_size) if args.padding_size > 0 else np.ones_like(lengths)
    order = np.lexsort((lengths, -(-lengths // pieces)))
    frame_level = args.metric != "cosine"
    vlad_output = model is not None and hasattr(model, "residuals")  # NetVLAD/NeXtVLAD encode clusters, not frames
    progress = tqdm(total=len(keys), desc=desc, unit="video")
    start = 0
    while start < len(order):
        # grow the batch while its padded chunks fit in the frame budget
        # (and while its longest chunk stays within the spread of its shortest)
        stop, num_chunks, longest = start, 0, 0
        shortest = min(b - a for a, b in _chunk_bounds(int(lengths[order[start]]), args.padding_size))
        while stop < len(order):
            bounds = _chunk_bounds(int(lengths[order[stop]]), args.padding_size)
            chunk_len = max(b - a for a, b in bounds)
            if stop > start and ((num_chunks + len(bounds)) * max(longest, chunk_len) > args.frames_per_batch
                                 or chunk_len > BATCH_LENGTH_SPREAD * shortest + BATCH_LENGTH_SLACK):
                break
            num_chunks, longest, stop = num_chunks + len(bounds), max(longest, chunk_len), stop + 1
        batch = order[start:stop]
        videos = [torch.from_numpy(np.asarray(features[keys[i]][:], dtype=np.float32)) for i in batch]
        chunks, owner = [], []  # owner: which video of the batch each chunk belongs to
        for j, video in enumerate(videos):
            for a, b in _chunk_bounds(len(video), args.padding_size):
                chunks.append(video[a:b])
                owner.append(j)
        owner = torch.tensor(owner, device=args.device)
        with torch.no_grad():
            if model is not None and not frame_level:
                # the aggregators take the list itself (TCA without a padded copy)
                num_frames = torch.tensor([len(c) for c in chunks], device=args.device)
                chunk_embeddings = model(chunks)  # (K, C')
            else:
                padded, num_frames = pad_sequences(chunks, device=args.device)  # (K, T, C), (K,)
            if model is None:  # baseline: the features themselves
                frames = l2_normalize(padded) if frame_level else padded
                chunk_embeddings = padded.sum(1) / num_frames.unsqueeze(1)  # (K, C) mean frame
            elif frame_level:
                frames = model.encode(padded.transpose(1, 2), num_frames)  # (K, T, C') or (K, clusters, C')
                if vlad_output:
                    num_frames = torch.full_like(num_frames, frames.shape[1])
            if frame_level:
                per_video = [[] for _ in videos]
                for k, j in enumerate(owner.tolist()):
                    per_video[j].append(frames[k, :num_frames[k]])
                frames, video_frames = pad_sequences([torch.cat(v) for v in per_video], device=args.device)
                yield batch, (frames, video_frames)
            else:
                # length-weighted mean of the chunks, then L2-normalised (one chunk: unchanged)
                weights = num_frames.unsqueeze(1).to(chunk_embeddings.dtype)
                summed = torch.zeros(len(videos), chunk_embeddings.shape[1], device=args.device,
                                     dtype=chunk_embeddings.dtype).index_add_(0, owner, chunk_embeddings * weights)
                yield batch, l2_normalize(summed)
        progress.update(len(batch))
        start = stop
    progress.close()


def model_similarities(args, benchmark):
    """Encode the benchmark's queries and database with the model (or the
    baseline) and score them with --metric. Returns (query ids, database ids,
    (Q, D) similarities, timing/storage stats)."""
    model = None if args.baseline else build_model(args)
    similarity = {"cosine": cosine_similarity, "chamfer": chamfer_similarity,
                  "symmetric_chamfer": symmetric_chamfer_similarity}[args.metric]
    features = open_features(args.feature_path)
    with features:
        query_ids, query_keys, query_lengths = find_features(features, benchmark, benchmark.queries,
                                                             "queries", args, model)
        database_ids, database_keys, database_lengths = find_features(features, benchmark, benchmark.database,
                                                                      "database videos", args, model)
        if not query_ids or not database_ids:
            raise UserError(f"{args.feature_path}: no features for the {benchmark.name} "
                            f"{'queries' if not query_ids else 'database'} (are these the right features?)")

        t0 = time.perf_counter()
        encoded = [None] * len(query_ids)
        for idx, rep in encode_videos(model, features, query_keys, query_lengths, args, "queries"):
            for n, i in enumerate(idx):
                encoded[i] = rep[n] if args.metric == "cosine" else rep[0][n, :rep[1][n]]
        if args.metric == "cosine":
            queries = torch.stack(encoded)  # (Q, C)
        else:
            queries = pad_sequences(encoded, device=args.device)  # (Q, T, C), (Q,)
        query_seconds = time.perf_counter() - t0

        similarities = np.full((len(query_ids), len(database_ids)), np.nan, dtype=np.float32)
        similarity_seconds, stored_values = 0.0, 0
        t0 = time.perf_counter()
        for idx, rep in encode_videos(model, features, database_keys, database_lengths, args, "database"):
            t1 = time.perf_counter()
            with torch.no_grad():
                if args.metric == "cosine":
                    sims = similarity(queries, rep)
                    stored_values += rep.numel()
                else:
                    sims = similarity(queries[0], queries[1], rep[0], rep[1])
                    stored_values += int(rep[1].sum()) * rep[0].shape[2]
            similarities[:, idx] = sims.cpu().numpy()
            similarity_seconds += time.perf_counter() - t1
        database_seconds = time.perf_counter() - t0 - similarity_seconds
    stats = {"s_per_query": (query_seconds + similarity_seconds) / len(query_ids),
             "database_s_per_video": database_seconds / len(database_ids),
             "storage_kb_per_video": stored_values * 4 / 1024 / len(database_ids)}  # float32
    return query_ids, database_ids, similarities, stats


# --------------------------------------------------------------------------
# outputs

def _json_ready(value):
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    return None if isinstance(value, float) and np.isnan(value) else value


def append_results_csv(path, row):
    import pandas as pd
    table = pd.DataFrame([row])
    if os.path.isfile(path):
        try:
            table = pd.concat([pd.read_csv(path), table], ignore_index=True)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not a results CSV ({e})") from None
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


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

    benchmark = load_benchmark(args.dataset, args.annotation_dir)
    stats = {}
    if args.similarities:
        query_ids, database_ids, similarities = load_similarities(args.similarities)
    else:
        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            raise UserError(f"--device {args.device}: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: CUDA is not available on this machine")
        query_ids, database_ids, similarities, stats = model_similarities(args, benchmark)
        if args.save_similarities:
            save_similarities(args.save_similarities, query_ids, database_ids, similarities)
            print(f"saved similarities to {args.save_similarities}")

    metrics = benchmark.evaluate(query_ids, database_ids, similarities)
    print(f"===== {benchmark.name} =====")
    print(benchmark.table(metrics))
    if stats:
        print(f"{stats['s_per_query']:.4f} s/query, {stats['storage_kb_per_video']:.2f} KB/video "
              f"({args.metric}), database encoding {stats['database_s_per_video'] * 1000:.2f} ms/video")

    if args.json_out:
        with atomic_path(args.json_out) as tmp, open(tmp, "w") as f:
            json.dump(_json_ready(metrics), f, indent=2)
    if args.results_csv:
        row = {"dataset": benchmark.name,
               "checkpoint": args.similarities or ("baseline" if args.baseline else args.model_path),
               "metric": "precomputed" if args.similarities else args.metric}
        row.update({k: v for k, v in metrics.items() if k != "events"})
        row.update({f"EVVE/{event}": v for event, v in metrics.get("events", {}).items()})
        row.update({k: stats.get(k, float("nan")) for k in ("s_per_query", "storage_kb_per_video")})
        append_results_csv(args.results_csv, row)


if __name__ == "__main__":
    run_main(main)
