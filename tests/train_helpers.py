"""What the training tests share: a small learnable VCDB-style task in HDF5,
the train.py command that runs it (one process or horovodrun workers), and
readers of what a run leaves (log.jsonl, TensorBoard scalars)."""
import json
import os
import pickle
import subprocess
import sys

import h5py
import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PYTHON = sys.executable
HOROVODRUN = os.path.join(os.path.dirname(PYTHON), "horovodrun")
C = 16  # feature size of the synthetic data


# --------------------------------------------------------------------------
# synthetic data

def make_dataset(directory, num_pairs=32, num_negatives=48, feature_size=C, identity_dims=12, nuisance=1.5,
                 seed=0, missing=(), max_frames=10):
    """A learnable copy-detection task: the two videos of a pair share an
    identity in the first `identity_dims` channels; every video also has its
    own constant `nuisance` offset in the other channels, which the model must
    learn to ignore. Videos named in `missing` are left out of the HDF5 file."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    feature_path, annotation_path = os.path.join(directory, "features.hdf5"), os.path.join(directory, "vcdb.pickle")

    def video(identity):
        offset = nuisance * rng.normal(size=(1, feature_size))
        offset[:, :identity_dims] = 0
        frames = offset + 0.3 * rng.normal(size=(int(rng.integers(4, max_frames)), feature_size))
        frames[:, :identity_dims] += identity
        return frames.astype(np.float32)

    pairs, negatives = [], []
    with h5py.File(feature_path, "w") as f:
        for i in range(num_pairs):
            identity = rng.normal(size=identity_dims)
            for name in (f"v{i}a", f"v{i}b"):
                frames = video(identity)
                if name not in missing:
                    f[name] = frames
            pairs.append({"videos": [f"v{i}a", f"v{i}b"], "overlap": [1.0, 1.0]})
        for i in range(num_negatives):
            frames = video(rng.normal(size=identity_dims))
            if f"n{i}" not in missing:
                f[f"n{i}"] = frames
            negatives.append(f"n{i}")
    with open(annotation_path, "wb") as f:
        pickle.dump({"video_pairs": pairs, "index": [], "negs": negatives}, f)
    return annotation_path, feature_path


# Runs train.train() as `python train.py` does, then saves each rank's final
# MoCo state to <model_path>/rank<r>.pth; with KILL_AFTER_EPOCH=k, rank 0 dies
# (os._exit, as if killed) right after writing the checkpoint of epoch k, with
# KILL_BEFORE_SAVE_EPOCH=k right before it (epoch k logged, not checkpointed).
RUNNER = """
import os, sys
sys.path.insert(0, {repo!r})
import torch, train, utils
kill_after = int(os.environ.get("KILL_AFTER_EPOCH", "0"))
kill_before = int(os.environ.get("KILL_BEFORE_SAVE_EPOCH", "0"))
save_checkpoint = train.save_checkpoint
def save_then_die(model_path, model, optimizer, scheduler, epoch, *rest):
    if epoch == kill_before:
        os._exit(137)
    save_checkpoint(model_path, model, optimizer, scheduler, epoch, *rest)
    if epoch == kill_after:
        os._exit(137)
train.save_checkpoint = save_then_die
args = train.get_args_parser().parse_args()
model = utils.run_main(lambda: train.train(args))
torch.save(model.state_dict(), os.path.join(args.model_path, "rank%d.pth" % utils.init_distributed().rank))
"""


def train_command(tmp_path, annotation_path, feature_path, model_path, *extra, workers=1, mpi=False):
    runner = os.path.join(str(tmp_path), "runner.py")
    with open(runner, "w") as f:
        f.write(RUNNER.format(repo=REPO))
    args = ["--annotation_path", annotation_path, "--feature_path", feature_path, "--model_path", model_path,
            "--pca_components", str(C), "--batch_sz", "4", "--neg_num", "4", "--moco_k", "48", "--moco_m", "0",
            "--moco_t", "1", "--learning_rate", "1e-3", "--num_workers", "0", "--print-freq", "2", *extra]
    if workers == 1:
        return [PYTHON, runner, *args]
    return [HOROVODRUN, "--mpi" if mpi else "--gloo", "-np", str(workers), "-H", f"localhost:{workers}",
            PYTHON, runner, *args]


def run(command, env=None, check=True):
    env = dict(os.environ, **(env or {}))
    env["PATH"] = os.path.dirname(PYTHON) + os.pathsep + env.get("PATH", "")
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key



def write_validation_benchmark(directory, num_queries=6, num_database=12):
    """A FIVR-5K-style fivr.pickle over the synthetic training videos: query
    v{i}a has its pair's v{i}b as near duplicate among v*b and n* videos."""
    queries = [f"v{i}a" for i in range(num_queries)]
    database = [f"v{i}b" for i in range(num_database)] + [f"n{i}" for i in range(8)]
    with open(os.path.join(directory, "fivr.pickle"), "wb") as f:
        pickle.dump({"5k": {"queries": queries, "database": set(database)},
                     "annotation": {q: {"ND": [q[:-1] + "b"]} for q in queries}}, f)
    return directory


def read_log(model_path):
    with open(os.path.join(model_path, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def epoch_records(model_path):
    return [r for r in read_log(model_path) if "step" not in r]


def scalars(model_path):
    """{tag: [(step, value)]} of the TensorBoard event files, read back with tensorboard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(model_path))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
