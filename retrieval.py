"""Retrieval: HDF5 frame features -> TCA_c / TCA_f embeddings -> similarity
scores, in shards. What evaluation.py, train.py's validation, index.py and
search.py all do with a model, once:

- load_model: a checkpoint (self-describing, or a bare state dict with
  architecture flags) as a model in eval mode;
- find_features: which videos of a benchmark have features, and how long;
- encode_videos: read and encode videos in batches of similar length, each
  video cut into chunks of at most padding_size frames (the video embedding
  is the L2-normalised, length-weighted mean of its chunks', the frame
  embeddings are the chunks' concatenated);
- model_similarities: a benchmark's queries against its database with every
  metric (cosine = TCA_c, chamfer = TCA_f, symmetric_chamfer = TCA_sym),
  reading and encoding each video once; under Horovod each rank scores its
  share of the database (database_shard) and the rows are gathered
  (utils.gather_rows);
- score_benchmark / evaluate_model: the above, then the benchmark's mAP;
- load_similarities / save_similarities: scores in a file, JSON {query:
  {video: score}} (the ViSiL / FIVR-200K result format) or .npz / .h5.

Nothing here parses flags or writes files: the entry points do.
"""
import collections
import functools
import json
import os
import time

import h5py
import numpy as np
from tqdm import tqdm

from utils import (FRAMES_PER_BATCH, UserError, atomic_path, check_input_file, gather_rows, l2_normalize,
                   length_buckets, load_checkpoint, open_features, pad_sequences, rank_share, read_features)

# torch, model and similarity are imported inside the functions that use
# them: evaluating a similarity file imports this module's callers but needs
# no torch, and `import torch` alone is most of that run's start-up
# (bench/NOTES.md).


# Frames per chunk a video is encoded in: the training window, what
# upstream's README evaluates with (evaluation.py --padding_size's default).
PADDING_SIZE = 300

# the similarity of each --metric and the paper's name for it
METRICS = {"cosine": "TCA_c", "chamfer": "TCA_f", "symmetric_chamfer": "TCA_sym"}

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
    (model.ARCHITECTURE_FLAGS flag -> value, None = not given) that
    contradicts it is an error naming both values. A bare state dict
    (upstream's, or an earlier model.pth) takes its architecture from the
    flags, else from the args.json train.py wrote next to it, else
    build_model's defaults (upstream's)."""
    import inspect

    import model as models
    state_dict, model_args = load_checkpoint(model_path)
    given = {models.ARCHITECTURE_FLAGS[flag]: value for flag, value in flags.items() if value is not None}
    if model_args is not None:
        for name, value in given.items():
            if name in model_args and model_args[name] != value:
                flag = next(f for f, n in models.ARCHITECTURE_FLAGS.items() if n == name)
                raise UserError(f"{model_path}: the checkpoint was trained with --{flag} {model_args[name]}, "
                                f"not {value}")
        architecture = dict(model_args)
    else:
        architecture = _args_json_architecture(model_path, models.ARCHITECTURE_FLAGS) | given
    architecture["dropout"] = 0.0  # eval mode: no dropout anyway
    try:
        model = models.build_model(**architecture)
        model.load_state_dict(state_dict)
    except ValueError as e:  # an unknown aggregator or impossible sizes
        raise UserError(f"{model_path}: {e}") from None
    except (RuntimeError, TypeError) as e:
        first = " ".join(str(e).strip().splitlines()[0:2])
        aggregator = architecture.get("aggregator",
                                      inspect.signature(models.build_model).parameters["aggregator"].default)
        raise UserError(f"{model_path}: does not fit a {aggregator} model with these flags ({first})") from None
    return model.to(device).eval()


def _args_json_architecture(model_path, architecture_flags):
    """The architecture (build_model arguments) recorded in the args.json next
    to a bare state dict; architecture_flags: model.ARCHITECTURE_FLAGS."""
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "args.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    return {name: saved[flag] for flag, name in architecture_flags.items() if flag in saved}


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


def encode_videos(model, features, keys, lengths, *, video_level=True, frame_level=False, padding_size=PADDING_SIZE,
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
            _check_finite_embeddings(features, keys, batch, embeddings, frames)
            yield EncodedBatch(batch, embeddings, frames, video_frames)
            progress.update(len(batch))


def _check_finite_embeddings(features, keys, batch, *embeddings):
    """A non-finite embedding (n, ...) is an error naming its video: its
    similarities would be NaN, which ranking takes for "not computed" and
    silently leaves out. The features were checked finite on reading and the
    checkpoint's weights on loading, so it is finite input too large for the
    model (e.g. 1e30 overflows attention)."""
    import torch
    for tensor in embeddings:
        if tensor is None:
            continue
        finite = torch.isfinite(tensor).flatten(1).all(1)  # (n,)
        if not finite.all():
            key = keys[batch[int(torch.nonzero(~finite)[0, 0])]]
            raise UserError(f"{getattr(features, 'filename', '')}: video {key}: its embedding is not finite "
                            "(NaN or infinity) though its features and the model's weights are: feature values "
                            "too large for this model? (PCA-whitened features are of order 1)")


def database_shard(lengths, rank, size):
    """The positions of the database videos (of `lengths` frames) that rank
    `rank` of `size` reads and scores: shared by frames (utils.rank_share),
    so the ranks finish together."""
    return rank_share(lengths, rank, size)


def model_similarities(model, features, feature_path, benchmark, metrics, padding_size=PADDING_SIZE,
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
            if not np.isfinite(columns[m][batch.indices]).all():  # embeddings are finite: should never happen
                d, q = np.argwhere(~np.isfinite(columns[m][batch.indices]))[0]
                raise UserError(f"{feature_path}: video {database_keys[shard[batch.indices[d]]]}: its {m} "
                                f"similarity to query {query_ids[q]} is not finite")
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


# --------------------------------------------------------------------------
# similarity files: JSON {query: {video: score}} (the ViSiL / FIVR-200K
# result format), or .npz / .h5 with `queries`, `database`, `similarities`

def load_similarities(path):
    """Read a similarity file. Returns (query ids, database ids, (Q, D) array);
    entries a JSON file does not give are NaN."""
    check_input_file(path, "similarity file")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".json":
            queries, database, similarities = _similarities_from_json(path)
            _check_scores(path, queries, database, similarities)
            return queries, database, similarities
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
    _check_scores(path, queries, database, similarities)
    return queries, database, similarities


def _unique_keys(pairs):
    """object_pairs_hook: a JSON object listing a key twice is an error, not
    the silent last-one-wins of json.load."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise UserError(f"lists {duplicate!r} twice in one object")
    return result


def _similarities_from_json(path):
    try:
        with open(path) as f:
            results = json.load(f, object_pairs_hook=_unique_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
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
    for i, (query, res) in enumerate(results.items()):
        bad = next((v for v, s in res.items() if type(s) not in (int, float)), None)  # not bool, not "0.9"
        if bad is not None:
            raise UserError(f"{path}: query {query}, video {bad}: score {res[bad]!r} is not a number")
        columns = np.fromiter(map(column_of.__getitem__, res), np.int64, len(res))
        similarities[i, columns] = np.fromiter(res.values(), np.float64, len(res))
    return list(results), list(column_of), similarities


def _check_scores(path, queries, database, similarities):
    """NaN means "not computed"; an id listed twice, an infinite score, or a
    file with no score at all, is an error naming the file (and the id or pair)."""
    for kind, ids in (("query", queries), ("database", database)):
        seen = set()
        twice = next((v for v in ids if v in seen or seen.add(v)), None)
        if twice is not None:
            raise UserError(f"{path}: lists the {kind} id {twice!r} twice")
    infinite = np.isinf(similarities)
    if infinite.any():
        i, j = np.argwhere(infinite)[0]
        raise UserError(f"{path}: query {queries[i]}, video {database[j]}: score {similarities[i, j]} is not finite")
    if similarities.size and np.isnan(similarities).all():
        raise UserError(f"{path}: every score is NaN (not computed)")


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



Scored = collections.namedtuple("Scored", "query_ids database_ids similarities stats evaluations")


def score_benchmark(model, benchmark, feature_path, metrics, padding_size=PADDING_SIZE, frames_per_batch=FRAMES_PER_BATCH,
                    device=None, dist=None, protocol="available", log=print):
    """Encode and score a benchmark with `model` (None: the baseline) on the
    features of `feature_path`, then evaluate it: what `evaluation.py` does
    in model mode. The model is run in eval mode (its train/eval state is
    restored afterwards); device None: the model's own (cpu for the
    baseline). Returns Scored(query ids, database ids, {metric: (Q, D)
    similarities}, stats (see model_similarities), {metric:
    data.Evaluation}); under Horovod every rank encodes and scores its share
    and gets the similarities, rank 0 alone evaluates (evaluations None on
    the others). `log` prints the evaluation's warnings (missing queries,
    ...) once."""
    if device is None:
        device = next(model.parameters()).device if model is not None else "cpu"
    training = model is not None and model.training
    if model is not None:
        model.eval()
    try:
        with open_features(feature_path) as features:
            query_ids, database_ids, similarities, stats = model_similarities(
                model, features, feature_path, benchmark, metrics, padding_size=padding_size,
                frames_per_batch=frames_per_batch, device=device, dist=dist)
    finally:
        if training:
            model.train()
    evaluations = None
    if dist is None or dist.rank == 0:
        evaluations = evaluate_similarities(benchmark, query_ids, database_ids, similarities, protocol, log)
    return Scored(query_ids, database_ids, similarities, stats, evaluations)


def evaluate_similarities(benchmark, query_ids, database_ids, similarities, protocol="available", log=print):
    """{metric: data.Evaluation} of {metric: (Q, D) similarities}; `log`
    prints the warnings of the first metric only (they are the same ids)."""
    return {m: benchmark.evaluate_with_details(query_ids, database_ids, s, log=log if i == 0 else lambda *a: None,
                                               protocol=protocol)
            for i, (m, s) in enumerate(similarities.items())}


def evaluate_model(model, benchmark, feature_path, metrics=("cosine",), padding_size=PADDING_SIZE, dist=None, **kwargs):
    """The benchmark's metrics of `model` on the features of `feature_path`:
    {metric: {"DSVR": mAP, ...}} on rank 0, None on the other ranks (which
    must call it too: each scores its share). Exactly the computation of
    `evaluation.py` (score_benchmark); kwargs: frames_per_batch, device,
    protocol, log."""
    evaluations = score_benchmark(model, benchmark, feature_path, list(metrics), padding_size, dist=dist,
                                  **kwargs).evaluations
    return None if evaluations is None else {m: e.metrics for m, e in evaluations.items()}


# --------------------------------------------------------------------------
# coarse to fine: a TCA_c shortlist re-scored by a frame-level metric
# (search.py's two stages; evaluation.py --shortlist measures them)

# Added to a shortlisted video's frame-level score so it ranks above every
# video outside the shortlist, whose cosine is at most 1 (a chamfer is >= -1).
SHORTLIST_OFFSET = 3.0
# search.py's --shortlist: the smallest K that kept >= 99% of exhaustive TCA_f
# mAP on every task of the demo benchmark (bench/NOTES.md, 'Coarse to fine';
# bench/shortlist.py measures it again)
DEFAULT_SHORTLIST = 50


def frame_scores(query_frames, videos, metric, device="cpu", frames_per_batch=FRAMES_PER_BATCH):
    """`metric` (chamfer: TCA_f, symmetric_chamfer: TCA_sym) of one query's
    frame embeddings (Tq, C) against each video of `videos` [(T_i, C)], in
    batches of similar length so little goes to padding; (n,) float32 numpy."""
    import torch

    from similarity import chamfer_similarity, symmetric_chamfer_similarity
    score = {"chamfer": chamfer_similarity, "symmetric_chamfer": symmetric_chamfer_similarity}[metric]
    query = torch.as_tensor(query_frames, dtype=torch.float32, device=device)[None]  # (1, Tq, C)
    lengths = np.array([len(v) for v in videos], dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    scores = np.empty(len(videos), dtype=np.float32)
    with torch.no_grad():
        for start, stop in length_buckets(lengths[order].tolist(), frames_per_batch, BATCH_LENGTH_SPREAD,
                                          BATCH_LENGTH_SLACK):
            batch = order[start:stop]
            padded, num_frames = pad_sequences([torch.as_tensor(videos[i]) for i in batch], device=device)
            scores[batch] = score(query, None, padded, num_frames)[0].cpu().numpy()
    return scores


def shortlist_ranking(coarse, fine, shortlists):
    """(Q, D) scores ranking each query's shortlist (Q, K column indices) by
    its frame-level scores fine (Q, K), above the rest, which keep their
    TCA_c order (coarse (Q, D)): so a protocol's relevant set never loses a
    video, and a shortlist of every video is the frame-level ranking itself."""
    ranked = np.array(coarse, dtype=np.float32, copy=True)
    np.put_along_axis(ranked, shortlists, np.asarray(fine, dtype=np.float32) + SHORTLIST_OFFSET, axis=1)
    return ranked


def rerank_shortlists(model, features, query_keys, query_lengths, database_keys, database_lengths, shortlists,
                      metric, padding_size=PADDING_SIZE, frames_per_batch=FRAMES_PER_BATCH, device="cpu"):
    """The frame-level `metric` of each query (of an open feature file)
    against the database videos of its shortlist (Q, K indices into
    database_keys), encoding each shortlisted video once and comparing only
    the shortlisted pairs. Returns (fine (Q, K) float32, frame pairs
    compared)."""
    encode = functools.partial(encode_videos, model, features, video_level=False, frame_level=True,
                               padding_size=padding_size, frames_per_batch=frames_per_batch, device=device)
    query_frames = [None] * len(query_keys)
    for batch in encode(query_keys, query_lengths, desc="queries (frames)"):
        for n, i in enumerate(batch.indices):
            query_frames[i] = batch.frames[n, :batch.num_frames[n]]
    needed = np.unique(shortlists)
    wanted = collections.defaultdict(list)  # database index -> [(query, slot in its shortlist)]
    for q, row in enumerate(shortlists):
        for slot, d in enumerate(row.tolist()):
            wanted[d].append((q, slot))
    fine, pairs = np.full(shortlists.shape, np.nan, dtype=np.float32), 0
    for batch in encode([database_keys[i] for i in needed], database_lengths[needed], desc="shortlisted videos"):
        by_query = collections.defaultdict(list)  # query -> [(video of the batch, slot)]
        for n, i in enumerate(batch.indices.tolist()):
            for q, slot in wanted[int(needed[i])]:
                by_query[q].append((n, slot))
        for q, hits in by_query.items():
            videos = [batch.frames[n, :batch.num_frames[n]] for n, _ in hits]
            fine[q, [slot for _, slot in hits]] = frame_scores(query_frames[q], videos, metric, device,
                                                               frames_per_batch)
            pairs += int(query_lengths[q]) * sum(int(database_lengths[needed[batch.indices[n]]]) for n, _ in hits)
    return fine, pairs


def shortlist_similarities(model, benchmark, feature_path, metric, shortlist, padding_size=PADDING_SIZE,
                           frames_per_batch=FRAMES_PER_BATCH, device="cpu"):
    """evaluation.py --shortlist: the benchmark scored as search.py scores a
    collection, exhaustively measured. TCA_c of every pair, then each query's
    top-`shortlist` re-scored by the frame-level `metric` and ranked above the
    rest (shortlist_ranking). Returns (query ids, database ids, {metric:
    (Q, D)}, stats: model_similarities' (of the cosine pass) plus the frame
    pairs compared and those of an exhaustive `metric`)."""
    with open_features(feature_path) as features:
        query_ids, database_ids, similarities, stats = model_similarities(
            model, features, feature_path, benchmark, ["cosine"], padding_size, frames_per_batch, device)
        coarse = similarities["cosine"]

        def located(ids):  # the keys and lengths find_features found (it has warned about the others)
            keys = [next(k for k in benchmark.feature_keys(v) if k in features) for v in ids]
            return keys, np.array([features[k].shape[0] for k in keys], dtype=np.int64)
        query_keys, query_lengths = located(query_ids)
        database_keys, database_lengths = located(database_ids)
        t0 = time.perf_counter()
        shortlists = np.argsort(-coarse, axis=1, kind="stable")[:, :min(shortlist, len(database_ids))]  # (Q, K)
        fine, pairs = rerank_shortlists(model, features, query_keys, query_lengths, database_keys, database_lengths,
                                        shortlists, metric, padding_size, frames_per_batch, device)
    stats["s_per_query"] += (time.perf_counter() - t0) / len(query_ids)
    stats["storage_kb_per_video"] = {metric: stats["storage_kb_per_video"]["cosine"]}  # the index; frames on disk
    stats["frame_pairs"] = pairs
    stats["exhaustive_frame_pairs"] = int(query_lengths.sum()) * int(database_lengths.sum())
    return query_ids, database_ids, {metric: shortlist_ranking(coarse, fine, shortlists)}, stats
