"""What the evaluation tests share: evaluation.py's main run in-process, and
a mini benchmark in FIVR format (what the demo builds) with a self-describing
TCA checkpoint for model mode."""
import json
import os
import pickle
import sys
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

import evaluation
from model import build_model

ROOT = os.path.join(os.path.dirname(__file__), "..")


def run_entry_point(module, argv, capsys):
    """Run an entry point's main in-process, as `python module.py argv`;
    returns (exit status, stdout, stderr)."""
    old = sys.argv
    sys.argv = [module.__name__ + ".py"] + [str(a) for a in argv]
    try:
        module.run_main(module.main)
        status = 0
    except SystemExit as e:
        status = e.code
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return status, out.out, out.err


def run(argv, capsys):
    """evaluation.py's main, in-process."""
    return run_entry_point(evaluation, argv, capsys)


C = 16


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """fivr.pickle with 2 queries and 6 database videos, and their features:
    a is a copy of q1, b a copy of q2 with its frames reversed, the rest noise."""
    root = tmp_path_factory.mktemp("mini")
    rng = np.random.default_rng(0)
    lengths = {"q1": 23, "q2": 9, "a": 23, "b": 9, "n1": 31, "n2": 5, "n3": 17, "n4": 1}
    videos = {v: rng.standard_normal((t, C)).astype(np.float32) for v, t in lengths.items()}
    videos["a"] = videos["q1"].copy()
    videos["b"] = videos["q2"][::-1].copy()
    with h5py.File(root / "features.hdf5", "w") as f:
        for v, x in videos.items():
            f[v] = x
        f["empty"] = np.zeros((0, C), np.float32)  # no frames: left out like a video without features
    with open(root / "fivr.pickle", "wb") as f:
        pickle.dump({"5k": {"queries": ["q1", "q2"],
                            "database": {"a", "b", "n1", "n2", "n3", "n4", "absent", "empty"}},
                     "annotation": {"q1": {"ND": ["a"]}, "q2": {"DS": ["b"], "IS": ["n3"]}}}, f)
    return SimpleNamespace(root=root, videos=videos, database=["a", "b", "n1", "n2", "n3", "n4"])


def evaluate_mini(mini, capsys, tmp_path, *extra):
    status, out, err = run(["--dataset", "FIVR-5K", "--annotation_dir", mini.root,
                            "--feature_path", mini.root / "features.hdf5", "--device", "cpu",
                            "--save_similarities", tmp_path / "s.npz", "--json_out", tmp_path / "m.json", *extra],
                           capsys)
    assert status == 0, err
    q, d, s = evaluation.load_similarities(str(tmp_path / "s.npz"))
    assert q == ["q1", "q2"] and d == mini.database  # 'absent' and 'empty' are left out
    assert "2 of 8 database videos have no features" in out
    return s, json.loads((tmp_path / "m.json").read_text()), out


@pytest.fixture(scope="module")
def tca_checkpoint(tmp_path_factory):
    """A self-describing model.pth, as train.py writes it."""
    root = tmp_path_factory.mktemp("tca")
    model_args = {"aggregator": "tca", "feature_size": C, "num_layers": 1, "num_clusters": 4, "output_dim": C,
                  "normalize_input": False, "dropout": 0.0}
    torch.manual_seed(0)
    model = build_model(**model_args).eval()
    torch.save({"model": model.state_dict(), "model_args": model_args}, root / "model.pth")
    return root / "model.pth", model


def fivr5k_case(annotation_dir):
    """Two FIVR-5K queries, a few database columns, a hand-worked mAP."""
    with open(os.path.join(annotation_dir, "fivr.pickle"), "rb") as f:
        fivr = pickle.load(f)
    q1, q2 = fivr["5k"]["queries"][:2]
    db = fivr["5k"]["database"]
    rel = lambda q, labels: sorted(set(v for l in labels for v in fivr["annotation"][q].get(l, [])) & db)
    annotated = {v for q in (q1, q2) for vs in fivr["annotation"][q].values() for v in vs}
    negatives = sorted(db - annotated)[:3]
    d1, d2 = rel(q1, ("ND", "DS"))[:2]
    e1 = rel(q2, ("ND", "DS"))[0]
    columns = [d1, negatives[0], d2, negatives[1], e1, negatives[2]]
    sims = np.array([[0.9, 0.8, 0.7, 0.1, 0.0, 0.2],    # q1: d1 rank 1, d2 rank 3
                     [0.1, 0.2, 0.0, 0.9, 0.8, 0.3]])   # q2: e1 rank 2
    # DSVR: q1 (1 + 2/3) / 2, q2 1/2
    expected_dsvr = ((1 + 2 / 3) / 2 + 1 / 2) / 2
    return [q1, q2], columns, sims, expected_dsvr
