"""train.py steps on synthetic VCDB-style data under `horovodrun --gloo`,
1 and 2 workers, timed from train.py's own log."""
import json
import os
import pickle
import subprocess
import sys
import time

import h5py
import numpy as np

from bench.common import fmt, random_lengths, random_videos, summary, table, tca_flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {
    "full": dict(channels=1024, min_frames=30, max_frames=300, batch=8, neg_num=1, videos=64,
                 steps={1: 7, 2: 4}, warmup_steps=1),
    # one Horovod launch (2 workers) keeps the smoke run short
    "quick": dict(channels=64, min_frames=5, max_frames=20, batch=4, neg_num=1, videos=16,
                  steps={2: 2}, warmup_steps=1),
}
TARGETS = ()
MOCO_K = 65536  # train.py's default queue length


def write_training_data(directory, size, seed=6):
    """HDF5 features of `videos` synthetic videos and the VCDB-style pairs
    over them (pairs reuse videos, so the file stays small); returns the
    features' path, the pairs, the negatives and the videos' lengths."""
    rng = np.random.default_rng(seed)
    lengths = random_lengths(size["videos"], size["min_frames"], size["max_frames"], seed)
    videos = random_videos(lengths, size["channels"], seed)
    names = [f"v{i}" for i in range(len(videos))]
    features_path = os.path.join(directory, "features.h5")
    with h5py.File(features_path, "w") as f:
        for name, video in zip(names, videos):
            f[name] = video.numpy()
    half = len(names) // 2
    num_pairs = size["batch"] * max(steps * workers for workers, steps in size["steps"].items())
    pairs = [{"videos": [names[int(a)], names[int(b)]]}
             for a, b in zip(rng.integers(0, half, num_pairs), rng.integers(0, half, num_pairs))]
    return features_path, pairs, names[half:], lengths


def run(size, workdir):
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    features_path, pairs, negatives, lengths = write_training_data(workdir, size)
    C = size["channels"]
    # FLOPs per pair (approximate): anchor forward + backward (3x forward),
    # positive and negatives forward, logits against the queue (3x for backward)
    per_video = tca_flops(lengths, C, 2048) / len(lengths)
    flops_per_pair = (3 + 1 + size["neg_num"]) * per_video + 3 * 2.0 * C * (MOCO_K + 1)
    result = {"config": size | {"moco_k": MOCO_K, "mean_frames": float(lengths.mean())},
              "approx_gflop_per_pair": flops_per_pair / 1e9}
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    for workers, steps in sorted(size["steps"].items()):
        run_dir = os.path.join(workdir, f"run{workers}")
        # train.py uses every pair of its file: give it exactly this run's pairs
        annotation_path = os.path.join(workdir, f"vcdb{workers}.pickle")
        with open(annotation_path, "wb") as f:
            pickle.dump({"video_pairs": pairs[:size["batch"] * steps * workers], "negs": negatives, "index": []}, f)
        command = [horovodrun, "-np", str(workers), "-H", f"localhost:{workers}", "--gloo",
                   sys.executable, os.path.join(REPO, "train.py"), "-ap", annotation_path, "-fp", features_path,
                   "-mp", run_dir, "-pc", str(C), "-bs", str(size["batch"]), "-nn", str(size["neg_num"]),
                   "-e", "1", "-p", "1", "-nw", "0", "--moco_k", str(MOCO_K), "--save_every", "1"]
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"train.py with {workers} worker(s) failed:\n"
                               f"{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")
        with open(os.path.join(run_dir, "log.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
        step_rates = [r["pairs_per_s"] for r in records if "step" in r][size["warmup_steps"]:]
        if not step_rates:
            raise RuntimeError(f"train.py with {workers} worker(s) logged no step after the warm-up")
        global_batch = size["batch"] * workers
        result[f"workers_{workers}"] = {
            "steps_timed": len(step_rates),
            "step_seconds": summary([global_batch / r for r in step_rates], "s"),
            "pairs_per_s": summary(step_rates, "pairs/s"),
            "approx_gflops": summary([r * flops_per_pair / 1e9 for r in step_rates], "GFLOP/s"),
            "wall_seconds_including_startup": wall,
        }
    if "workers_1" in result and "workers_2" in result:
        result["scaling_2_vs_1"] = (result["workers_2"]["pairs_per_s"]["median"]
                                    / result["workers_1"]["pairs_per_s"]["median"])
    return result


def render(result, meta):
    runs = [(workers, result[f"workers_{workers}"]) for workers in (1, 2) if f"workers_{workers}" in result]
    rows = [(workers, fmt(e["step_seconds"]), fmt(e["pairs_per_s"]), fmt(e["approx_gflops"]), e["steps_timed"],
             f"{e['wall_seconds_including_startup']:.1f} s") for workers, e in runs]
    c = result["config"]
    lines = ["## Training step (train.py, synthetic data)\n",
             f"`horovodrun --gloo` with train.py: TCA {c['channels']}-d, batch {c['batch']} pairs per worker, "
             f"--neg_num {c['neg_num']}, --moco_k {c['moco_k']}, videos of {c['min_frames']}–{c['max_frames']} "
             f"frames (mean {c['mean_frames']:.0f}), `-nw 0`. Per-step rates from train.py's own log "
             f"(`-p 1`), the first {c['warmup_steps']} step(s) dropped as warm-up. Approximate work: "
             f"{result['approx_gflop_per_pair']:.2f} GFLOP per pair (backward counted as 2× forward).\n",
             *table(("workers", "step time", "pairs/s", "approx GFLOP/s", "steps timed", "wall time incl. start-up"),
                    rows)]
    if "scaling_2_vs_1" in result:
        lines.append(f"\n2 workers / 1 worker throughput: {result['scaling_2_vs_1']:.2f}× (both use the same "
                     f"{meta['cores']} cores: 2 workers get 1 thread each, so this measures Horovod's overhead, "
                     "not a speed-up). The two launches run one after the other, so a change of load between "
                     "them moves this ratio.\n")
    return lines
