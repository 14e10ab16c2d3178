"""Videos to frames: the video lists (`id<TAB>path` files or glob patterns),
decoding at a fixed rate (default 1 frame per second), each frame scaled so
its shorter side is 256 and centre-cropped to 256x256, as TCA's
pre-processing does, a window of frames at a time so that memory does not
grow with a video's length; and the .npy frame files of extract_frames.py.

This is where a video file enters the pipeline: video.py -> cnn.py (frames
-> iMAC) -> whitening.py (PCA) -> writer.py (HDF5); pipeline.py runs them
over many videos.
"""
import collections
import glob
import math
import os
import re
import sys

import av
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import UserError, atomic_path  # noqa: E402

FRAME_SIZE = 256  # shorter side, then centre crop: upstream's resize_frame + center_crop


class VideoError(Exception):
    """A video that cannot be decoded; the pipeline skips it and lists it."""


# --------------------------------------------------------------------------
# the list of videos: `id<TAB>path` lines, or a glob pattern with {id}

def read_video_list(spec):
    """Return [(video_id, path)] from a list file of `id<TAB>path` lines or a
    glob pattern containing `{id}` (e.g. 'videos/*/{id}.mp4'), where the part
    of the file name matched by {id} becomes the video id."""
    if "{id}" in spec:
        return _glob_video_list(spec)
    if not os.path.isfile(spec):
        raise UserError(f"{spec}: video list not found (give a file of 'id<TAB>path' lines "
                        "or a glob pattern containing {id})")
    videos, seen = [], set()
    with open(spec) as f:
        for line_number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("#"):
                continue
            fields = line.split("\t")
            if len(fields) != 2 or not fields[0] or not fields[1]:
                raise UserError(f"{spec}:{line_number}: expected 'id<TAB>path', got {line!r}")
            video_id, path = fields
            if video_id in seen:
                raise UserError(f"{spec}:{line_number}: duplicate video id {video_id!r}")
            if os.path.isabs(video_id) or ".." in video_id.split("/"):
                raise UserError(f"{spec}:{line_number}: video id {video_id!r} must be a relative name")
            seen.add(video_id)
            # relative paths are relative to the list file, so a list travels with its videos
            videos.append((video_id, os.path.join(os.path.dirname(os.path.abspath(spec)), path)))
    if not videos:
        raise UserError(f"{spec}: no videos listed")
    return videos


def _glob_video_list(pattern):
    if pattern.count("{id}") != 1:
        raise UserError(f"{pattern}: the pattern must contain {{id}} exactly once")
    # glob wildcards and {id} match within one path component, as in glob itself
    regex = ""
    for token in re.split(r"(\{id\}|\*|\?)", pattern):
        regex += {"{id}": r"(?P<id>[^/]+)", "*": r"[^/]*", "?": r"[^/]"}.get(token, re.escape(token))
    videos = {}
    for path in sorted(glob.glob(pattern.replace("{id}", "*"))):
        match = re.fullmatch(regex, path)
        if match is None or not os.path.isfile(path):
            continue
        video_id = match.group("id")
        if video_id in videos:
            raise UserError(f"{pattern}: video id {video_id!r} matches both {videos[video_id]} and {path}")
        videos[video_id] = path
    if not videos:
        raise UserError(f"{pattern}: no file matches")
    return list(videos.items())


# --------------------------------------------------------------------------
# decoding

# Codecs whose skip_frame "NONREF" leaves undecoded only pictures that no other picture
# references, checked bit for bit against a full decode in tests/test_extract_frames.py.
SKIP_NONREF_CODECS = ("h264", "hevc", "mpeg4", "mpeg1video", "mpeg2video")


# Frames per window of decode_windows: what a lane holds of a video at once
# (256 x 192 KB = 48 MB of uint8 frames, about as much again when a window
# crosses to the main process), whatever the video's length (bench/NOTES.md).
WINDOW = 256


def decode_windows(path, fps=1.0, size=FRAME_SIZE, threads=1, skip_unused=True, window=WINDOW):
    """Decode `path` at `fps` frames per second, yielding the frames in
    windows of at most `window`: uint8 (n, size, size, 3) RGB arrays, n <=
    window, so that a video of any length takes a bounded amount of memory.
    The frames kept are the first of every 1/fps-second interval, counted
    from the first frame, so a video whose last frame starts at time L gives
    floor(L * fps) + 1 frames. Each frame is scaled (bicubic, as upstream's
    cv2.INTER_CUBIC) so its shorter side is `size`, then centre-cropped to
    size x size.

    threads: FFmpeg decoding threads (0 = FFmpeg's choice); 1 suits parallel
        worker processes, which already keep every core busy.
    skip_unused: in H.264, HEVC, MPEG-4 Part 2 and MPEG-1/2 streams, let
        libavcodec leave undecoded the pictures that no other picture
        references and that are not kept (typically most B-frames): the same
        frames, bit for bit, for less decoding. Any stream whose kept frames
        cannot be predicted from its packets is decoded in full; one whose
        decoded frames stop following the prediction is decoded again in
        full, from its start, past the windows already yielded (whose
        timestamps are checked to be the ones the full decode keeps).
    Raises VideoError, before the first window or after any (including the
    last: the checks of the whole video come at its end), if the file cannot
    be opened or decoded, holds no video frame, or decodes to much less than
    the duration its container declares (a truncated download): a caller
    keeps nothing of a video until the generator is exhausted.
    """
    if os.path.isdir(path):
        raise VideoError("is a directory, not a video file")
    if not os.path.isfile(path):
        raise VideoError("file not found")
    if os.path.getsize(path) == 0:
        raise VideoError("empty file")
    if window < 1:
        raise ValueError(f"window must be positive, got {window}")
    passed = []  # pts of the frames in the windows yielded so far
    if skip_unused:
        try:
            plan = _plan_kept_frames(path, fps)
            if plan is not None:
                yield from _decode(path, fps, size, threads, window, passed, plan)
                return
        except (_OffPlan, av.FFmpegError, OSError, ValueError, RuntimeError):
            pass  # the full decode below tells whether the file itself is broken
    try:
        yield from _decode(path, fps, size, threads, window, passed, None)
    except (av.FFmpegError, OSError, ValueError, RuntimeError) as e:
        raise VideoError(f"cannot decode ({type(e).__name__}: {e})") from None


def decode_frames(path, fps=1.0, size=FRAME_SIZE, threads=1, skip_unused=True):
    """The whole video at once: decode_windows' frames as one uint8
    (T, size, size, 3) array. Its memory grows with the video's length;
    the extractor takes the windows instead."""
    return np.concatenate(list(decode_windows(path, fps, size, threads, skip_unused)))


class _OffPlan(Exception):
    """The decoded frames are not those the plan predicted."""


def _decode(path, fps, size, threads, window, passed, plan):
    """Decode and keep frames as decode_windows says, yielding them in
    windows and appending their pts to `passed`. Frames already in `passed`
    (yielded by an earlier, planned decode) are checked, not yielded again.
    plan: None to decode every picture, else _plan_kept_frames' plan, whose
    unreferenced pictures are not decoded unless kept; raises _OffPlan if
    the frames kept are not the ones it predicted."""
    buffer, kept, last_bucket, first_time, last_time = [], [], -1, None, None
    keep = set(plan.kept) if plan is not None else None
    with av.open(path) as container:
        if not container.streams.video:
            raise VideoError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.thread_count = threads
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        index = -1
        for packet in container.demux(stream):
            if plan is not None:
                # copied when the packet is sent, so frame threads apply it to this picture only
                stream.codec_context.skip_frame = "DEFAULT" if packet.pts in keep else "NONREF"
            for frame in packet.decode():
                index += 1
                if plan is not None and frame.pts not in plan.shown:
                    raise _OffPlan  # not a picture the packets announced
                time_s = frame.time if frame.time is not None else index / rate
                if first_time is None:
                    first_time = time_s
                last_time = time_s
                bucket = _interval(time_s, first_time, fps)
                if bucket <= last_bucket:
                    continue  # fps above the video's rate simply keeps every frame
                last_bucket = bucket
                if plan is not None and plan.kept[len(kept):len(kept) + 1] != [frame.pts]:
                    raise _OffPlan  # not the next frame predicted: stop before decoding the rest
                kept.append(frame.pts)
                if len(kept) <= len(passed):
                    if passed[len(kept) - 1] != frame.pts:
                        raise VideoError("a full decode keeps other frames than the skipping decode "
                                         "already passed on; extract it with skip_unused=False")
                    continue
                buffer.append(_resize_and_crop(frame, size))
                if len(buffer) == window:
                    passed.extend(kept[len(passed):])
                    yield np.stack(buffer)
                    buffer = []
        declared = _declared_duration(container, stream)
    if plan is not None:
        if kept != plan.kept:
            raise _OffPlan
        last_time = plan.last_time  # the last frame may have been skipped
    if not kept:
        raise VideoError("no frame decoded")
    decoded = last_time - first_time + 1.0 / rate
    if declared is not None and decoded < declared - max(2.0, 0.1 * declared):
        raise VideoError(f"truncated: decoded {decoded:.1f} s of the {declared:.1f} s its container declares")
    if buffer:
        passed.extend(kept[len(passed):])
        yield np.stack(buffer)


def _interval(time_s, first_time, fps):
    """Which 1/fps-second interval, counted from first_time, a frame stamped
    time_s falls in; decode_frames keeps the first frame of each."""
    # small epsilon: a frame stamped 0.9999999 s is the one meant for 1 s
    return math.floor((time_s - first_time) * fps + 1e-6)


# The pts of every picture a stream shows, of those decode_frames keeps (in
# order), and the last shown picture's time in seconds.
_Plan = collections.namedtuple("_Plan", "shown kept last_time")


def _plan_kept_frames(path, fps):
    """Read the packets (no decoding) and predict the pts of the frames
    decode_frames keeps, or None when the stream is not one whose pictures
    can be skipped: a codec not in SKIP_NONREF_CODECS, packets without
    timestamps or with repeated ones, timestamps that never go back (nothing
    is decoded ahead of its turn, or they are decoding times, as AVI's),
    MPEG-4 packed B-frames (a B-frame stored in the packet before its own)."""
    with av.open(path) as container:
        if not container.streams.video:
            return None
        stream = container.streams.video[0]
        time_base = stream.time_base  # read while the container is open
        codec = stream.codec_context.name
        if codec not in SKIP_NONREF_CODECS or time_base is None:
            return None
        # libavcodec's own test for packed B-frames: this filter changes the packets that hold them
        unpack = av.BitStreamFilterContext("mpeg4_unpack_bframes", stream) if codec == "mpeg4" else None
        decode_order, shown = [], []
        for packet in container.demux(stream):
            if packet.size == 0:
                continue  # the flush packet at the end
            if packet.pts is None:
                return None
            decode_order.append(packet.pts)
            if not packet.is_discard:
                shown.append(packet.pts)
            size = packet.size  # the filter takes the packet's data
            if unpack is not None and [p.size for p in unpack.filter(packet)] != [size]:
                return None
    if len(set(shown)) != len(shown) or not shown or decode_order == sorted(decode_order):
        return None
    shown.sort()
    times = [float(pts * time_base) for pts in shown]
    kept, last_bucket = [], -1
    for pts, time_s in zip(shown, times):
        bucket = _interval(time_s, times[0], fps)
        if bucket > last_bucket:
            last_bucket = bucket
            kept.append(pts)
    return _Plan(set(shown), kept, times[-1])


def _resize_and_crop(frame, size):
    width, height = frame.width, frame.height
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    # swscale resizes and converts to RGB in one pass
    image = frame.reformat(width=new_width, height=new_height, format="rgb24",
                           interpolation="BICUBIC").to_ndarray()  # (H, W, 3)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return image[top:top + size, left:left + size]


def _declared_duration(container, stream):
    """Duration in seconds the file claims for its video, if it claims one."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1e6  # av.time_base is microseconds
    return None


def video_items(video_id, path, pieces):
    """What a video passes down the pipeline: (video_id, path, piece, None)
    for each piece of pieces() (its windows of frames, say), then its end
    (video_id, path, None, None); or, if pieces() raises VideoError, possibly
    after some pieces, (video_id, path, None, error): a consumer keeps
    nothing of a video before its end."""
    try:
        for piece in pieces():
            yield video_id, path, piece, None
    except VideoError as e:
        yield video_id, path, None, str(e)
        return
    yield video_id, path, None, None


# --------------------------------------------------------------------------
# frame files: extract_frames.py's output, extract_features.py --frames_dir's input

def frames_path(frames_dir, video_id):
    return os.path.join(frames_dir, video_id + ".npy")


def save_frames(frames_dir, video_id, path, fps):
    """Decode `path` whole (decode_frames) into FRAMES_DIR/<id>.npy, written
    then renamed, so a killed run never leaves a truncated file. Returns the
    number of frames; raises VideoError."""
    frames = decode_frames(path, fps)
    target = frames_path(frames_dir, video_id)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        np.save(f, frames)
    return len(frames)


def remove_stale_frames(frames_dir):
    """Remove the temporaries of atomic_path ('.<id>.npy.<random>.tmp') a killed run left."""
    for stale in glob.glob(os.path.join(frames_dir, "**", ".*.npy.*.tmp"), recursive=True):
        os.remove(stale)


def list_frame_files(frames_dir):
    """[(video_id, path)] of the .npy frame files under `frames_dir`, the id being the path without '.npy'."""
    if not os.path.isdir(frames_dir):
        raise UserError(f"{frames_dir}: frames directory not found")
    paths = sorted(glob.glob(os.path.join(frames_dir, "**", "*.npy"), recursive=True))  # skips .tmp files
    if not paths:
        raise UserError(f"{frames_dir}: no .npy frame files")
    return [(os.path.relpath(path, frames_dir)[:-len(".npy")], path) for path in paths]


def frame_windows(path, fps=None, window=WINDOW):
    """The frames of one video in windows of at most `window`, uint8
    (n, H, W, 3): decoded at `fps` (decode_windows), or, fps None, read from
    an .npy frame file (memory-mapped, so also a long one is never held
    whole). Raises VideoError, possibly after some windows."""
    if fps is not None:
        yield from decode_windows(path, fps, window=window)
        return
    try:
        frames = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:  # unreadable .npy
        raise VideoError(f"cannot load frames ({type(e).__name__}: {e})") from None
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise VideoError(f"not a uint8 (T, H, W, 3) frame array: {frames.dtype} {frames.shape}")
    for start in range(0, len(frames), window):
        yield np.array(frames[start:start + window])  # read from the file
