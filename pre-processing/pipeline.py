"""Many video files to features, and `extract()`, its public face: each
video's frames (video.py) go through the CNN (cnn.py) in batches, and come
out PCA-whitened (whitening.py) if asked, in the order of the videos.

    from pipeline import extract
    for video_id, features in extract(["query.mp4"], weights="resnet50.pth", pca_params="pca.npz"):
        print(video_id, features.shape)  # (T, 1024) float32

There is one decoding path (video.frame_windows, in worker processes), one
batching path (batched_features) and one joining path (whole_videos); the
two schedules differ only in where the CNN runs. On a CPU each worker (a
lane, lanes.py) runs the CNN itself, one thread, on the video it decodes
(--schedule lanes): every core alternates between decoding and the CNN, and
no CNN thread waits at a barrier for a core a decoder holds. On a GPU the
workers only decode and the main process runs the CNN over batches that
cross videos (--schedule overlap). bench/NOTES.md has the measurements.
"""
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utils import UserError, available_cores  # noqa: E402
from cnn import (CPU_BATCH_SIZE, FEATURE_DIMS, GPU_BATCH_SIZE, build_extractor, extract_batch,  # noqa: E402
                 weights_identity)
from lanes import videos_in_lanes  # noqa: E402
from video import WINDOW, frame_windows, video_items  # noqa: E402
from whitening import apply_pca, load_params  # noqa: E402
from writer import file_digest  # noqa: E402

SCHEDULES = ("auto", "lanes", "overlap")
DTYPES = ("float32", "float16")
DEFAULT_COMPONENTS = 1024  # pca.py --apply's


# --------------------------------------------------------------------------
# the one batching path

class _Pending:
    """A video in batched_features: its frames waiting for the CNN, its
    features not yet passed on, whether all its items have come."""

    def __init__(self, video_id, path):
        self.video_id, self.path = video_id, path
        self.frames, self.waiting = collections.deque(), 0  # uint8 (n, H, W, 3) tensors
        self.features, self.held = [], 0  # (n, D) float32 chunks
        self.ended, self.error = False, None

    def take(self, room):
        """Up to `room` of its waiting frames, first come first taken."""
        taken = []
        while room and self.frames:
            frames = self.frames.popleft()
            if len(frames) > room:
                frames, rest = frames[:room], frames[room:]
                self.frames.appendleft(rest)
            taken.append(frames)
            room -= len(frames)
        self.waiting -= sum(len(frames) for frames in taken)
        return taken


def batched_features(model, items, batch_size, device="cpu", channels_last=False, bf16=False, chunk=WINDOW):
    """Run the CNN over the frames of `items` - video.video_items' (video_id,
    path, frames uint8 (n, H, W, 3), None) pieces and ends or errors, of one
    video or of many in turn - in batches of `batch_size` frames that carry
    on across windows and across videos, so short videos do not leave
    batches half-empty; the last batch may be smaller. Yields the same items
    with features float32 (n, D) tensors in place of frames, in the order of
    the videos: each video's features at least `chunk` frames at a time
    (what a lane sends on: no lane holds a whole video's features), then its
    end or its error (a video that fails has its frames dropped)."""
    pending, waiting = collections.deque(), 0

    def run_batch():
        owners, frames, room = [], [], batch_size
        for video in pending:
            taken = video.take(room)
            if taken:
                owners.append((video, sum(len(f) for f in taken)))
                frames += taken
                room -= owners[-1][1]
            if not room:
                break
        features = extract_batch(model, torch.cat(frames), device, channels_last, bf16)  # (N, D)
        for (video, count), part in zip(owners, features.split([count for _, count in owners])):
            video.features.append(part)
            video.held += count
        return batch_size - room

    def ready():  # what the first videos have to pass on
        while pending:
            video = pending[0]
            done = video.ended and not video.waiting
            if video.features and (done or video.held >= chunk):
                yield video.video_id, video.path, torch.cat(video.features), None
                video.features, video.held = [], 0
            if not done:
                return
            pending.popleft()
            yield video.video_id, video.path, None, video.error

    for video_id, path, frames, error in items:
        if not pending or pending[-1].video_id != video_id or pending[-1].ended:
            pending.append(_Pending(video_id, path))
        video = pending[-1]
        if frames is not None:
            video.frames.append(torch.as_tensor(frames))
            video.waiting += len(frames)
            waiting += len(frames)
            while waiting >= batch_size:
                waiting -= run_batch()
                yield from ready()
            continue
        video.ended, video.error = True, error
        if error is not None:  # what it had through the CNN is dropped
            waiting -= video.waiting
            video.frames, video.waiting, video.features, video.held = collections.deque(), 0, [], 0
        yield from ready()
    while waiting:
        waiting -= run_batch()
        yield from ready()


def whole_videos(items):
    """Join the feature chunks of batched_features' items: (video_id, path,
    features (T, D) tensor or None, error or None) per video, in order."""
    chunks = []
    for video_id, path, features, error in items:
        if features is not None:
            chunks.append(features)
            continue
        yield video_id, path, torch.cat(chunks) if error is None else None, error
        chunks = []


# --------------------------------------------------------------------------
# the schedules

def _lane_init():
    # One thread per lane, and not only for speed: a forked child whose parent
    # has used OpenMP (GNU libgomp) hangs in its first multi-threaded region.
    torch.set_num_threads(1)


def _in_lanes(videos, produce, lanes):
    """lanes.videos_in_lanes, the tensors of the items crossing as numpy arrays."""
    def produce_numpy(video_id, path):
        for video_id, path, piece, error in produce(video_id, path):
            yield video_id, path, piece.numpy() if isinstance(piece, torch.Tensor) else piece, error

    for video_id, path, piece, error in videos_in_lanes(videos, produce_numpy, lanes, _lane_init):
        yield video_id, path, torch.from_numpy(piece) if piece is not None else None, error


def uses_lanes(schedule, device_type):
    """Whether --schedule runs the CNN in the lanes: 'auto' does on a CPU, and
    on a GPU runs it here, the lanes only decoding ahead of it."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "lanes" and device_type != "cpu":
        raise UserError(f"--schedule lanes runs the CNN in CPU worker processes, not on {device_type}; "
                        "use --schedule overlap (or auto)")
    return schedule == "lanes" or (schedule == "auto" and device_type == "cpu")


def default_workers(lanes, local_ranks=1):
    """--workers by default: one lane per core (of this rank's share of its
    host's cores under horovodrun), or 2 decoders beside the CNN."""
    return max(1, available_cores() // local_ranks) if lanes else 2


def default_batch_size(device_type):
    return CPU_BATCH_SIZE if device_type == "cpu" else GPU_BATCH_SIZE


def video_features(model, videos, fps=None, workers=2, batch_size=CPU_BATCH_SIZE, device="cpu", channels_last=False,
                   bf16=False, schedule="auto", window=WINDOW):
    """Features of `videos` [(id, path)]: (video_id, path, features (T, D)
    float32 tensor or None, error or None) for each, in order. The frames are
    decoded at `fps` (None: read from .npy frame files) `window` at a time by
    `workers` processes (0: in this one), so memory does not grow with a
    video's length, and a worker that dies costs only its video. Lanes: the
    CNN runs in the workers, on one video each; overlap: here, on `device`."""
    def frames(video_id, path):
        return video_items(video_id, path, lambda: frame_windows(path, fps, window))

    if uses_lanes(schedule, torch.device(device).type):
        def features(video_id, path):
            return batched_features(model, frames(video_id, path), batch_size, "cpu", channels_last, bf16, window)
        return whole_videos(_in_lanes(videos, features, workers))
    return whole_videos(batched_features(model, _in_lanes(videos, frames, workers), batch_size, device,
                                         channels_last, bf16, window))


# --------------------------------------------------------------------------
# what is stored, and the settings it is stored with

def load_whitening(pca_params, components=None, feature="imac"):
    """The PCA parameters file `pca_params` (None: no whitening) for the
    CNN's features, keeping `components` (None: 1024, as pca.py --apply)."""
    if pca_params is None:
        if components is not None:
            raise UserError("--components needs --pca_params")
        return None
    params = load_params(pca_params, components or DEFAULT_COMPONENTS)
    if len(params["mu"]) != FEATURE_DIMS:
        raise UserError(f"{pca_params}: a PCA of {len(params['mu'])}-d features, "
                        f"not of the {FEATURE_DIMS}-d ResNet-50 {feature}")
    return params


def stored(features, pca_params=None, dtype="float32"):
    """What an output holds for a video's (T, 3840) features: them, or their
    PCA-whitening (pca.py --apply's), at `dtype`."""
    features = features.numpy()
    if pca_params is not None:
        features = apply_pca(features, pca_params)
    return features.astype(dtype, copy=False)


def extraction_settings(*, fps=1.0, feature="imac", weights=None, bf16=False, channels_last=False, pca_params=None,
                        components=None, dtype="float32"):
    """The settings that change the stored features, as every output of
    extract_features.py and pca.py --apply records them in its root
    attributes (writer.recorded_settings reads them back; writer.check_settings
    compares two): for `extract()`'s arguments of the same names, fps None
    being .npy frame files."""
    width = FEATURE_DIMS if pca_params is None else components or DEFAULT_COMPONENTS
    return {"fps": fps if fps is not None else "frames_dir", "feature": feature, "weights": weights_identity(weights),
            "bf16": bool(bf16), "channels_last": bool(channels_last), "components": width, "dtype": dtype,
            "pca_params": file_digest(pca_params) if pca_params is not None else "none"}


# --------------------------------------------------------------------------

def extract(videos, *, fps=1.0, weights=None, device=None, bf16=False, channels_last=False, feature="imac",
            pca_params=None, components=None, dtype="float32", batch_size=None, workers=None, schedule="auto",
            window=WINDOW, on_error=None):
    """Yield (video_id, features) for each of `videos` - (id, path) pairs or
    plain paths (the path is then the id) - in order, without writing any
    file: features is (T, 3840) float32 (T frames at `fps`), or, with
    `pca_params` (a pca.py --learn file), the (T, components) whitened ones,
    at `dtype`: bit for bit what extract_features.py (+ pca.py --apply)
    stores for the same settings (extraction_settings(...) says which).

    weights: None (torchvision's ImageNet weights), a state-dict path, or
    cnn.RANDOM_WEIGHTS; device: None (a GPU if there is one, else the CPU);
    workers, batch_size: None for extract_features.py's defaults (on a CPU,
    fewer videos than cores run overlapped rather than in lanes). A video
    that cannot be decoded raises UserError, or, given on_error, is passed
    to on_error(video_id, path, error) and skipped."""
    videos = [(os.fspath(v), os.fspath(v)) if isinstance(v, (str, os.PathLike)) else tuple(v) for v in videos]
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    whitening = load_whitening(pca_params, components, feature)
    if schedule == "auto" and device.type == "cpu" and workers is None and len(videos) < default_workers(True):
        # fewer videos than lanes (a search's query): a lane each would leave cores idle, so the
        # CNN runs here on every core beside a decoding worker (bench/query.py: a 60 s video in
        # 6.8 s instead of 9.4 s on 2 cores)
        schedule = "overlap"
    lanes = uses_lanes(schedule, device.type)
    workers = default_workers(lanes) if workers is None else workers
    batch_size = default_batch_size(device.type) if batch_size is None else batch_size
    model = build_extractor(feature, weights, device, channels_last)
    for video_id, path, features, error in video_features(model, videos, fps, workers, batch_size, device,
                                                          channels_last, bf16, schedule, window):
        if error is None:
            yield video_id, stored(features, whitening, dtype)
        elif on_error is None:
            raise UserError(f"{path}: {error}")
        else:
            on_error(video_id, path, error)
