"""search.py's stage 2 per query: reading a shortlist's frames from a
float16 frame store (index_store.FrameStore.shortlist_frames, as search.py
reads them) and TCA_f (retrieval.frame_scores, chamfer) over them, for
shortlists of search.py's default, 100 and 1,000 videos; projected from the
per-frame-pair rate of the largest to an exhaustive TCA_f of FIVR-200K."""
import shutil
import tempfile
import time

import numpy as np

import index_store
from bench.common import fmt, summary, table
from retrieval import DEFAULT_SHORTLIST, frame_scores

SIZES = {"full": dict(videos=1000, frames=(50, 350), shortlists=(DEFAULT_SHORTLIST, 100, 1000), queries=3,
                      channels=1024, fivr_videos=225_960),
         "quick": dict(videos=40, frames=(5, 20), shortlists=(10, 40), queries=2, channels=64, fivr_videos=225_960)}
TARGETS = ()


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def run(size):
    rng = np.random.default_rng(7)
    channels, count = size["channels"], size["videos"]
    lengths = rng.integers(size["frames"][0], size["frames"][1] + 1, size=count)
    workdir = tempfile.mkdtemp(prefix="tca_rerank_")
    try:
        frames = [_unit(rng.standard_normal((int(t), channels))).astype(np.float32) for t in lengths]
        index_store.write_part(workdir, [str(i) for i in range(count)], np.zeros((count, channels)), frames,
                               "float16", 1, 0, 1)
        del frames
        store = index_store.FrameStore(workdir)
        query = _unit(rng.standard_normal((int(np.mean(size["frames"])), channels))).astype(np.float32)
        result = {"mean_frames": float(lengths.mean()), "query_frames": len(query), "shortlists": {}}
        for shortlist in size["shortlists"]:
            positions = rng.choice(count, size=min(shortlist, count), replace=False)
            read, score = [], []
            for _ in range(size["queries"]):
                start = time.perf_counter()
                videos = store.shortlist_frames(positions)
                read.append(time.perf_counter() - start)
                start = time.perf_counter()
                frame_scores(query, videos, "chamfer")
                score.append(time.perf_counter() - start)
            result["shortlists"][str(shortlist)] = {
                "read_seconds": summary(read, "s"), "chamfer_seconds": summary(score, "s"),
                "frame_pairs": len(query) * int(lengths[positions].sum())}
        store.close()
        largest = result["shortlists"][str(max(size["shortlists"]))]
        per_pair = (largest["read_seconds"]["median"] + largest["chamfer_seconds"]["median"]) / largest["frame_pairs"]
        result["fivr_exhaustive_seconds_per_query"] = per_pair * len(query) * lengths.mean() * size["fivr_videos"]
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def render(result, meta):
    rows = [(k, f"{v['frame_pairs']:,}", fmt(v["read_seconds"]), fmt(v["chamfer_seconds"]))
            for k, v in result["shortlists"].items()]
    return ["## Stage 2 of search: re-ranking a shortlist\n",
            f"Float16 frame store, a {result['query_frames']}-frame query, videos of {result['mean_frames']:.0f} "
            f"frames on average, TCA_f (chamfer). An exhaustive TCA_f of FIVR-200K at the rate of the largest "
            f"shortlist would take {result['fivr_exhaustive_seconds_per_query']:.0f} s per query.\n",
            *table(("shortlist", "frame pairs", "frame-store reads", "chamfer"), rows), ""]
