"""Tests of train.py and of the VCDB training pairs (data.VCDBPairDataset).

Losses and the queue are checked against hand-computed values; the script is
run end to end on a small synthetic HDF5 file and vcdb-style annotation, on
one process and on two Horovod workers (Gloo).
"""
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn

import train
from data import VCDBPairDataset, collate_pairs
from model import MoCo, build_model
from utils import UserError, l2_normalize

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


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("vcdb")))


# Runs train.train() as `python train.py` does, then saves each rank's final
# MoCo state to <model_path>/rank<r>.pth; with KILL_AFTER_EPOCH=k, rank 0 dies
# (os._exit, as if killed) right after writing the checkpoint of epoch k.
RUNNER = """
import os, sys
sys.path.insert(0, {repo!r})
import torch, train, utils
kill_after = int(os.environ.get("KILL_AFTER_EPOCH", "0"))
save_checkpoint = train.save_checkpoint
def save_then_die(model_path, model, optimizer, scheduler, epoch, *rest):
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


# --------------------------------------------------------------------------
# losses against hand-computed values (m = 0.25, gamma = 256)

def test_circle_loss_hand_computed():
    logits = torch.tensor([[0.8, 0.3, -0.2], [0.5, -0.4, 0.6]], requires_grad=True)
    # row 0: a_p = 1.25 - 0.8 = 0.45, positive logit 256 * 0.45 * (0.8 - 0.75) = 5.76
    #        a_n = 0.55, 0.05: negative logits 256 * 0.55 * 0.05 = 7.04, 256 * 0.05 * -0.45 = -5.76
    # row 1: a_p = 0.75: 256 * 0.75 * -0.25 = -48; a_n = 0 (clamped), 0.85: 0, 256 * 0.85 * 0.35 = 76.16
    row0 = math.log(1 + math.exp(7.04 - 5.76) + math.exp(-5.76 - 5.76))
    row1 = math.log(1 + math.exp(0 + 48) + math.exp(76.16 + 48))
    loss = train.circle_loss(logits)
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-5)
    # the weights are constants: d loss / d s_p = -gamma * a_p * (1 - softmax_p) / N
    loss.backward()
    p0 = 1 / (1 + math.exp(7.04 - 5.76) + math.exp(-11.52))
    assert logits.grad[0, 0].item() == pytest.approx(-256 * 0.45 * (1 - p0) / 2, rel=1e-4)
    assert logits.grad[1, 1].item() == 0  # a_n clamped to 0: no gradient


def test_circle_loss_upstream_hand_computed():
    logits = torch.tensor([[0.8, 0.3, -0.2], [0.5, -0.4, 0.6]])
    # upstream weights row 0 as positives in every column: a = 1.25 - s, delta = 0.75
    row0 = [256 * (1.25 - s) * (s - 0.75) for s in (0.8, 0.3, -0.2)]  # 5.76, -103.68, -464.64
    # ... and row 1 as negatives in every column, its positive included: a = [s + 0.25]_+, delta = 0.25
    row1 = [256 * max(s + 0.25, 0) * (s - 0.25) for s in (0.5, -0.4, 0.6)]  # 48, 0, 76.16
    expected = [math.log(sum(math.exp(v) for v in row)) - row[0] for row in (row0, row1)]
    assert row0[0] == pytest.approx(5.76) and row1[0] == pytest.approx(48)
    assert train.circle_loss_upstream(logits).item() == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert train.circle_loss_upstream(logits).item() != pytest.approx(train.circle_loss(logits).item())


def test_infonce_loss_hand_computed():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, -1.0]])
    expected = [math.log(math.exp(2) + math.exp(1) + 1) - 2, math.log(1 + math.exp(3) + math.exp(-1))]
    assert train.infonce_loss(logits).item() == pytest.approx(sum(expected) / 2, rel=1e-6)


# --------------------------------------------------------------------------
# MoCo as train.py uses it: which keys enter the queue, wrap-around

class MeanEncoder(nn.Module):
    """Mean of the valid frames of x (N, C, T), through a linear layer."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(C, C)
        self.output_dim = C

    def forward(self, x, num_frames):
        mask = torch.arange(x.shape[2]) < num_frames.reshape(-1, 1)  # (N, T)
        return self.linear((x * mask.unsqueeze(1)).sum(2) / num_frames.reshape(-1, 1))


def test_queue_receives_the_negatives_and_wraps_around(synthetic):
    torch.manual_seed(0)
    moco = MoCo(MeanEncoder(), dim=C, K=10, m=0.0, T=1.0)
    dataset = VCDBPairDataset(*synthetic, padding_size=20, neg_num=3, feature_size=C)
    queue_before = moco.queue.clone()
    batches = []
    for step in range(2):
        a, la, p, lp, n, ln = collate_pairs([dataset[2 * step], dataset[2 * step + 1]])  # 2 pairs, 6 negatives
        a, p, n = a.transpose(1, 2), p.transpose(1, 2), n.transpose(1, 2)
        queue = moco.queue.clone()
        logits, labels = moco(a, p, n, la, lp, ln)
        q = l2_normalize(moco.encoder_q(a, la))
        # column 0 the positive, then the queue as it was before this step's keys
        assert torch.allclose(logits[:, 0], (q * l2_normalize(moco.encoder_k(p, lp))).sum(1), atol=1e-6)
        assert torch.allclose(logits[:, 1:], q @ queue, atol=1e-6)
        assert labels.tolist() == [0, 0]
        batches.append(l2_normalize(moco.encoder_k(n, ln)).detach())  # (6, C)
    # step 1 wrote slots 0-5, step 2 slots 6-9 then 0-1; nothing else changed
    keys1, keys2 = batches
    assert torch.allclose(moco.queue[:, 2:6].t(), keys1[2:], atol=1e-6)
    assert torch.allclose(moco.queue[:, 6:10].t(), keys2[:4], atol=1e-6)
    assert torch.allclose(moco.queue[:, 0:2].t(), keys2[4:], atol=1e-6)
    assert int(moco.queue_ptr) == 2
    assert not torch.allclose(moco.queue, queue_before)


UPSTREAM_README_FLAGS = (
    "--annotation_path datasets/vcdb.pickle --feature_path F --model_path M --num_clusters 256 --num_layers 1 "
    "--output_dim 1024 --normalize_input --neg_num 16 --epochs 40 --batch_sz 64 --learning_rate 1e-5 "
    "--momentum 0.9 --weight_decay 1e-4 --pca_components 1024 --padding_size 300 --num_readers 32 "
    "--num_workers 1 --moco_k 4096 --moco_m 0. --moco_t 1.0 --print-freq 1 --use-adasum --fp16-allreduce")


def test_upstream_readme_command_parses_and_every_flag_is_documented():
    args = train.get_args_parser().parse_args(UPSTREAM_README_FLAGS.split())
    assert (args.neg_num, args.moco_k, args.moco_m, args.use_adasum, args.fp16_allreduce) == (16, 4096, 0.0, True, True)
    assert (args.aggregator, args.loss, args.optimizer) == ("tca", "circle", "adam")
    for action in train.get_args_parser()._actions:
        assert action.help, action.option_strings


@pytest.mark.parametrize("aggregator,loss", [("tca", "circle"), ("tca_netvlad", "infonce"), ("netvlad", "infonce"),
                                             ("nextvlad", "circle"), ("lstm", "circle_upstream"), ("gru", "infonce")])
def test_every_aggregator_and_loss_takes_a_training_step(synthetic, aggregator, loss):
    args = train.get_args_parser().parse_args(
        ["-ap", "a", "-fp", "f", "-mp", "m", "--pca_components", str(C), "--aggregator", aggregator,
         "--num_clusters", "4", "--output_dim", "16", "--normalize_input", "--loss", loss])
    torch.manual_seed(0)
    moco = MoCo(build_model(**train.model_args(args)), dim=16, K=12, m=0.5, T=0.1)
    optimizer = torch.optim.Adam(moco.encoder_q.parameters(), lr=1e-2)
    dataset = VCDBPairDataset(*synthetic, padding_size=6, neg_num=2, feature_size=C)
    a, la, p, lp, n, ln = collate_pairs([dataset[i] for i in range(4)])
    before = [x.clone() for x in moco.encoder_q.parameters()]
    logits, _ = moco(a.transpose(1, 2), p.transpose(1, 2), n.transpose(1, 2), la, lp, ln)
    assert logits.shape == (4, 13)
    loss_value = train.LOSSES[loss](logits)
    assert torch.isfinite(loss_value)
    loss_value.backward()
    optimizer.step()
    assert any(not torch.equal(x, y) for x, y in zip(before, moco.encoder_q.parameters()))


# --------------------------------------------------------------------------
# the training pairs

def test_dataset_drops_videos_without_features_and_is_deterministic(tmp_path):
    annotation_path, feature_path = make_dataset(str(tmp_path), num_pairs=6, num_negatives=8,
                                                 missing=("v1a", "v4b", "n0", "n5"))
    dataset = VCDBPairDataset(annotation_path, feature_path, padding_size=5, neg_num=3, feature_size=C, seed=1)
    assert len(dataset) == 4 and dataset.num_dropped_pairs == 2
    assert len(dataset.negatives) == 6 and dataset.num_dropped_negatives == 2
    assert dataset.pairs[1] == ("v2a", "v2b")
    anchor, positive, negatives = dataset[1]
    assert anchor.dtype == np.float32 and anchor.shape[1] == C and len(negatives) == 3
    assert max(len(anchor), len(positive), *map(len, negatives)) <= 5  # cropped to padding_size
    with h5py.File(feature_path) as f:  # a crop is a window of the video
        full = f["v2a"][:]
    assert any(np.array_equal(full[s:s + len(anchor)], anchor) for s in range(len(full) - len(anchor) + 1))
    # the same item for the same (seed, epoch, index); other negatives in another epoch
    again = dataset[1]
    assert all(np.array_equal(x, y) for x, y in zip(negatives, again[2]))
    draws = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        draws.add(tuple(n.tobytes() for n in dataset[1][2]))
    assert len(draws) > 1

    batch = collate_pairs([dataset[0], dataset[1]])
    anchors, anchor_frames, positives, positive_frames, negatives, negative_frames = batch
    assert anchors.shape == (2, int(anchor_frames.max()), C)
    assert negatives.shape[0] == 6 and negative_frames.shape == (6,)
    assert torch.equal(negatives[3, :negative_frames[3]], torch.from_numpy(dataset[1][2][0]))


def test_dataset_random_sampling_keeps_temporal_order(tmp_path):
    annotation_path, feature_path = make_dataset(str(tmp_path), num_pairs=2, num_negatives=2, max_frames=30)
    dataset = VCDBPairDataset(annotation_path, feature_path, padding_size=3, random_sampling=True, neg_num=1)
    anchor = dataset[0][0]
    with h5py.File(feature_path) as f:
        full = f["v0a"][:]
    rows = [int(np.flatnonzero((full == frame).all(1))[0]) for frame in anchor]
    assert len(anchor) == 3 and rows == sorted(rows) and len(set(rows)) == 3


@pytest.mark.parametrize("problem", ["missing file", "feature size", "no pairs", "few negatives", "not vcdb"])
def test_dataset_bad_input(tmp_path, problem):
    annotation_path, feature_path = make_dataset(
        str(tmp_path), num_pairs=2, num_negatives=2,
        missing=("v0b", "v1a") if problem == "no pairs" else ("n1",) if problem == "few negatives" else ())
    kwargs = dict(neg_num=2, feature_size=C)
    if problem == "missing file":
        feature_path, message = str(tmp_path / "nope.hdf5"), "nope.hdf5: feature file not found"
    elif problem == "feature size":
        kwargs["feature_size"], message = 1024, "16-dimensional features but --pca_components is 1024"
    elif problem == "no pairs":
        message = "no usable training pairs: none of the 2 pairs"
    elif problem == "few negatives":
        message = "only 1 of the 2 background videos"
    else:
        with open(annotation_path, "wb") as f:
            pickle.dump({"queries": []}, f)
        message = "not a VCDB training annotation"
    with pytest.raises(UserError, match=message):
        VCDBPairDataset(annotation_path, feature_path, **kwargs)


def test_cli_reports_bad_input(tmp_path, synthetic):
    annotation_path, feature_path = synthetic
    result = run(train_command(tmp_path, annotation_path, str(tmp_path / "missing.hdf5"), str(tmp_path / "m")),
                 check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'missing.hdf5'}: feature file not found"
    result = run(train_command(tmp_path, annotation_path, feature_path, str(tmp_path / "m"), "--batch_sz", "64"),
                 check=False)
    assert result.returncode == 2 and "fewer than one batch of --batch_sz 64" in result.stderr
    result = run(train_command(tmp_path, annotation_path, feature_path, str(tmp_path / "m"), "--resume"),
                 check=False)
    assert result.returncode == 2 and "checkpoint.pth not found" in result.stderr


def test_resume_refuses_damaged_or_wrong_checkpoints_in_one_line(tmp_path, synthetic):
    model_path = tmp_path / "m"
    model_path.mkdir()
    checkpoint = model_path / "checkpoint.pth"
    torch.save({"model": {}, "model_args": {}}, checkpoint)  # a model.pth copied over it
    cases = {"model.pth": "is not a train.py checkpoint.pth", "empty": "cannot load checkpoint",
             "garbage": "cannot load checkpoint"}
    for case, message in cases.items():
        if case == "empty":
            checkpoint.write_bytes(b"")
        elif case == "garbage":
            checkpoint.write_bytes(b"PK\x03\x04 truncated")
        result = run(train_command(tmp_path, *synthetic, str(model_path), "--resume"), check=False)
        assert result.returncode == 2, case
        assert result.stderr.count("error:") == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_a_fresh_run_does_not_overwrite_a_finished_model(tmp_path, synthetic):
    model_path = tmp_path / "m"
    model_path.mkdir()
    (model_path / "model.pth").write_bytes(b"a finished model")
    result = run(train_command(tmp_path, *synthetic, str(model_path)), check=False)
    assert result.returncode == 2 and "pass --resume to continue that run or --overwrite" in result.stderr
    assert (model_path / "model.pth").read_bytes() == b"a finished model" and not (model_path / "args.json").exists()
    run(train_command(tmp_path, *synthetic, str(model_path), "--overwrite", "--epochs", "1"))
    assert "model_args" in torch.load(model_path / "model.pth", weights_only=True)


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, synthetic, small_tmpfs):
    small_tmpfs.fill()
    result = run(train_command(tmp_path, *synthetic, str(small_tmpfs / "run"), "--epochs", "1"), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {small_tmpfs / 'run'}/") and "No space left on device" in last, last
    assert not [name for name in os.listdir(small_tmpfs / "run") if name.endswith((".pth", ".tmp"))]


# --------------------------------------------------------------------------
# end to end

def test_loss_falls_on_a_learnable_task(tmp_path):
    synthetic = make_dataset(str(tmp_path / "data"), num_pairs=64)
    model_path = str(tmp_path / "run")
    # ... as a plain single process without Horovod installed: hide it behind a package that fails to import
    (tmp_path / "no_horovod" / "horovod").mkdir(parents=True)
    (tmp_path / "no_horovod" / "horovod" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    result = run(train_command(tmp_path, *synthetic, model_path, "--epochs", "12", "--batch_sz", "8",
                               "--moco_k", "32", "--learning_rate", "1e-3"),
                 env={"PYTHONPATH": str(tmp_path / "no_horovod")})
    assert "64 training pairs (0 dropped" in result.stdout
    with open(os.path.join(model_path, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    epochs = [r for r in records if "step" not in r]
    steps = [r for r in records if "step" in r]
    assert [r["epoch"] for r in epochs] == list(range(1, 13))
    assert all(r.keys() == {"epoch", "step", "loss", "lr", "pairs_per_s"} for r in steps)
    # cosine schedule from 1e-3 to 0, per epoch
    assert [r["lr"] for r in epochs] == pytest.approx([1e-3 * (1 + math.cos(math.pi * e / 12)) / 2
                                                       for e in range(12)])
    # the first steps score against the initial random queue: compare from epoch 2 on
    first, last = np.mean([r["loss"] for r in epochs[1:3]]), np.mean([r["loss"] for r in epochs[-2:]])
    assert last < 0.8 * first, [r["loss"] for r in epochs]
    for name in ("model.pth", "checkpoint.pth", "args.json"):
        assert os.path.isfile(os.path.join(model_path, name))
    # model.pth is the query encoder and describes itself, as evaluation.py loads it
    saved = torch.load(os.path.join(model_path, "model.pth"), weights_only=True)
    assert saved["model_args"] == {"aggregator": "tca", "feature_size": C, "num_layers": 1, "num_clusters": 256,
                                   "output_dim": 1024, "normalize_input": False, "dropout": 0.2}
    build_model(**saved["model_args"]).load_state_dict(saved["model"])


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory, synthetic):
    """An uninterrupted 2-worker run of 4 epochs (fp16 allreduce, DataLoader workers). Horovod's response
    cache is cut to 20 entries, above the 13-16 fixed tensor names of this model's steps: one new name per
    step (an unnamed allgather) would overflow it within the run's 16 steps and log evictions."""
    tmp_path = tmp_path_factory.mktemp("hvd")
    model_path = str(tmp_path / "full")
    command = train_command(tmp_path, *synthetic, model_path, "--epochs", "4", "--num_workers", "1",
                            "--fp16-allreduce", "--seed", "3", workers=2)
    return tmp_path, command, model_path, run(command, env={"HOROVOD_CACHE_CAPACITY": "20"})


def test_two_horovod_workers_end_with_identical_weights(two_worker_run):
    _, _, model_path, result = two_worker_run
    rank0 = torch.load(os.path.join(model_path, "rank0.pth"), weights_only=True)
    rank1 = torch.load(os.path.join(model_path, "rank1.pth"), weights_only=True)
    assert_same_state(rank0, rank1)  # encoders, queue and queue pointer
    # 32 pairs over 2 ranks in batches of 4: 4 steps per epoch, 2 x 4 x 4 negatives per step
    assert int(rank0["queue_ptr"]) == (4 * 4 * 32) % 48
    assert "resuming" not in result.stdout and "epoch 4/4: loss" in result.stdout
    # the demo's log showed "A response has been evicted from cache ..." on every step once the run was long
    assert "evicted from cache" not in result.stdout + result.stderr
    with open(os.path.join(model_path, "args.json")) as f:
        assert json.load(f)["world_size"] == 2
    # rank 0 wrote model.pth from the same weights
    model = torch.load(os.path.join(model_path, "model.pth"), weights_only=True)["model"]
    assert_same_state(model, {k[len("encoder_q."):]: v for k, v in rank0.items() if k.startswith("encoder_q.")})


def test_resume_after_kill_equals_uninterrupted_run(two_worker_run):
    tmp_path, command, full_path, _ = two_worker_run
    model_path = str(tmp_path / "resumed")
    resumed = [model_path if arg == full_path else arg for arg in command]
    killed = run(resumed, env={"KILL_AFTER_EPOCH": "2"}, check=False)
    assert killed.returncode != 0
    checkpoint = torch.load(os.path.join(model_path, "checkpoint.pth"), weights_only=True)
    assert checkpoint["epoch"] == 2
    result = run(resumed + ["--resume"])
    assert "after epoch 2 of 4" in result.stdout
    for rank in (0, 1):
        assert_same_state(torch.load(os.path.join(model_path, f"rank{rank}.pth"), weights_only=True),
                          torch.load(os.path.join(full_path, f"rank{rank}.pth"), weights_only=True))


def test_resume_on_one_rank_rescales_the_learning_rate(two_worker_run):
    """A 2-rank run resumed by one process continues with the 1-rank learning
    rate (the base rate times 1, on the same cosine schedule)."""
    tmp_path, command, full_path, _ = two_worker_run
    model_path = str(tmp_path / "one_rank")
    shutil.copytree(full_path, model_path)
    checkpoint = torch.load(os.path.join(model_path, "checkpoint.pth"), weights_only=True)
    args = command[command.index("--annotation_path"):]
    args = [model_path if a == full_path else a for a in args]
    args[args.index("--epochs") + 1] = "4"
    # pretend the 2-rank run ended after epoch 2 of 4, then resume on one rank
    checkpoint["epoch"] = 2
    checkpoint["scheduler"]["last_epoch"] = 2
    for group in checkpoint["optimizer"]["param_groups"]:
        group["lr"] = 2e-3 * (1 + math.cos(math.pi * 2 / 4)) / 2
    torch.save(checkpoint, os.path.join(model_path, "checkpoint.pth"))
    result = run([PYTHON, command[command.index(PYTHON) + 1], *args, "--resume"])
    assert "learning rate rescaled x0.5 (2 -> 1 ranks' scale)" in result.stdout
    with open(os.path.join(model_path, "log.jsonl")) as f:
        epochs = [json.loads(line) for line in f if '"step"' not in line]
    assert [r["lr"] for r in epochs[-2:]] == pytest.approx([1e-3 * (1 + math.cos(math.pi * e / 4)) / 2
                                                            for e in (2, 3)])


def test_adasum_over_mpi(tmp_path, synthetic):
    model_path = str(tmp_path / "adasum")
    result = run(train_command(tmp_path, *synthetic, model_path, "--epochs", "1", "--use-adasum", "--fp16-allreduce",
                               workers=2, mpi=True))
    assert "lr 0.001" in result.stdout  # Adasum: the learning rate is not scaled by the number of ranks
    assert_same_state(torch.load(os.path.join(model_path, "rank0.pth"), weights_only=True),
                      torch.load(os.path.join(model_path, "rank1.pth"), weights_only=True))
    # with Gloo, a clear error instead
    result = run(train_command(tmp_path, *synthetic, str(tmp_path / "gloo"), "--use-adasum", workers=2), check=False)
    assert result.returncode != 0 and "needs Horovod's MPI controller" in result.stdout + result.stderr


def test_a_non_finite_training_feature_names_its_video_and_frame(tmp_path):
    annotation_path, feature_path = make_dataset(str(tmp_path), num_pairs=4, num_negatives=4)
    with h5py.File(feature_path, "a") as f:
        bad = f["v2b"][()]
        bad[1, 0] = np.inf
        del f["v2b"]
        f["v2b"] = bad
    dataset = VCDBPairDataset(annotation_path, feature_path, padding_size=50, neg_num=1, feature_size=C)
    with pytest.raises(UserError, match=r"video v2b: non-finite feature value at frame 1$"):
        for i in range(len(dataset)):
            dataset[i]


def test_a_non_finite_feature_stops_training_in_one_line(tmp_path):
    annotation_path, feature_path = make_dataset(str(tmp_path / "data"), num_pairs=8, num_negatives=8)
    with h5py.File(feature_path, "a") as f:
        for video in list(f):
            bad = f[video][()]
            bad[0, 3] = np.nan
            del f[video]
            f[video] = bad
    result = run(train_command(tmp_path, annotation_path, feature_path, str(tmp_path / "m"), "--num_workers", "1"),
                 check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.fullmatch(rf"error: {re.escape(feature_path)}: video \w+: non-finite feature value at frame 0",
                        result.stderr.strip().splitlines()[-1])


def test_a_damaged_feature_file_is_one_line(tmp_path, synthetic):
    """A broken symbol table (the file's index of videos) is found while the
    pairs are checked: one line naming the file, not h5py's RuntimeError."""
    import shutil
    annotation_path, feature_path = synthetic
    damaged = tmp_path / "damaged.hdf5"
    shutil.copy(feature_path, damaged)
    data = bytearray(damaged.read_bytes())
    at = data.find(b"SNOD")
    data[at:at + 4] = b"\xff\xfe\xfd\xfc"
    damaged.write_bytes(bytes(data))
    command = train_command(tmp_path, annotation_path, str(damaged), str(tmp_path / "m"))
    result = run([PYTHON, os.path.join(REPO, "train.py"), *command[2:]], check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {damaged}: damaged HDF5 file (")
