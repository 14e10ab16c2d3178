"""The first stage of search.py: TCA_c top-1000 from a FAISS index, exact
(IndexFlatIP, the reference; also sharded over 2 processes, as search.py
under horovodrun -np 2 splits it) against compressed / partitioned candidates.

Synthetic 1024-d embeddings, generated (never stored) in float16 chunks from
a seed, of two kinds, each with `queries` queries and a planted group of
copies per query at graded cosine similarity (the bands, 0.95 down to 0.35):
  clustered  every video near one of `topics` centres (as real collections
             are: topics), the queries and their copies drawn from a topic
  isotropic  uniform on the sphere: the worst case for any partition
For each index and search setting: build (train + add) seconds, bytes per
video resident (the serialised index / videos), ms per query (a batch of
every query, k = shortlist), the fraction of planted copies in the top
`shortlist` by band, and the top-`top_k` mAP after the shortlist is re-scored
exactly (search.py's stage 1 then exact cosine; relevant = the planted copies).
The candidates are trained as index.py trains them (index_store.new_faiss_index,
index_store.TRAIN_SIZE evenly spread embeddings). HNSW32 holds the full vectors
plus its graph (~4.4 KB a video, 17x the issue's 256-byte budget) and is the
longest to build (most of this section's hour on 2 cores).
"""
import gc
import multiprocessing
import time

import numpy as np

from bench.common import Target, fmt, interleaved, per_round, summary, table
import index_store
from index_store import new_faiss_index
from metrics import average_precision

BANDS = (0.95, 0.83, 0.71, 0.59, 0.47, 0.35)  # cosine of a planted copy to its query

# (factory, search parameter, its values); Flat is the reference and always runs
# (x4fs: FAISS's fast-scan PQ, 4-bit codes scanned with SIMD; PQ256x4fs is 128 B)
CANDIDATES = (("IVF4096,PQ256x4fs", "nprobe", (64, 256, 1024)),
              ("IVF1024,PQ256x4fs", "nprobe", (64, 256)),
              ("IVF1024,PQ128", "nprobe", (64, 256)),
              ("IVF4096,SQ8", "nprobe", (256,)),
              ("HNSW32", "efSearch", (64, 256)))
SIZES = {"full": dict(database=1_000_000, queries=100, channels=1024, topics=2000, topic_spread=2.0,
                      copies_per_band=2, shortlist=1000, top_k=100, train_size=index_store.TRAIN_SIZE,
                      chunk=50_000, candidates=CANDIDATES, kinds=("clustered", "isotropic"), repeats=2, shards=2),
         "quick": dict(database=4000, queries=10, channels=64, topics=40, topic_spread=2.0,
                       copies_per_band=1, shortlist=100, top_k=10, train_size=4000, chunk=1500,
                       candidates=(("IVF16,PQ8x4", "nprobe", (2, 16)), ("IVF16,PQ16x4fs", "nprobe", (16,)),
                                   ("HNSW8", "efSearch", (16,))),
                       kinds=("clustered", "isotropic"), repeats=1, shards=2)}
# the targets for index.py's default at 10^6 videos (index_store.default_factory,
# DEFAULT_NPROBE), on the clustered set
_DEFAULT = index_store.default_factory(SIZES["full"]["database"])
_AT = f"nprobe={index_store.DEFAULT_NPROBE}"
TARGETS = (
    Target(f"default {_DEFAULT} nprobe {index_store.DEFAULT_NPROBE} vs exact, clustered "
           "{config[database]:,}: speed-up", ("clustered", _DEFAULT, _AT, "speedup"), 20.0, "≥ 20×"),
    Target(f"default {_DEFAULT} nprobe {index_store.DEFAULT_NPROBE}, clustered "
           "{config[database]:,}: re-scored top-100 mAP / exact's",
           ("clustered", _DEFAULT, _AT, "map_vs_exact"), 0.99, "≥ 99%"),
    Target(f"default {_DEFAULT}, clustered " "{config[database]:,}: bytes per video resident",
           ("clustered", _DEFAULT, "bytes"), 256, "≤ 256", higher_is_better=False),
)


class Collection:
    """The synthetic database of one kind, regenerated chunk by chunk from
    its seed (float16, L2-normalised): rows [0, planted) are the copies
    (query i's are rows i * per_query ... (i + 1) * per_query), then the
    distractors. Holding it would take database x channels x 2 bytes."""

    def __init__(self, kind, size, seed):
        self.kind, self.size, self.seed = kind, size, seed
        C = size["channels"]
        rng = np.random.default_rng(seed)
        self.centres = _unit(rng.standard_normal((size["topics"], C))) if kind == "clustered" else None
        self.queries = self._videos(rng, size["queries"])  # (Q, C) float32
        self.per_query = len(BANDS) * size["copies_per_band"]
        self.cosines = np.repeat(BANDS, size["copies_per_band"])  # (per_query,)
        # the direction each copy moves away from its query in: another video of
        # its topic (clustered) or any direction, made orthogonal to the query
        away = self._videos(rng, size["queries"] * self.per_query, near=self.queries)
        away = away.reshape(size["queries"], self.per_query, C)
        query = self.queries[:, None, :]
        away = _unit(away - np.sum(away * query, axis=2, keepdims=True) * query)
        c = self.cosines[None, :, None]
        self.copies = (c * query + np.sqrt(1 - c ** 2) * away).reshape(-1, C).astype(np.float16)

    def _videos(self, rng, count, near=None):
        """count unit vectors: isotropic, or around a random topic centre
        (near: around the topic centre nearest each of these, repeated)."""
        C = self.size["channels"]
        noise = rng.standard_normal((count, C))
        if self.kind == "isotropic":
            return _unit(noise).astype(np.float32)
        if near is None:
            centres = self.centres[rng.integers(len(self.centres), size=count)]
        else:
            topic = np.argmax(near @ self.centres.T, axis=1)
            centres = self.centres[np.repeat(topic, count // len(near))]
        # spread s: a video's cosine to its centre is about 1 / sqrt(1 + s^2),
        # two videos of one topic about 1 / (1 + s^2)
        return _unit(centres + self.size["topic_spread"] * noise / np.sqrt(C)).astype(np.float32)

    def chunks(self, shard=0, shards=1):
        """(start, (n, C) float32) of the whole database, in order (of shard
        `shard` of `shards`: every shards-th chunk, the others not generated)."""
        planted, total, step = len(self.copies), self.size["database"], self.size["chunk"]
        for start in range(shard * step, total, shards * step):
            stop = min(start + step, total)
            rng = np.random.default_rng([self.seed, start])
            videos = self._videos(rng, stop - start).astype(np.float16)
            if start < planted:
                videos[:min(planted, stop) - start] = self.copies[start:min(planted, stop)]
            yield start, videos.astype(np.float32)

    def sample(self, count):
        """A training sample for the coarse quantizer / codes: the first rows
        after the copies (as index.py trains on the collection it indexes)."""
        rows = []
        for start, videos in self.chunks():
            rows.append(videos)
            if sum(len(r) for r in rows) >= count + len(self.copies):
                break
        return np.concatenate(rows)[len(self.copies):len(self.copies) + count]


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def build(factory, collection, train_size):
    index = new_faiss_index(factory, collection.size["channels"])  # as index.py makes it
    if not index.is_trained:
        index.train(collection.sample(train_size))
    for _, videos in collection.chunks():
        index.add(videos)
    return index


def _shard_worker(kind, size, seed, shard, shards, connection):
    """One rank of a sharded exact search: its chunks of the collection in
    an exact index (global ids), searched with one thread on request."""
    import faiss
    faiss.omp_set_num_threads(1)
    collection = Collection(kind, size, seed)
    index = faiss.IndexIDMap(faiss.IndexFlatIP(size["channels"]))
    for start, videos in collection.chunks(shard, shards):
        index.add_with_ids(videos, np.arange(start, start + len(videos), dtype=np.int64))
    connection.send("ready")
    while connection.recv():
        connection.send(index.search(collection.queries, size["shortlist"]))


class ShardedExact:
    """Exact search split over `shards` processes (spawned: FAISS's OpenMP does
    not survive a fork), each searching its shard; the top-k are merged here,
    as rank 0 merges them in search.py."""

    def __init__(self, kind, size, seed):
        context = multiprocessing.get_context("spawn")
        self.connections, self.workers = [], []
        for shard in range(size["shards"]):
            mine, theirs = context.Pipe()
            worker = context.Process(target=_shard_worker, args=(kind, size, seed, shard, size["shards"], theirs))
            worker.start()
            self.connections.append(mine)
            self.workers.append(worker)
        for connection in self.connections:
            connection.recv()
        self.k = size["shortlist"]

    def search(self):
        for connection in self.connections:
            connection.send(True)
        scores, ids = zip(*(connection.recv() for connection in self.connections))
        scores, ids = np.concatenate(scores, axis=1), np.concatenate(ids, axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :self.k]
        return np.take_along_axis(ids, order, axis=1)

    def close(self):
        for connection in self.connections:
            connection.send(False)
        for worker in self.workers:
            worker.join()


def rescored_map(collection, stored, ids, top_k):
    """Top-top_k mAP of each query's shortlist `ids` (Q, S) after exact
    re-scoring against `stored` (the float16 database), relevant = its copies."""
    Q, S = ids.shape
    valid = ids >= 0  # FAISS pads a short result with -1
    rows = stored[np.where(valid, ids, 0)].astype(np.float32)  # (Q, S, C)
    scores = np.einsum("qsc,qc->qs", rows, collection.queries)
    scores[~valid] = np.nan
    top = np.argsort(-np.nan_to_num(scores, nan=-np.inf), axis=1, kind="stable")[:, :top_k]
    kept = np.full_like(scores, np.nan)
    np.put_along_axis(kept, top, np.take_along_axis(scores, top, axis=1), axis=1)
    relevant = valid & (ids // collection.per_query == np.arange(Q)[:, None]) & (ids < len(collection.copies))
    ap = average_precision(kept, relevant, True, num_relevant=np.full(Q, collection.per_query))
    return float(np.mean(ap))


def found_by_band(collection, ids):
    """Fraction of the planted copies in each query's shortlist, by band."""
    Q = ids.shape[0]
    expected = np.arange(Q)[:, None] * collection.per_query + np.arange(collection.per_query)  # (Q, per_query)
    found = np.array([np.isin(expected[q], ids[q]) for q in range(Q)])  # (Q, per_query)
    return {f"{band:.2f}": float(found[:, collection.cosines == band].mean()) for band in BANDS}


def run(size):
    import faiss
    result = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in size.items()},
              "faiss": faiss.__version__, "threads": faiss.omp_get_max_threads(), "bands": list(BANDS)}
    for seed, kind in enumerate(size["kinds"]):
        collection = Collection(kind, size, seed)
        queries, S = collection.queries, size["shortlist"]
        stored = np.concatenate([v.astype(np.float16) for _, v in collection.chunks()])  # for re-scoring only
        started = time.perf_counter()
        exact = build("Flat", collection, size["train_size"])
        exact_build = time.perf_counter() - started
        _, exact_ids = exact.search(queries, S)
        out = {"Flat": {"build_seconds": exact_build, "bytes_per_video": len(faiss.serialize_index(exact)) / exact.ntotal,
                        "exact": {"found_by_band": found_by_band(collection, exact_ids),
                                  "map": rescored_map(collection, stored, exact_ids, size["top_k"])}}}
        exact_map = out["Flat"]["exact"]["map"]
        started = time.perf_counter()
        sharded = ShardedExact(kind, size, seed)
        out["Flat"]["sharded_build_seconds"] = time.perf_counter() - started
        try:
            seconds = interleaved({"exact": lambda: exact.search(queries, S), "sharded": sharded.search},
                                  size["repeats"], size["warmup"])
            ids = sharded.search()
        finally:
            sharded.close()
        same = np.mean([set(a) == set(b) for a, b in zip(ids, exact_ids)])
        out["Flat"]["sharded"] = {
            "shards": size["shards"], "same_shortlists": float(same),
            "ms_per_query": summary([1000 * s / len(queries) for s in seconds["sharded"]], "ms"),
            "speedup": summary(per_round(lambda e, c: e / c, seconds["exact"], seconds["sharded"]), "x"),
            "found_by_band": found_by_band(collection, ids), "map": rescored_map(collection, stored, ids, size["top_k"])}
        out["Flat"]["ms_per_query"] = [1000 * s / len(queries) for s in seconds["exact"]]
        for factory, parameter, values in size["candidates"]:
            started = time.perf_counter()
            index = build(factory, collection, size["train_size"])
            entry = {"build_seconds": time.perf_counter() - started,
                     "bytes_per_video": len(faiss.serialize_index(index)) / index.ntotal}
            entry["bytes"] = summary([entry["bytes_per_video"]], "B")
            space = faiss.ParameterSpace()

            def search_at(value):
                space.set_index_parameter(index, parameter, value)
                return index.search(queries, S)[1]
            contenders = {"exact": lambda: exact.search(queries, S)}
            contenders |= {f"{parameter}={v}": (lambda v=v: search_at(v)) for v in values}
            seconds = interleaved(contenders, size["repeats"], size["warmup"])
            out["Flat"]["ms_per_query"].extend(1000 * s / len(queries) for s in seconds["exact"])
            for v in values:
                name = f"{parameter}={v}"
                ids = search_at(v)
                entry[name] = {"ms_per_query": summary([1000 * s / len(queries) for s in seconds[name]], "ms"),
                               "speedup": summary(per_round(lambda e, c: e / c, seconds["exact"], seconds[name]), "x"),
                               "found_by_band": found_by_band(collection, ids),
                               "map": rescored_map(collection, stored, ids, size["top_k"])}
                entry[name]["map_vs_exact"] = summary([entry[name]["map"] / exact_map])
            out[factory] = entry
            index = None  # freed before the next one is built (search_at names it)
            gc.collect()
        out["Flat"]["ms_per_query"] = summary(out["Flat"]["ms_per_query"], "ms")
        result[kind] = out
        exact = stored = None
        gc.collect()
    return result


def render(result, meta):
    c = result["config"]
    lines = ["## First stage of search: FAISS indexes on synthetic TCA_c embeddings\n",
             f"{c['database']:,} × {c['channels']}-d embeddings per kind, {c['queries']} queries, "
             f"{c['copies_per_band']} planted copies per query at each cosine band; top-{c['shortlist']} "
             f"shortlist, top-{c['top_k']} mAP after exact re-scoring (relevant = the planted copies). "
             f"FAISS {result['faiss']}, {result['threads']} threads. Kinds: clustered ({c['topics']:,} topics), "
             "isotropic (the worst case).\n"]
    bands = [f"{float(b):.2f}" for b in result["bands"]]
    for kind in c["kinds"]:
        if kind not in result:
            continue
        out = result[kind]
        flat = out["Flat"]
        rows = [("Flat (exact)", "", f"{flat['build_seconds']:.1f}", f"{flat['bytes_per_video']:,.0f}",
                 fmt(flat["ms_per_query"]), "1×", *(f"{100 * flat['exact']['found_by_band'][b]:.0f}" for b in bands),
                 f"{flat['exact']['map']:.4f}")]
        if "sharded" in flat:
            sh = flat["sharded"]
            rows.append((f"Flat, {sh['shards']} shards", f"{sh['shards']} processes × 1 thread",
                         f"{flat['sharded_build_seconds']:.1f}", f"{flat['bytes_per_video']:,.0f}",
                         fmt(sh["ms_per_query"]), f"{sh['speedup']['median']:.1f}×",
                         *(f"{100 * sh['found_by_band'][b]:.0f}" for b in bands), f"{sh['map']:.4f}"))
        for factory, parameter, values in c["candidates"]:
            if factory not in out:  # a run that left it out
                continue
            entry = out[factory]
            for v in values:
                e = entry[f"{parameter}={v}"]
                rows.append((factory, f"{parameter} {v}", f"{entry['build_seconds']:.1f}",
                             f"{entry['bytes_per_video']:,.0f}", fmt(e["ms_per_query"]),
                             f"{e['speedup']['median']:.1f}×",
                             *(f"{100 * e['found_by_band'][b]:.0f}" for b in bands), f"{e['map']:.4f}"))
        lines += [f"**{kind}**\n", *table(("index", "search", "build s", "bytes/video", "ms/query", "vs exact",
                                           *(f"% copies @{b}" for b in bands), "re-scored mAP"), rows), ""]
    return lines
