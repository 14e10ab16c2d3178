import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import utils
from utils import UserError

from conftest import ANNOTATION_DIR as SHARED  # noqa: E402


def test_available_cores_follows_the_affinity_mask():
    cores = utils.available_cores()
    assert 1 <= cores <= os.cpu_count()
    if hasattr(os, "sched_getaffinity"):
        assert cores == len(os.sched_getaffinity(0))


def test_l2_normalize_torch_and_numpy():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(utils.l2_normalize(x), [[0.6, 0.8], [0.0, 0.0]])
    assert utils.l2_normalize(x).dtype == np.float32
    t = utils.l2_normalize(torch.tensor([[3.0, 4.0]]))
    assert torch.allclose(t, torch.tensor([[0.6, 0.8]]))


def test_frame_mask_and_padding():
    mask = utils.make_frame_mask(torch.tensor([1, 3]), 4)
    assert mask.tolist() == [[True, False, False, False], [True, True, True, False]]
    padded, num_frames = utils.pad_sequences([np.ones((2, 3)), torch.full((5, 3), 2.0)], max_frames=4)
    assert padded.shape == (2, 4, 3) and num_frames.tolist() == [2, 4]
    assert padded[0, 2:].abs().sum() == 0 and (padded[1] == 2).all()


def test_load_pickle_reads_real_annotations():
    vcdb = utils.load_pickle(os.path.join(SHARED, "vcdb.pickle"))
    assert len(vcdb["index"]) == 100310 and len(vcdb["video_pairs"]) == 5612


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_load_pickle_refuses_code(tmp_path):
    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps({"a": Evil()}))
    with pytest.raises(UserError, match="evil.pickle.*refusing to load"):
        utils.load_pickle(path)
    path.write_bytes(pickle.dumps(np.zeros(3)))  # numpy arrays are not plain data either
    with pytest.raises(UserError, match="refusing"):
        utils.load_pickle(path)


def test_load_pickle_missing_and_malformed(tmp_path):
    with pytest.raises(UserError, match="nope.pickle: annotation file not found"):
        utils.load_pickle(tmp_path / "nope.pickle")
    bad = tmp_path / "bad.pickle"
    bad.write_bytes(pickle.dumps({"a": [1, 2, 3]})[:-5])
    with pytest.raises(UserError, match="bad.pickle: malformed"):
        utils.load_pickle(bad)


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with utils.atomic_path(target) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]
    with utils.atomic_path(target) as tmp:
        open(tmp, "w").write("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["out.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~umask  # as open() would create it


def test_load_state_dict_unwraps_and_strips_module(tmp_path):
    sd = {"module.fc.weight": torch.ones(2, 2)}
    utils.atomic_torch_save({"model": sd, "epoch": 3}, tmp_path / "ckpt.pth")
    loaded = utils.load_state_dict(tmp_path / "ckpt.pth")
    assert list(loaded) == ["fc.weight"] and torch.equal(loaded["fc.weight"], torch.ones(2, 2))
    with pytest.raises(UserError, match="checkpoint not found"):
        utils.load_state_dict(tmp_path / "missing.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="garbage.pth: cannot load checkpoint"):
        utils.load_state_dict(tmp_path / "garbage.pth")


def test_single_process_helpers_are_identity():
    x = torch.arange(6.0).reshape(3, 2)
    assert utils.world_size() == 1 and utils.rank() == 0 and utils.is_main_process()
    assert torch.equal(utils.concat_all_gather(x), x)


def test_run_main_prints_one_line_and_exits_2():
    code = "import utils\ndef main():\n    raise utils.UserError('x.h5: feature file not found')\nutils.run_main(main)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 2
    assert proc.stderr == "error: x.h5: feature file not found\n"
