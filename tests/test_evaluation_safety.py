"""What evaluation.py refuses (issue 23): an output over an input, a model
that gives non-finite numbers, damaged files and checkpoints, each in one line."""
import os
import re

import h5py
import numpy as np
import torch

import evaluation
from evaluation_helpers import fivr5k_case, run

# --------------------------------------------------------------------------
# issue 23: no output over an input, no silent NaN, damaged files in one line

def _copy_of_mini(mini, tmp_path):
    """The mini benchmark's annotation and features, copied: a test that
    failed to refuse must not damage the module's files."""
    import shutil
    root = tmp_path / "in"
    root.mkdir()
    for name in ("fivr.pickle", "features.hdf5"):
        shutil.copy(mini.root / name, root / name)
    return root


def test_an_output_that_is_an_input_is_refused_before_any_work(mini, capsys, tmp_path, tca_checkpoint,
                                                               annotation_dir):
    root = _copy_of_mini(mini, tmp_path)
    features, annotation = root / "features.hdf5", root / "fivr.pickle"
    model_path = tmp_path / "model.pth"
    model_path.write_bytes(tca_checkpoint[0].read_bytes())
    queries, columns, sims, _ = fivr5k_case(annotation_dir)
    evaluation.save_similarities(str(tmp_path / "s.npz"), queries, columns, sims)
    similarities = tmp_path / "s.npz"
    os.symlink(features, tmp_path / "link.hdf5")
    os.link(model_path, tmp_path / "hard.pth")
    os.link(annotation, tmp_path / "hard.pickle")
    os.symlink(similarities, tmp_path / "link.npz")
    model_mode = ["--dataset", "FIVR-5K", "--annotation_dir", root, "--feature_path", features, "--device", "cpu"]
    file_mode = ["--dataset", "FIVR-5K", "--annotation_dir", root, "--similarities", similarities]
    cases = [  # (command line, the input it names)
        (model_mode + ["--baseline", "--json_out", features], "--feature_path"),  # the same path
        (model_mode + ["--baseline", "--per_query", tmp_path / "link.hdf5"], "--feature_path"),  # a symlink
        (model_mode + ["--baseline", "--save_similarities", os.path.relpath(features)], "--feature_path"),
        (model_mode + ["--model_path", model_path, "--results_csv", tmp_path / "hard.pth"], "--model_path"),  # hard link
        (model_mode + ["--model_path", model_path, "--save_similarities", model_path], "--model_path"),
        (file_mode + ["--pr_curve", tmp_path / "link.npz"], "--similarities"),
        (file_mode + ["--plot", annotation], "--annotation_dir's fivr.pickle"),
        (file_mode + ["--json_out", tmp_path / "hard.pickle"], "--annotation_dir's fivr.pickle"),
    ]
    before = {path: path.read_bytes() for path in (features, annotation, model_path, similarities)}
    for argv, flag in cases:
        status, out, err = run(argv, capsys)
        assert status == 2 and err.count("\n") == 1 and f"would overwrite the input {flag}" in err, (argv, err)
        assert "=====" not in out and "finding features" not in err
        assert {path: path.read_bytes() for path in before} == before


def test_a_checkpoint_with_a_nan_weight_is_one_line_naming_the_tensor(mini, capsys, tmp_path, tca_checkpoint):
    saved = torch.load(tca_checkpoint[0], weights_only=True)
    saved["model"]["transformer_encoder.layers.0.linear1.weight"][3, 5] = float("nan")
    torch.save(saved, tmp_path / "nan.pth")
    status, out, err = run(["--dataset", "FIVR-5K", "--annotation_dir", mini.root, "--feature_path",
                            mini.root / "features.hdf5", "--model_path", tmp_path / "nan.pth", "--device", "cpu",
                            "--json_out", tmp_path / "m.json"], capsys)
    assert status == 2 and err.count("\n") == 1 and "=====" not in out
    assert err.startswith(f"error: {tmp_path / 'nan.pth'}: tensor transformer_encoder.layers.0.linear1.weight "
                          "holds non-finite weights")
    assert not (tmp_path / "m.json").exists()


def test_a_finite_frame_that_overflows_the_model_is_one_line_naming_the_video(mini, capsys, tmp_path,
                                                                             tca_checkpoint):
    """1e30 passes the features' finiteness check but makes TCA's attention
    NaN: the video is named, never dropped from the ranking as "not computed"."""
    with h5py.File(tmp_path / "f.hdf5", "w") as f:
        for v, x in mini.videos.items():
            f[v] = x
        del f["n3"]
        huge = mini.videos["n3"].copy()
        huge[2] = 1e30
        f["n3"] = huge
    for metric in ("cosine", "chamfer"):
        status, out, err = run(["--dataset", "FIVR-5K", "--annotation_dir", mini.root, "--feature_path",
                                tmp_path / "f.hdf5", "--model_path", tca_checkpoint[0], "--device", "cpu",
                                "--metric", metric, "--json_out", tmp_path / "m.json"], capsys)
        assert status == 2 and err.count("error:") == 1 and "=====" not in out, err
        assert err.splitlines()[-1].startswith(f"error: {tmp_path / 'f.hdf5'}: video n3: its embedding is not finite")
        assert not (tmp_path / "m.json").exists()


def test_nan_pairs_of_a_similarity_file_are_counted(annotation_dir, tmp_path, capsys):
    queries, columns, sims, _ = fivr5k_case(annotation_dir)
    sims[0, 1] = sims[1, 3] = np.nan
    evaluation.save_similarities(str(tmp_path / "s.npz"), queries, columns, sims)
    status, out, err = run(["--dataset", "FIVR-5K", "--annotation_dir", annotation_dir, "--similarities",
                            tmp_path / "s.npz"], capsys)
    assert status == 0, err
    assert re.search(r"FIVR-5K: 2 of \d+ queries, 6 of \d+ database videos, 2 of 12 pairs not computed\n", out)


def _damage_symbol_table(path):
    """Overwrite the signature of the HDF5 file's first symbol table node
    (the index of the root group's datasets)."""
    data = bytearray(path.read_bytes())
    at = data.find(b"SNOD")
    assert at > 0
    data[at:at + 4] = b"\xff\xfe\xfd\xfc"
    path.write_bytes(bytes(data))


def test_a_damaged_feature_file_is_one_line(mini, capsys, tmp_path):
    root = _copy_of_mini(mini, tmp_path)
    _damage_symbol_table(root / "features.hdf5")
    status, out, err = run(["--dataset", "FIVR-5K", "--annotation_dir", root, "--feature_path",
                            root / "features.hdf5", "--baseline", "--device", "cpu"], capsys)
    assert status == 2 and err.count("error:") == 1 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"error: {root / 'features.hdf5'}: damaged HDF5 file (")
    assert "bad symbol table node signature" in err


def test_random_bytes_as_model_path_is_one_line_without_pytorchs_advice(mini, capsys, tmp_path):
    (tmp_path / "model.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    status, _, err = run(["--dataset", "FIVR-5K", "--annotation_dir", mini.root, "--feature_path",
                          mini.root / "features.hdf5", "--model_path", tmp_path / "model.pth", "--device", "cpu"],
                         capsys)
    assert status == 2 and err.count("\n") == 1 and "weights_only" not in err
    assert err.startswith(f"error: {tmp_path / 'model.pth'}: cannot load checkpoint: the safe loader refused it")
