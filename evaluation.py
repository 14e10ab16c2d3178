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
import collections
import functools
import json
import os
import sys
import time

import numpy as np
from tqdm import tqdm

import report
from data import DATASETS, DATASETS_DIR, load_benchmark
from utils import (FRAMES_PER_BATCH, UserError, atomic_path, balanced_owners, check_writable, init_distributed,
                   l2_normalize, length_buckets, load_checkpoint, load_similarities, local_device, open_features,
                   os_error_line, pad_sequences, read_features, run_main, save_similarities)

# torch, model and similarity are imported in model mode only: a similarity
# file needs none of them, and `import torch` alone is most of that run's
# start-up (bench/NOTES.md). pandas likewise, where a CSV is written.


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
                        help="Evaluate these precomputed similarities (.json, .npz, .h5) instead of a model")
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
    parser.add_argument("-ps", "--padding_size", type=int, default=300,
                        help="Encode videos in consecutive chunks of at most this many frames (upstream crops "
                             "a random window of this size instead; its README evaluates with 300, the training "
                             "window); 0 encodes every video whole (default: %(default)s)")
    parser.add_argument("-m", "--metric", type=str, default="cosine",
                        help="Similarity: cosine of video embeddings (TCA_c), chamfer (TCA_f) or symmetric_chamfer "
                             "(TCA_sym) of frame embeddings; a comma-separated list or 'all' scores every one from "
                             "a single read and encoding of each video, one table row per metric "
                             "(default: %(default)s)")
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
# model mode

# the similarity of each --metric and the paper's name for it
METRICS = {"cosine": "TCA_c", "chamfer": "TCA_f", "symmetric_chamfer": "TCA_sym"}

# the architecture flags, as build_model's arguments, and their values when
# neither the checkpoint, the flags nor an args.json give one (upstream's)
ARCHITECTURE_FLAGS = {"aggregator": "aggregator", "pca_components": "feature_size", "num_layers": "num_layers",
                      "num_clusters": "num_clusters", "output_dim": "output_dim",
                      "normalize_input": "normalize_input"}
ARCHITECTURE_DEFAULTS = {"aggregator": "tca", "feature_size": 1024, "num_layers": 1, "num_clusters": 256,
                         "output_dim": 1024, "normalize_input": False}

# A batch's longest chunk is at most this many times its shortest (plus a few
# frames, so short videos do not end up one length per batch): attention runs
# on the padded (n, T, T) batch, and a frame budget alone puts 30 to ~234
# frame chunks in one batch (bench/NOTES.md).
BATCH_LENGTH_SPREAD, BATCH_LENGTH_SLACK = 1.15, 8

EncodedBatch = collections.namedtuple("EncodedBatch", "indices embeddings frames num_frames")


def parse_metrics(text):
    """--metric: one name, a comma-separated list or 'all' -> list of names."""
    metrics = list(METRICS) if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise UserError(f"--metric {text}: choose from {', '.join(METRICS)} (comma-separated) or all")
    return list(dict.fromkeys(metrics))


def load_model(model_path, flags, device):
    """The model of a checkpoint, in eval mode. A self-describing checkpoint
    (train.py's {"model", "model_args"}) rebuilds itself; a flag in `flags`
    (architecture flag -> value, None = not given) that contradicts it is an
    error naming both values. A bare state dict (upstream's, or an earlier
    model.pth) takes its architecture from the flags, else from the args.json
    train.py wrote next to it, else upstream's defaults."""
    import model as models
    state_dict, model_args = load_checkpoint(model_path)
    given = {ARCHITECTURE_FLAGS[flag]: value for flag, value in flags.items() if value is not None}
    if model_args is not None:
        for name, value in given.items():
            if name in model_args and model_args[name] != value:
                flag = next(f for f, n in ARCHITECTURE_FLAGS.items() if n == name)
                raise UserError(f"{model_path}: the checkpoint was trained with --{flag} {model_args[name]}, "
                                f"not {value}")
        architecture = dict(model_args)
    else:
        architecture = dict(ARCHITECTURE_DEFAULTS)
        architecture.update(_args_json_architecture(model_path))
        architecture.update(given)
    architecture["dropout"] = 0.0  # eval mode: no dropout anyway
    try:
        model = models.build_model(**architecture)
        model.load_state_dict(state_dict)
    except ValueError as e:  # an unknown aggregator or impossible sizes
        raise UserError(f"{model_path}: {e}") from None
    except (RuntimeError, TypeError) as e:
        first = " ".join(str(e).strip().splitlines()[0:2])
        raise UserError(f"{model_path}: does not fit a {architecture.get('aggregator')} model with these "
                        f"flags ({first})") from None
    return model.to(device).eval()


def _args_json_architecture(model_path):
    """The architecture recorded in the args.json next to a bare state dict."""
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "args.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    return {name: saved[flag] for flag, name in ARCHITECTURE_FLAGS.items() if flag in saved}


def _chunk_bounds(num_frames, padding_size):
    """Deterministic chunks [(start, stop)] of at most padding_size frames (0: whole video)."""
    if padding_size <= 0 or num_frames <= padding_size:
        return [(0, num_frames)]
    pieces = -(-num_frames // padding_size)  # ceil
    # as np.array_split: the first num_frames % pieces chunks get one frame more
    sizes = [num_frames // pieces + (i < num_frames % pieces) for i in range(pieces)]
    edges = np.cumsum([0] + sizes)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def find_features(features, feature_path, benchmark, ids, what, channels=None):
    """The ids of `ids` that have features (of at least one frame), their keys
    in the HDF5 file and their lengths (int64 array); the others are reported
    and left out, as upstream leaves them out of the available subset.
    channels: the feature size the model takes (None: whatever the first
    video has, the same for all)."""
    found, missing = [], []
    for v in tqdm(ids, desc=f"{what}: finding features", leave=False):
        key = next((k for k in benchmark.feature_keys(v) if k in features), None)
        shape = features[key].shape if key is not None else (0,)
        if shape[0] == 0:
            missing.append(v)
            continue
        if len(shape) != 2 or shape[1] != (channels or shape[-1]):
            raise UserError(f"{feature_path}: video {key} has features of shape {shape}, expected "
                            f"(frames, {channels})" + (" (see --pca_components)" if channels else ""))
        channels = channels or shape[1]
        found.append((v, key, shape[0]))
    if missing:
        print(f"warning: {len(missing)} of {len(ids)} {what} have no features in {feature_path} "
              f"(e.g. {missing[0]}); they are left out")
    return [f[0] for f in found], [f[1] for f in found], np.array([f[2] for f in found], dtype=np.int64)


def encode_videos(model, features, keys, lengths, *, video_level=True, frame_level=False, padding_size=300,
                  frames_per_batch=FRAMES_PER_BATCH, device="cpu", desc="videos"):
    """Read and encode the videos `keys` (of `lengths` frames) of an open
    feature file, in batches of similar length; model None is the baseline
    (mean frame / the frames themselves). Yields EncodedBatch(indices into
    keys (n,), embeddings (n, C) L2-normalised video embeddings or None,
    frames (n, T, C) padded frame embeddings or None, num_frames (n,) or
    None) with what video_level and frame_level ask for."""
    import torch
    # sort by chunk length (= video length up to padding_size): the chunks of
    # a batch then differ by a few frames (bench/NOTES.md: the padding this leaves)
    pieces = -(-lengths // padding_size) if padding_size > 0 else np.ones_like(lengths)
    chunk_lengths = -(-lengths // pieces)
    order = np.lexsort((lengths, chunk_lengths))
    encodes_frames = getattr(model, "encodes_frames", True)
    with tqdm(total=len(keys), desc=desc, unit="video") as progress:
        for start, stop in length_buckets(chunk_lengths[order].tolist(), frames_per_batch, BATCH_LENGTH_SPREAD,
                                          BATCH_LENGTH_SLACK, pieces[order].tolist()):
            batch = order[start:stop]
            chunks, owner = [], []  # owner: which video of the batch each chunk belongs to
            for j, i in enumerate(batch):
                video = torch.from_numpy(read_features(features, keys[i]))
                for a, b in _chunk_bounds(len(video), padding_size):
                    chunks.append(video[a:b])
                    owner.append(j)
            owner = torch.tensor(owner, device=device)
            embeddings = frames = video_frames = None
            with torch.no_grad():
                if model is None or frame_level:
                    padded, chunk_frames = pad_sequences(chunks, device=device)  # (K, T, C), (K,)
                else:
                    chunk_frames = torch.tensor([len(c) for c in chunks], device=device)
                if model is None:  # baseline: the mean frame, the frames themselves
                    chunk_embeddings = padded.sum(1) / chunk_frames.unsqueeze(1) if video_level else None  # (K, C)
                    encoded = l2_normalize(padded) if frame_level else None
                elif video_level and frame_level:  # one pass of the model for both
                    chunk_embeddings, encoded = model.forward_and_encode(padded.transpose(1, 2), chunk_frames)
                elif video_level:  # the aggregators take the list itself (TCA without a padded copy)
                    chunk_embeddings = model(chunks)  # (K, C')
                else:
                    encoded = model.encode(padded.transpose(1, 2), chunk_frames)  # (K, T, C') or (K, clusters, C')
                if video_level:
                    # length-weighted mean of the chunks, then L2-normalised (one chunk: unchanged)
                    weights = chunk_frames.unsqueeze(1).to(chunk_embeddings.dtype)
                    summed = chunk_embeddings.new_zeros(len(batch), chunk_embeddings.shape[1])
                    embeddings = l2_normalize(summed.index_add_(0, owner, chunk_embeddings * weights))
                if frame_level:
                    if not encodes_frames:  # the VLADs: one descriptor per cluster
                        chunk_frames = torch.full_like(chunk_frames, encoded.shape[1])
                    per_video = [[] for _ in batch]
                    for k, j in enumerate(owner.tolist()):
                        per_video[j].append(encoded[k, :chunk_frames[k]])
                    frames, video_frames = pad_sequences([torch.cat(v) for v in per_video], device=device)
            yield EncodedBatch(batch, embeddings, frames, video_frames)
            progress.update(len(batch))


def database_shard(lengths, rank, size):
    """The positions of the database videos that rank `rank` of `size` reads
    and scores: videos go, longest first, to the rank with the fewest frames
    so far, so the ranks finish together. Deterministic."""
    if size == 1:
        return np.arange(len(lengths))
    return np.flatnonzero(balanced_owners(lengths, size) == rank)


def model_similarities(model, features, feature_path, benchmark, metrics, padding_size=300,
                       frames_per_batch=FRAMES_PER_BATCH, device="cpu", dist=None):
    """Encode the benchmark's queries and database with `model` (None: the
    baseline) and score them with every metric of `metrics`, reading and
    encoding each video once. Under Horovod (dist.size > 1) each rank reads
    and scores its share of the database and every rank gets the gathered
    result. Returns (query ids, database ids, {metric: (Q, D) float32
    array}, timing/storage stats)."""
    import torch
    from similarity import chamfer_similarities, chamfer_similarity, cosine_similarity
    rank, size = (dist.rank, dist.size) if dist is not None else (0, 1)
    started = time.perf_counter()
    channels = getattr(model, "feature_size", None)
    query_ids, query_keys, query_lengths = find_features(features, feature_path, benchmark, benchmark.queries,
                                                         "queries", channels)
    database_ids, database_keys, database_lengths = find_features(features, feature_path, benchmark,
                                                                  benchmark.database, "database videos", channels)
    if not query_ids or not database_ids:
        raise UserError(f"{feature_path}: no features for the {benchmark.name} "
                        f"{'queries' if not query_ids else 'database'} (are these the right features?)")
    video_level = "cosine" in metrics
    frame_level = "chamfer" in metrics or "symmetric_chamfer" in metrics
    encode = functools.partial(encode_videos, model, features, video_level=video_level, frame_level=frame_level,
                               padding_size=padding_size, frames_per_batch=frames_per_batch, device=device)

    t0 = time.perf_counter()
    query_embeddings, query_frames = [None] * len(query_ids), [None] * len(query_ids)
    for batch in encode(query_keys, query_lengths, desc="queries"):
        for n, i in enumerate(batch.indices):
            if video_level:
                query_embeddings[i] = batch.embeddings[n]
            if frame_level:
                query_frames[i] = batch.frames[n, :batch.num_frames[n]]
    query_embeddings = torch.stack(query_embeddings) if video_level else None  # (Q, C)
    query_frames = pad_sequences(query_frames, device=device) if frame_level else None  # (Q, T, C), (Q,)
    query_seconds = time.perf_counter() - t0

    shard = database_shard(database_lengths, rank, size)
    columns = {m: np.full((len(shard), len(query_ids)), np.nan, dtype=np.float32) for m in metrics}  # (D_r, Q)
    similarity_seconds, stored = 0.0, np.zeros(2, dtype=np.int64)  # values kept: video embeddings, frames
    t0 = time.perf_counter()
    for batch in encode([database_keys[i] for i in shard], database_lengths[shard],
                        desc="database" if size == 1 else f"database (rank {rank})"):
        t1 = time.perf_counter()
        with torch.no_grad():
            scores = {}
            if video_level:
                scores["cosine"] = cosine_similarity(query_embeddings, batch.embeddings)
                stored[0] += batch.embeddings.numel()
            if "symmetric_chamfer" in metrics:
                scores["chamfer"], scores["symmetric_chamfer"] = chamfer_similarities(*query_frames, batch.frames,
                                                                                     batch.num_frames)
            elif "chamfer" in metrics:
                scores["chamfer"] = chamfer_similarity(*query_frames, batch.frames, batch.num_frames)
            if frame_level:
                stored[1] += int(batch.num_frames.sum()) * batch.frames.shape[2]
        for m in metrics:
            columns[m][batch.indices] = scores[m].t().cpu().numpy()
        similarity_seconds += time.perf_counter() - t1
    database_seconds = time.perf_counter() - t0 - similarity_seconds

    if size > 1:
        stored = dist.hvd.allreduce(torch.from_numpy(stored), op=dist.hvd.Sum, name="stored").numpy()
        shard, columns = gather_rows(dist, shard, columns)
    similarities = {}
    for m in metrics:
        full = np.empty((len(query_ids), len(database_ids)), dtype=np.float32)
        full[:, shard] = columns[m].T
        similarities[m] = full
    stats = {"seconds": time.perf_counter() - started,  # reading, encoding, scoring, gathering: the whole job
             "s_per_query": (query_seconds + similarity_seconds) / len(query_ids),
             "database_s_per_video": database_seconds * size / len(database_ids),  # this rank's share
             "storage_kb_per_video": {m: stored[0 if m == "cosine" else 1] * 4 / 1024 / len(database_ids)
                                      for m in metrics}}  # float32
    return query_ids, database_ids, similarities, stats


def gather_rows(dist, positions, rows):
    """Every rank's (positions (n_r,), {name: (n_r, Q) rows}) concatenated in
    rank order, on every rank (Horovod allgather)."""
    import torch
    positions = dist.hvd.allgather(torch.from_numpy(positions.astype(np.int64)), name="positions").numpy()
    gathered = {name: dist.hvd.allgather(torch.from_numpy(r), name=f"rows.{name}").numpy()
                for name, r in rows.items()}
    return positions, gathered


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
    outputs = [similarity_path(args.save_similarities, m, metrics) for m in metrics if args.save_similarities]
    for path in outputs + [p for p in (args.json_out, args.results_csv, args.pr_curve, args.plot, args.per_query) if p]:
        check_writable(path)  # now, not after encoding the whole benchmark

    benchmark = load_benchmark(args.dataset, args.annotation_dir)
    benchmark.check_protocol(args.protocol)
    stats, dist = {}, None
    if args.similarities:
        query_ids, database_ids, similarities = load_similarities(args.similarities)
        similarities = {"precomputed": similarities}
    else:
        dist = init_distributed()
        device = local_device(dist, args.device)
        model = None
        if not args.baseline:
            flags = {flag: getattr(args, flag) for flag in ARCHITECTURE_FLAGS}
            model = load_model(args.model_path, flags, device)
        with open_features(args.feature_path) as features:
            query_ids, database_ids, similarities, stats = model_similarities(
                model, features, args.feature_path, benchmark, metrics, padding_size=args.padding_size,
                frames_per_batch=args.frames_per_batch, device=device, dist=dist)
        if dist.rank != 0:
            return  # rank 0 evaluates and writes every output

    evaluations = {m: benchmark.evaluate_with_details(query_ids, database_ids, similarities[m],
                                                      log=print if i == 0 else lambda *a: None, protocol=args.protocol)
                   for i, m in enumerate(metrics)}
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
