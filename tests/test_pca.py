"""pre-processing/pca.py refuses what would make its output silently wrong:
non-finite features, unusable parameters, malformed inputs -- one line each."""
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

import whitening

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pre-processing", "pca.py")


def run_pca(*args):
    result = subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=300)
    return result.returncode, result.stderr


@pytest.fixture
def features(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        for i in range(6):
            f[f"v{i}"] = rng.normal(size=(8, 5)).astype(np.float32)
    return path


def test_a_nan_frame_is_refused_by_learn_and_apply(features, tmp_path):
    assert run_pca("--learn", features, "--params", tmp_path / "p.npz")[0] == 0
    with h5py.File(features, "a") as f:
        bad = f["v3"][()]
        bad[5, 2] = np.nan
        del f["v3"]
        f["v3"] = bad
    status, err = run_pca("--learn", features, "--params", tmp_path / "q.npz", "--frames_per_video", 8)
    assert status == 2 and err.count("error:") == 1
    assert err.strip().splitlines()[-1] == f"error: {features}: video v3: non-finite feature value at frame 5"
    assert not (tmp_path / "q.npz").exists()
    status, err = run_pca("--apply", features, "--params", tmp_path / "p.npz", "--output", tmp_path / "o.h5",
                          "--components", 3)
    assert status == 2 and err.strip().splitlines()[-1] == f"error: {features}: video v3: non-finite feature " \
                                                           f"value at frame 5"


def test_unusable_parameters_are_refused(features, tmp_path):
    assert run_pca("--learn", features, "--params", tmp_path / "p.npz")[0] == 0
    params = dict(np.load(tmp_path / "p.npz"))
    cases = {"zero.npz": dict(params, lams=np.where(np.arange(5) == 4, 0.0, params["lams"]).astype(np.float32)),
             "nan.npz": dict(params, mu=np.full(5, np.nan, np.float32)),
             "shape.npz": dict(params, mu=params["mu"][:3])}
    for name, content in cases.items():
        np.savez(tmp_path / name, **content)
    (tmp_path / "truncated.npz").write_bytes((tmp_path / "p.npz").read_bytes()[:200])
    messages = {"zero.npz": "eigenvalue 4 is 0; whitening needs positive eigenvalues",
                "nan.npz": "the PCA parameters hold non-finite values", "shape.npz": "inconsistent shapes",
                "truncated.npz": "not a PCA parameters file"}
    for name, message in messages.items():
        with pytest.raises(whitening.UserError, match=message):
            whitening.load_params(str(tmp_path / name))


def test_a_one_dimensional_first_dataset_is_one_line(tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["a"] = np.zeros(4, np.float32)
    status, err = run_pca("--learn", tmp_path / "f.h5", "--params", tmp_path / "p.npz")
    assert status == 2 and err == f"error: {tmp_path / 'f.h5'}: a has shape (4,), expected (T, D)\n"


def test_a_full_disk_is_one_line_and_a_rerun_finishes(tmp_path, small_tmpfs):
    rng = np.random.default_rng(1)
    source = tmp_path / "in.h5"
    with h5py.File(source, "w") as f:
        for i in range(20):
            f[f"v{i}"] = rng.normal(size=(20, 48)).astype(np.float32)
    assert run_pca("--learn", source, "--params", tmp_path / "p.npz")[0] == 0
    small_tmpfs.fill(leave=40_000)
    args = ["--apply", source, "--params", tmp_path / "p.npz", "--components", 32]
    status, err = run_pca(*args, "--checkpoint_every", 0, "--output", small_tmpfs / "out.h5")  # a part per video
    assert status == 2 and err.count("error:") == 1 and "Traceback" not in err  # was: exit 139 in h5py's close
    assert err.strip().splitlines()[-1].endswith(": No space left on device")
    leftovers = [name for _, _, names in os.walk(small_tmpfs) for name in names if name.endswith(".tmp")]
    assert leftovers == []
    os.remove(small_tmpfs / "filler")  # space again: the re-run keeps the finished parts and ends like one run
    assert run_pca(*args, "--output", small_tmpfs / "out.h5")[0] == 0
    assert run_pca(*args, "--output", tmp_path / "reference.h5")[0] == 0
    with h5py.File(small_tmpfs / "out.h5") as a, h5py.File(tmp_path / "reference.h5") as b:
        assert sorted(a) == sorted(b) and all(np.array_equal(a[k][()], b[k][()]) for k in b)


def test_learn_checks_params_before_learning(features, tmp_path):
    """--params naming the input (by path, symlink or hard link) is refused,
    the input untouched; an unwritable --params is named before any work."""
    data = features.read_bytes()
    os.symlink(features, tmp_path / "link.h5")
    os.link(features, tmp_path / "hard.h5")
    for params in (features, tmp_path / "link.h5", tmp_path / "hard.h5"):
        status, err = run_pca("--learn", features, "--params", params)
        assert status == 2 and err == (f"error: {params}: --params would overwrite the input --learn ({features}); "
                                       "choose another output path\n")
    assert features.read_bytes() == data
    (tmp_path / "file").write_text("")
    status, err = run_pca("--learn", features, "--params", tmp_path / "file" / "p.npz")
    assert status == 2 and "sampling" not in err
    assert err == f"error: {tmp_path / 'file' / 'p.npz'}: {tmp_path / 'file'} is not a directory\n"
