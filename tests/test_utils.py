import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import utils
from utils import UserError


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


def test_load_pickle_reads_real_annotations(annotation_dir):
    vcdb = utils.load_pickle(os.path.join(annotation_dir, "vcdb.pickle"))
    assert len(vcdb["index"]) == 100310 and len(vcdb["video_pairs"]) == 5612
    evve = utils.load_pickle(os.path.join(annotation_dir, "evve.pickle"))  # holds a protocol-2 set

    def sets(x):
        values = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else ()
        return isinstance(x, set) + sum(sets(v) for v in values)
    assert sets(evve) >= 1


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
    # a 40-byte pickle calling bytes(10**13): refused before allocating anything
    path.write_bytes(b"\x80\x02c__builtin__\nbytes\nq\x00\x8a\x06\x00\xa0rN\x18\tq\x01\x85q\x02Rq\x03.")
    with pytest.raises(UserError, match="refusing to load builtins.bytes"):
        utils.load_pickle(path)
    path.write_bytes(b"\x80\x02c__builtin__\nset\nJ\x00\x00\x00\x40\x85R.")  # set(2**30)
    with pytest.raises(UserError, match="refusing set\\(\\) of int"):
        utils.load_pickle(path)
    path.write_bytes(pickle.dumps({"a": {1, 2}}, protocol=2))
    assert utils.load_pickle(path) == {"a": {1, 2}}


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


def test_all_gatherer_none_on_one_process_else_horovods_allgather_under_a_fixed_name():
    assert utils.all_gatherer(utils.Distributed(None, 0, 1, 0, 1), name="keys") is None

    class FakeHorovod:  # what a 2-rank allgather of identical tensors returns
        @staticmethod
        def allgather(tensor, name=None):
            # one name for every call: an unnamed allgather takes a new cache entry each step
            assert name == "keys"
            assert not tensor.requires_grad and tensor.is_contiguous()
            return torch.cat([tensor, tensor])
    assert utils.all_gatherer(utils.Distributed(FakeHorovod, 0, 1, 0, 1), name="keys") is None
    gather = utils.all_gatherer(utils.Distributed(FakeHorovod, 1, 2, 1, 2), name="keys")
    x = torch.arange(6.0, requires_grad=True).reshape(2, 3).t()  # not contiguous, needs grad
    assert torch.equal(gather(x), torch.cat([x, x]).detach())


def test_run_main_prints_one_line_and_exits_2():
    code = "import utils\ndef main():\n    raise utils.UserError('x.h5: feature file not found')\nutils.run_main(main)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 2
    assert proc.stderr == "error: x.h5: feature file not found\n"


def test_length_buckets_bound_padding_and_budget():
    lengths = sorted(np.random.default_rng(0).integers(1, 300, 200).tolist())
    buckets = list(utils.length_buckets(lengths, budget=4096, spread=1.15, slack=8))
    assert [b[0] for b in buckets[1:]] == [b[1] for b in buckets[:-1]] and buckets[-1][1] == len(lengths)
    for start, stop in buckets:
        group = lengths[start:stop]
        assert len(group) == 1 or (len(group) * group[-1] <= 4096 and group[-1] <= 1.15 * group[0] + 8)
    # rows: an item cut into chunks takes one padded row per chunk
    assert list(utils.length_buckets([10, 10, 10], budget=40, rows=[2, 2, 1])) == [(0, 2), (2, 3)]
    assert list(utils.length_buckets([50], budget=10)) == [(0, 1)]  # one item over the budget still goes


def test_balanced_owners_is_deterministic_and_balanced():
    work = [5, 1, 9, 3, 3, 7]
    owners = utils.balanced_owners(work, 2)
    # largest first to the least loaded: 9 -> 0, 7 -> 1, 5 -> 1, 3 -> 0, 3 -> 0, 1 -> 1
    assert owners.tolist() == [1, 1, 0, 0, 0, 1]
    assert utils.balanced_owners(work, 1).tolist() == [0] * 6
    assert utils.balanced_owners([], 3).tolist() == []


def test_read_features_gives_float32_and_refuses_non_finite(tmp_path):
    import h5py
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["half"] = np.ones((3, 4), np.float16)
        bad = np.ones((3, 4), np.float32)
        bad[2, 1] = np.inf
        f["bad"] = bad
    with h5py.File(tmp_path / "f.h5", "r") as f:
        assert utils.read_features(f, "half").dtype == np.float32
        with pytest.raises(UserError, match=r"f.h5: video bad: non-finite feature value at frame 2$"):
            utils.read_features(f, "bad")


def test_load_checkpoint_gives_model_args(tmp_path):
    sd = {"fc.weight": torch.ones(2, 2)}
    torch.save({"model": sd, "model_args": {"aggregator": "tca"}}, tmp_path / "m.pth")
    state_dict, model_args = utils.load_checkpoint(tmp_path / "m.pth")
    assert list(state_dict) == ["fc.weight"] and model_args == {"aggregator": "tca"}
    torch.save(sd, tmp_path / "bare.pth")
    assert utils.load_checkpoint(tmp_path / "bare.pth")[1] is None
    torch.save({"epoch": 3}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="other.pth: checkpoint holds no state dict"):
        utils.load_checkpoint(tmp_path / "other.pth")


def test_check_outputs_apart_refuses_an_input_by_path_symlink_and_hard_link(tmp_path):
    from utils import check_outputs_apart
    features = tmp_path / "f.h5"
    features.write_bytes(b"features")
    (tmp_path / "link.h5").symlink_to(features)
    os.link(features, tmp_path / "hard.h5")
    for output in (features, tmp_path / "." / "f.h5", tmp_path / "link.h5", tmp_path / "hard.h5"):
        with pytest.raises(UserError, match=r"--json_out would overwrite the input --feature_path"):
            check_outputs_apart({"--json_out": str(output)}, {"--feature_path": str(features), "--model_path": None})
    assert features.read_bytes() == b"features"
    check_outputs_apart({"--json_out": str(tmp_path / "new.json"), "--plot": None}, {"--feature_path": str(features)})


def test_rank_share_covers_every_item_once_and_balances_work():
    work = np.random.default_rng(1).integers(1, 500, 57)
    shares = [utils.rank_share(work, rank, 3) for rank in range(3)]
    assert sorted(np.concatenate(shares).tolist()) == list(range(len(work)))
    assert all((np.diff(s) > 0).all() for s in shares)  # ascending
    loads = [int(work[s].sum()) for s in shares]
    assert max(loads) - min(loads) <= work.max()
    assert utils.rank_share(work, 0, 1).tolist() == list(range(len(work)))


class _FakeRanks:
    """Horovod's object collectives for rank `rank` of a world whose ranks
    contribute `values` (allgather_object) and whose rank 0 broadcasts what it is given."""

    def __init__(self, rank, values):
        self.rank, self.values, self.broadcast_from_rank0 = rank, values, None

    def allgather_object(self, value):
        assert value == self.values[self.rank]
        return list(self.values)

    def broadcast_object(self, value, root_rank):
        if self.rank == 0:
            self.broadcast_from_rank0 = value
        return self.broadcast_from_rank0


def test_on_rank0_and_agree_stop_every_rank_with_rank_0_reporting():
    one = utils.Distributed(None, 0, 1, 0, 1)
    assert utils.on_rank0(one, lambda: 7) == 7 and utils.agree(one, None) is None
    with pytest.raises(UserError, match="bad"):
        utils.on_rank0(one, lambda: (_ for _ in ()).throw(UserError("bad")))
    # agree: a rank's error stops rank 0 with the message, the others with exit 2
    errors = [None, "rank 1: disk full"]
    for rank in (0, 1):
        dist = utils.Distributed(_FakeRanks(rank, errors), rank, 2, rank, 2)
        if rank == 0:
            with pytest.raises(UserError, match="rank 1: disk full"):
                utils.agree(dist, errors[rank])
        else:
            with pytest.raises(SystemExit) as exit_:
                utils.agree(dist, errors[rank])
            assert exit_.value.code == 2
    assert utils.agree(utils.Distributed(_FakeRanks(1, [None, None]), 1, 2, 1, 2), None) is None
    # on_rank0: rank 0's result (or error) reaches rank 1, which never runs the function
    hvd = _FakeRanks(0, [])
    assert utils.on_rank0(utils.Distributed(hvd, 0, 2, 0, 2), lambda: {"done": 3}) == {"done": 3}
    hvd.rank = 1
    assert utils.on_rank0(utils.Distributed(hvd, 1, 2, 1, 2), lambda: pytest.fail("ran on rank 1")) == {"done": 3}


def test_gather_rows_concatenates_in_rank_order():
    class TwoRanks:  # rank 0 holds positions [2], rank 1 (this one) [0, 1]
        @staticmethod
        def allgather(tensor, name):
            other = torch.tensor([2]) if name == "positions" else torch.full((1, 3), 9.0)
            return torch.cat([other, tensor])
    positions, rows = utils.gather_rows(utils.Distributed(TwoRanks, 1, 2, 1, 2), np.array([0, 1]),
                                        {"cosine": np.zeros((2, 3), np.float32)})
    assert positions.tolist() == [2, 0, 1] and rows["cosine"].tolist() == [[9.0] * 3, [0.0] * 3, [0.0] * 3]


def test_a_fletcher32_checksum_failure_names_file_and_video(tmp_path):
    import h5py
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("v1", data=np.ones((50, 4), np.float32), fletcher32=True, chunks=(50, 4))
        offset = f["v1"].id.get_chunk_info(0).byte_offset
    data = bytearray((tmp_path / "f.h5").read_bytes())
    data[offset + 17] ^= 0x40  # one flipped bit in the stored values
    (tmp_path / "f.h5").write_bytes(bytes(data))
    with utils.open_features(tmp_path / "f.h5") as f:
        assert f["v1"].shape == (50, 4)  # the index is intact
        for read in (lambda: utils.read_features(f, "v1"), lambda: f["v1"][10:20]):
            with pytest.raises(UserError, match=rf"^{tmp_path / 'f.h5'}: video v1: damaged HDF5 file \(its "
                                                r"Fletcher-32 checksum does not match"):
                read()
        with pytest.raises(KeyError):  # an absent video is no damage
            f["v2"]


def test_a_damaged_index_is_one_user_error_for_every_lookup(tmp_path):
    import h5py
    with h5py.File(tmp_path / "f.h5", "w") as f:
        for i in range(5):
            f[f"v{i}"] = np.ones((3, 4), np.float32)
    data = bytearray((tmp_path / "f.h5").read_bytes())
    at = data.find(b"SNOD")
    data[at:at + 4] = b"XXXX"
    (tmp_path / "f.h5").write_bytes(bytes(data))
    with utils.open_features(tmp_path / "f.h5") as f:
        for lookup in (lambda: "v1" in f, lambda: f["v1"], lambda: f.visititems(lambda name, obj: None)):
            with pytest.raises(UserError, match=rf"^{tmp_path / 'f.h5'}: damaged HDF5 file \(.*bad symbol table"):
                lookup()


def test_a_refused_checkpoint_is_one_line_of_our_own(tmp_path):
    """PyTorch's refusal advises re-running with weights_only=False: the one
    thing not to do with a file that asks to run code."""
    class RunsCode:
        def __reduce__(self):
            return os.system, ("echo pwned",)
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"model": RunsCode()}, tmp_path / "callable.pth")
    (tmp_path / "pickle.pth").write_bytes(pickle.dumps(RunsCode()))
    for name in ("random.pth", "callable.pth", "pickle.pth"):
        with pytest.raises(UserError) as error:
            utils.load_checkpoint(tmp_path / name)
        message = str(error.value)
        assert message.startswith(f"{tmp_path / name}: cannot load checkpoint: the safe loader refused it (")
        assert "weights_only" not in message and "\n" not in message
        if name == "callable.pth":  # PyTorch's diagnosis is kept
            assert "posix.system" in message


def test_a_checkpoint_with_non_finite_weights_names_the_tensor(tmp_path):
    torch.save({"fc.weight": torch.ones(2, 2), "fc.bias": torch.tensor([0.0, float("inf")]),
                "steps": torch.tensor(3)}, tmp_path / "m.pth")
    with pytest.raises(UserError, match=rf"^{tmp_path / 'm.pth'}: tensor fc.bias holds non-finite weights"):
        utils.load_checkpoint(tmp_path / "m.pth")
