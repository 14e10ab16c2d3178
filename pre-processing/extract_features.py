"""Extract frame-level CNN features from videos into HDF5, one dataset per
video id of shape (T, 3840): ImageNet ResNet-50, iMAC (or R-MAC) pooling of
the outputs of layer1..layer4, as TCA's pre-processing does.

    python pre-processing/extract_features.py --video_list videos.tsv --output imac.h5
    python pre-processing/extract_features.py --frames_dir frames/ --output imac.h5
    horovodrun -np 8 -H host1:4,host2:4 python pre-processing/extract_features.py --video_list videos.tsv --output imac.h5

With --video_list the videos are decoded by parallel worker processes
(extract_frames.decode_windows: 1 fps, shorter side 256, centre crop 256) and
the frames stream straight into the CNN, a window of 256 frames at a time,
so a worker's memory does not grow with a video's length; nothing but the
features is stored. --frames_dir reads extract_frames.py's .npy files. On a CPU each worker process (one per core) runs the CNN itself, one
thread, on the videos it decodes, in batches of 8 (--schedule lanes); on a
GPU the main process runs it on batches of 64 frames across videos while the
workers decode ahead (--schedule overlap). On a CPU the lanes and the
small batches measured faster (BENCHMARKS.md); no GPU was measured. With
--pca_params the features are PCA-whitened (pca.py's function) before they
are stored, at --dtype.

Under horovodrun the ranks share the videos (sharding.py), each on its local
GPU or its share of the cores, and rank 0 merges their parts. Killing the run
loses at most --checkpoint_every seconds of work; a re-run, with any number
of ranks, skips the videos already extracted, and refuses an output made
with other settings (h5_writer.py). Videos that cannot be decoded, or whose
worker process dies, are reported, listed in a failures file and skipped.
"""
import argparse
import glob
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utils import UserError, available_cores, l2_normalize, load_state_dict, local_device, run_main  # noqa: E402
import sharding  # noqa: E402
from lanes import limit_heap_growth, run_in_lanes  # noqa: E402
from extract_frames import WINDOW, VideoError, decode_windows, read_video_list  # noqa: E402
from h5_writer import (OutputLock, PartWriter, check_failures_path, check_video_ids, file_digest,  # noqa: E402
                       merge_parts, new_run_id, recorded_settings, scan_output, write_failures)
from pca import apply_pca, load_params  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYERS = ("layer1", "layer2", "layer3", "layer4")  # 256 + 512 + 1024 + 2048 = 3840 channels
FEATURE_DIMS = 3840
DTYPES = ("float32", "float16")
# Default frames per forward: CPUs run small batches faster per frame, GPUs
# want large ones (bench/NOTES.md).
CPU_BATCH_SIZE, GPU_BATCH_SIZE = 8, 64
SCHEDULES = ("auto", "lanes", "overlap")


# --------------------------------------------------------------------------
# pooling of one layer's activations into one vector per frame

def imac(x):
    """iMAC of one layer: L2-normalise every location's channel vector, take
    the global max over locations, L2-normalise. x: (N, C, H, W) -> (N, C)
    float32. A bfloat16 map (autocast) is not converted as a whole: the
    per-location norms are computed in float32, and only the pooled vectors
    are converted."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32).clamp_min(1e-12)  # (N, 1, H, W)
    pooled = (x * norm.reciprocal().to(x.dtype)).amax(dim=(2, 3))  # (N, C)
    return l2_normalize(pooled.float(), dim=1)


def rmac(x):
    """Upstream's R-MAC variant: L2-normalise over channels, max-pool regions
    of 3p/2 x 3p/2 with stride p = floor(2/7 of the shorter side) (a 3x3 grid
    for 224-pixel frames), L2-normalise each region, sum, L2-normalise.
    x: (N, C, H, W) -> (N, C) float32."""
    x = l2_normalize(x.float(), dim=1)
    p = int(min(x.shape[-2:]) * 2 / 7)
    x = F.max_pool2d(x, kernel_size=int(p + p / 2), stride=p)  # (N, C, 3, 3)
    x = l2_normalize(x.flatten(2), dim=1).sum(dim=-1)  # (N, C)
    return l2_normalize(x, dim=1)


POOLING = {"imac": imac, "rmac": rmac}


class FrameFeatureExtractor(nn.Module):
    """ResNet-50 trunk whose layer1..layer4 outputs are pooled (iMAC or R-MAC)
    and concatenated: (N, 3, 224, 224) -> (N, 3840), each layer's block of
    channels unit-norm. The avgpool/fc head is never run."""

    def __init__(self, backbone, pooling="imac"):
        super().__init__()
        self.backbone = backbone
        self.pool = POOLING[pooling]

    def forward(self, images):
        net = self.backbone
        x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        pooled = []
        for name in LAYERS:
            x = getattr(net, name)(x)
            pooled.append(self.pool(x))  # float32 (N, C) also under bf16 autocast
        return torch.cat(pooled, dim=1)


def load_backbone(weights=None, random_weights=False):
    """torchvision ResNet-50: ImageNet weights (IMAGENET1K_V1, the weights
    `pretrained=True` gave upstream) from torchvision's cache or download, a
    local state-dict file, or - for offline tests only - fixed random weights."""
    if random_weights:
        print("WARNING: --random-weights: ResNet-50 is randomly initialised (seed 0); "
              "the features are only good for testing the pipeline", file=sys.stderr)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return torchvision.models.resnet50(weights=None)
    if weights is not None:
        model = torchvision.models.resnet50(weights=None)
        try:
            model.load_state_dict(load_state_dict(weights))
        except RuntimeError as e:
            raise UserError(f"{weights}: not a torchvision ResNet-50 state dict ({str(e).splitlines()[0]})") from None
        return model
    try:
        return torchvision.models.resnet50(weights=torchvision.models.ResNet50_Weights.IMAGENET1K_V1)
    except Exception as e:  # no network: URLError, OSError, ...
        url = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
        raise UserError(f"cannot get the ImageNet ResNet-50 weights ({type(e).__name__}: {e}); "
                        f"download {url} elsewhere and pass --weights PATH") from None


def build_extractor(feature="imac", weights=None, random_weights=False, device="cpu", channels_last=False):
    model = FrameFeatureExtractor(load_backbone(weights, random_weights), feature)
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


# --------------------------------------------------------------------------
# frames -> features

def preprocess(frames, device="cpu", channels_last=False):
    """Upstream's Resize(256) / CenterCrop(224) / ImageNet normalisation, on a
    batch. frames: uint8 (N, H, W, 3) RGB -> float (N, 3, 224, 224). The
    resize is a no-op for the 256x256 frames of decode_windows."""
    x = frames.to(device, non_blocking=True).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
    if min(x.shape[-2:]) != 256:
        x = TF.resize(x, [256], antialias=True)
    x = TF.center_crop(x, [224, 224])
    x = TF.normalize(x.float().div_(255), IMAGENET_MEAN, IMAGENET_STD)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@torch.inference_mode()
def extract_batch(model, frames, device="cpu", channels_last=False, bf16=False):
    """uint8 frames (N, H, W, 3) -> features (N, D) float32 on the CPU."""
    device = torch.device(device)
    images = preprocess(frames, device, channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        features = model(images)
    return features.float().cpu()


def frame_windows(path, fps=None, window=WINDOW):
    """The frames of one video in windows of at most `window`, uint8
    (n, H, W, 3): decoded at `fps` (extract_frames.decode_windows), or, fps
    None, read from an .npy file of extract_frames.py (memory-mapped, so
    also a long one is never held whole). Raises VideoError, possibly after
    some windows."""
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


def batches(windows, batch_size):
    """The frames of `windows` (uint8 (n, H, W, 3) arrays) as tensors of
    batch_size consecutive frames, the last possibly smaller: the batches a
    whole video's frames would be split into, so the features do not depend
    on the window size."""
    carried = None  # fewer than batch_size frames from the end of the previous window
    for window in windows:
        frames = torch.from_numpy(window)
        if carried is not None:
            take = batch_size - len(carried)
            carried, frames = torch.cat([carried, frames[:take]]), frames[take:]
            if len(carried) < batch_size:
                continue
            yield carried
        whole = len(frames) // batch_size * batch_size
        yield from frames[:whole].split(batch_size)
        carried = frames[whole:] if whole < len(frames) else None
    if carried is not None:
        yield carried


def feature_chunks(model, path, fps, batch_size, window=WINDOW, channels_last=False, bf16=False):
    """The features (n, D) float32 of one video, about `window` frames at a
    time: decoded at `fps` (None: an .npy frame file) a window at a time and
    run through the CNN in batches of batch_size frames, so that neither its
    frames nor its features are ever held whole. Raises VideoError."""
    features, held = [], 0
    for batch in batches(frame_windows(path, fps, window), batch_size):
        features.append(extract_batch(model, batch, "cpu", channels_last, bf16))
        held += len(features[-1])
        if held >= window:
            yield torch.cat(features)
            features, held = [], 0
    if features:
        yield torch.cat(features)


def _lane_init():
    # One thread per lane, and not only for speed: a forked child whose parent
    # has used OpenMP (GNU libgomp) hangs in its first multi-threaded region.
    torch.set_num_threads(1)


def _failed(videos):
    """run_in_lanes' on_death: the item of a video whose worker died."""
    return lambda index, cause: (*videos[index], None, cause)


def _stream_in_lanes(videos, produce, lanes):
    """run_in_lanes over `videos` [(id, path)]: produce(path) yields a
    video's numpy pieces in a lane and raises VideoError. Yields, in the
    order of `videos`, each video's pieces (video_id, path, tensor, None),
    then its end (video_id, path, None, None), or, if it fails, possibly
    after some pieces, (video_id, path, None, error)."""
    def pieces(index):  # in a lane: numpy arrays cross, not tensors
        video_id, path = videos[index]
        try:
            for piece in produce(path):
                yield video_id, path, piece, None
        except VideoError as e:
            yield video_id, path, None, str(e)
            return
        yield video_id, path, None, None

    for video_id, path, piece, error in run_in_lanes(pieces, len(videos), lanes, _lane_init, _failed(videos)):
        yield video_id, path, torch.from_numpy(piece) if piece is not None else None, error


def iterate_videos(videos, fps=None, workers=2, window=WINDOW):
    """Decode (or load) `videos` [(id, path)] in `workers` background
    processes (run_in_lanes: one that dies costs only its video), while the
    main process runs the CNN (extract_videos). Yields _stream_in_lanes'
    items, the pieces being the videos' windows, uint8 (n, H, W, 3)."""
    return _stream_in_lanes(videos, lambda path: frame_windows(path, fps, window), workers)


def extract_in_lanes(model, videos, fps=None, lanes=2, batch_size=CPU_BATCH_SIZE, channels_last=False,
                     bf16=False, window=WINDOW):
    """CPU extraction in `lanes` single-threaded worker processes (one per
    core is best), each of which decodes a video, runs the CNN on it, then
    takes the next one. Each core thus alternates between decoding and the
    CNN, and no CNN thread waits at a barrier for a core a decoder holds (what
    slows iterate_videos + extract_videos down on a CPU). Yields (video_id,
    path, features (T, D) or None, error or None) in the order of `videos`;
    a lane that dies costs only its video, which comes back with the cause as
    its error. lanes 0: everything in this process, with its threads."""
    def produce(path):
        return (chunk.numpy() for chunk in feature_chunks(model, path, fps, batch_size, window, channels_last, bf16))

    # a lane sends a video's features a window at a time and the main process joins them: no
    # lane holds a whole video's features
    chunks = []
    for video_id, path, chunk, error in _stream_in_lanes(videos, produce, lanes):
        if chunk is not None:
            chunks.append(chunk)
            continue
        yield video_id, path, torch.cat(chunks) if error is None else None, error
        chunks = []


class _PendingVideo:
    def __init__(self, video_id, path):
        self.video_id, self.path = video_id, path
        self.frames = torch.empty(0, 0, 0, 3, dtype=torch.uint8)  # received, not yet through the CNN
        self.complete = False  # all its windows have been received
        self.features = []  # the (n, D) chunks of the frames through the CNN

    def add(self, window):
        self.frames = torch.cat([self.frames, window]) if len(self.frames) else window

    def take(self, n):
        frames, self.frames = self.frames[:n], self.frames[n:]
        return frames


def extract_videos(model, items, batch_size=64, device="cpu", channels_last=False, bf16=False):
    """Run the CNN over the frames of `items` (iterate_videos' windows and
    ends) in batches of `batch_size` frames that cross video boundaries, so
    short videos do not leave batches half-empty. Yields (video_id, path,
    features (T, D) or None, error or None): a failure at once, a video's
    features once all its windows have been through the CNN, in order."""
    pending = []  # videos with frames still to run or windows still to come, in order

    def finished():
        while pending and pending[0].complete and len(pending[0].frames) == 0:  # videos complete in order
            video = pending.pop(0)
            yield video.video_id, video.path, torch.cat(video.features), None

    def run_batch():
        batch, room = [], batch_size  # (video, its frames in this batch)
        for video in pending:
            frames = video.take(room)
            if len(frames):
                batch.append((video, frames))
                room -= len(frames)
        features = extract_batch(model, torch.cat([f for _, f in batch]), device, channels_last, bf16)  # (N, D)
        for (video, frames), chunk in zip(batch, features.split([len(f) for _, f in batch])):
            video.features.append(chunk)
        yield from finished()

    def waiting():
        return sum(len(video.frames) for video in pending)

    for video_id, path, frames, error in items:
        if not pending or pending[-1].video_id != video_id or pending[-1].complete:
            pending.append(_PendingVideo(video_id, path))
        if frames is not None:
            pending[-1].add(frames)
            while waiting() >= batch_size:
                yield from run_batch()
        elif error is not None:
            pending.pop()  # what it had through the CNN is dropped
            yield video_id, path, None, error
        else:
            pending[-1].complete = True
            yield from finished()
    while waiting():
        yield from run_batch()


def uses_lanes(schedule, device_type):
    """Whether --schedule runs extract_in_lanes: 'auto' does on a CPU, and
    on a GPU overlaps decoding workers with the CNN (extract_videos)."""
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


def extract(model, videos, fps=None, workers=2, batch_size=CPU_BATCH_SIZE, device="cpu", channels_last=False,
            bf16=False, schedule="auto", window=WINDOW):
    """Features of `videos` [(id, path)]: (video_id, path, features (T, D) or
    None, error or None) as each completes, by extract_in_lanes or
    iterate_videos + extract_videos as `schedule` says; the frames are
    decoded `window` at a time, so memory does not grow with a video's length."""
    if uses_lanes(schedule, torch.device(device).type):
        return extract_in_lanes(model, videos, fps, workers, batch_size, channels_last, bf16, window)
    return extract_videos(model, iterate_videos(videos, fps, workers, window), batch_size, device, channels_last,
                          bf16)


# --------------------------------------------------------------------------

def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--video_list",
                        help="videos to decode: file of 'id<TAB>path' lines (paths relative to the file) "
                             "or a quoted glob pattern with {id}, e.g. 'videos/*/{id}.mp4'")
    source.add_argument("--frames_dir", help="directory of <id>.npy frame files written by extract_frames.py")
    parser.add_argument("--output", required=True,
                        help="HDF5 file to write, one (T, 3840) dataset per video id ((T, --components) with "
                             "--pca_params); under horovodrun its directory must be shared by every host")
    parser.add_argument("--feature", choices=sorted(POOLING), default="imac",
                        help="pooling of each layer: iMAC (global max, TCA's default) or upstream's R-MAC")
    parser.add_argument("--fps", type=float, default=1.0, help="frames per second decoded (--video_list only)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", help="local ResNet-50 state dict (e.g. torchvision's resnet50-0676ba61.pth) "
                                           "instead of downloading the ImageNet weights")
    weights.add_argument("--random_weights", "--random-weights", action="store_true",
                         help="randomly initialised ResNet-50 (seed 0), for offline tests only")
    parser.add_argument("--pca_params", default=None,
                        help="PCA parameters (.npz of pca.py --learn): store the PCA-whitened, L2-normalised "
                             "features, as pca.py --apply would, instead of the 3840-d ones")
    parser.add_argument("--components", type=int, default=None,
                        help="with --pca_params: dimensions kept; None: 1024, as pca.py --apply")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="stored precision; float16 halves the file (every reader computes in float32)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="frames per CNN forward, across videos; None: 8 on a CPU (faster there than "
                             "bigger batches), 64 on a GPU")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes (0: all in the main process); None: with lanes one per core "
                             "(under horovodrun, per core of this rank's share of its host; each lane holds a window "
                             "of 256 frames, 48 MB, a batch's activations, ~0.2 GB at batch 8, and its video's "
                             "features, 15 KB a frame: ~0.8 GB resident in all, whatever the video's length), "
                             "with overlap 2")
    parser.add_argument("--schedule", choices=SCHEDULES, default="auto",
                        help="lanes (CPU only): each worker decodes a video and runs the CNN on it with one "
                             "thread, so every core alternates between the two; overlap: the workers only decode, "
                             "ahead of the CNN in the main process (for a GPU); auto: lanes on a CPU, overlap on "
                             "a GPU")
    parser.add_argument("--device", default=None,
                        help="torch device for the CNN; None: this rank's local GPU (its local rank under "
                             "horovodrun) if there is one, else the CPU")
    parser.add_argument("--channels_last", "--channels-last", action="store_true",
                        help="run the CNN in channels-last memory format (faster convolutions on recent CPUs/GPUs)")
    parser.add_argument("--bf16", nargs="?", const="on", choices=("off", "on", "auto"), default="off",
                        help="run the CNN under bfloat16 autocast (pooling stays fp32; features differ slightly "
                             "from fp32); --bf16 alone: on; auto: on where it runs faster here (CPUs with AMX; "
                             "elsewhere a few seconds' timing of both at start-up), or as the output being "
                             "resumed was made")
    parser.add_argument("--checkpoint_every", type=float, default=60.0,
                        help="seconds between saves of finished videos; a killed run loses at most this much work")
    parser.add_argument("--failures", default=None,
                        help="where to list the videos that failed (a file this program wrote, or none: another "
                             "file is refused); None: OUTPUT.failures.tsv")
    return parser


def list_frame_files(frames_dir):
    if not os.path.isdir(frames_dir):
        raise UserError(f"{frames_dir}: frames directory not found")
    paths = sorted(glob.glob(os.path.join(frames_dir, "**", "*.npy"), recursive=True))  # skips .tmp files
    if not paths:
        raise UserError(f"{frames_dir}: no .npy frame files")
    return [(os.path.relpath(path, frames_dir)[:-len(".npy")], path) for path in paths]


def weights_identity(weights=None, random_weights=False):
    """What the features depend on in the ResNet-50 weights, as recorded in the output."""
    if random_weights:
        return "random:seed0"
    if weights is not None:
        if not os.path.isfile(weights):
            raise UserError(f"{weights}: weights file not found")
        return file_digest(weights)
    return "torchvision:" + str(torchvision.models.ResNet50_Weights.IMAGENET1K_V1)


def stored(features, pca_params=None, dtype="float32"):
    """What the output holds for a video's (T, 3840) features: them, or
    their PCA-whitening (pca.py's), at `dtype`."""
    features = features.numpy()
    if pca_params is not None:
        features = apply_pca(features, pca_params)
    return features.astype(dtype, copy=False)


def bf16_is_faster(model, device, channels_last, batch_size, threads, cpuinfo="/proc/cpuinfo"):
    """--bf16 auto: whether bfloat16 autocast runs `model` faster than fp32
    on this machine. Yes on CPUs with AMX (a bf16 matrix unit). Elsewhere
    the two are timed on one batch, the better of two tries each after a
    warm-up, with `threads` threads (1: as a lane runs it): on AVX512-BF16
    without AMX, bf16 measured slower than fp32 in one setting (issue 13)
    and faster in another (BENCHMARKS.md). Returns (faster, why)."""
    try:
        with open(cpuinfo) as f:
            if device.type == "cpu" and "amx_bf16" in f.read().split():
                return True, "the CPU has AMX"
    except OSError:
        pass
    frames = torch.randint(0, 256, (batch_size, 256, 256, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    saved_threads, rates = torch.get_num_threads(), {False: [], True: []}
    torch.set_num_threads(threads)
    try:
        for bf16 in (False, True) * 3:
            begin = time.perf_counter()
            extract_batch(model, frames, device, channels_last, bf16)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rates[bf16].append(batch_size / (time.perf_counter() - begin))
    finally:
        torch.set_num_threads(saved_threads)
    fp32, bf16 = max(rates[False][1:]), max(rates[True][1:])  # the first of each warms up
    return bf16 > fp32, f"bf16 {bf16:.1f} vs fp32 {fp32:.1f} frames/s"


def main():
    args = get_args_parser().parse_args()
    limit_heap_growth()  # also in this process: lanes 0, or the CNN of --schedule overlap
    dist = sharding.start()
    device = local_device(dist, args.device)
    if args.batch_size is None:
        args.batch_size = CPU_BATCH_SIZE if device.type == "cpu" else GPU_BATCH_SIZE
    lanes = uses_lanes(args.schedule, device.type)
    if args.workers is None:
        args.workers = default_workers(lanes, dist.local_size)
    if args.fps <= 0 or args.batch_size <= 0 or args.workers < 0:
        raise UserError("--fps and --batch_size must be positive, --workers non-negative")
    if args.components is not None and args.pca_params is None:
        raise UserError("--components needs --pca_params")
    if args.video_list is not None:
        videos, fps = read_video_list(args.video_list), args.fps
    else:
        videos, fps = list_frame_files(args.frames_dir), None
    check_video_ids([video_id for video_id, _ in videos], args.video_list or args.frames_dir)
    pca_params, width = None, FEATURE_DIMS
    if args.pca_params is not None:
        pca_params = load_params(args.pca_params, args.components or 1024)
        if len(pca_params["mu"]) != FEATURE_DIMS:
            raise UserError(f"{args.pca_params}: a PCA of {len(pca_params['mu'])}-d features, "
                            f"not of the {FEATURE_DIMS}-d ResNet-50 {args.feature}")
        width = pca_params["U"].shape[1]
    # what changes the stored features; pca.py --apply records the same keys
    settings = {"fps": fps if fps is not None else "frames_dir", "feature": args.feature,
                "weights": weights_identity(args.weights, args.random_weights), "bf16": args.bf16 == "on",
                "channels_last": args.channels_last, "components": width, "dtype": args.dtype,
                "pca_params": file_digest(args.pca_params) if args.pca_params else "none"}
    failures_path = args.failures or args.output + ".failures.tsv"
    check_failures_path(failures_path)

    def build():
        return build_extractor(args.feature, args.weights, args.random_weights, device, args.channels_last)

    model, lock = None, OutputLock(args.output)

    def prepare():  # rank 0: one writer per output, the speed mode, then what is already done
        nonlocal model
        lock.acquire()
        try:
            if args.bf16 == "auto":
                recorded = recorded_settings(args.output)
                if "bf16" in recorded:
                    settings["bf16"], why = recorded["bf16"], f"as {args.output} was made"
                else:
                    model = build()
                    settings["bf16"], why = bf16_is_faster(model, device, args.channels_last, args.batch_size,
                                                           1 if lanes else torch.get_num_threads())
                print(f"--bf16 auto: {'on' if settings['bf16'] else 'off'} ({why})", flush=True)
            return lock.holder, scan_output(args.output, settings), new_run_id(), settings["bf16"]
        except BaseException:
            lock.release()
            raise

    holder, done, run, settings["bf16"] = sharding.on_rank0(dist, prepare)
    try:
        sharding.check_shared_directory(dist, lock.path, holder)
        todo = [(video_id, path) for video_id, path in videos if video_id not in done]
        mine = sharding.share(todo, dist)
        if dist.rank == 0:
            print(f"{len(videos)} videos, {len(videos) - len(todo)} already done, {len(todo)} to extract"
                  + (f" by {dist.size} ranks" if dist.size > 1 else ""), flush=True)
        if model is None:
            model = build()

        writer = PartWriter(args.output, settings, args.checkpoint_every, run, dist.rank)
        start, num_frames, failures = time.time(), 0, []
        try:
            with tqdm(total=len(mine), unit="video", disable=dist.rank != 0) as bar:
                for video_id, path, features, error in extract(model, mine, fps, args.workers, args.batch_size,
                                                               device, args.channels_last, settings["bf16"],
                                                               args.schedule):
                    if error is not None:
                        tqdm.write(f"skipping {video_id} ({path}): {error}", file=sys.stderr)
                        failures.append((video_id, path, error))
                    else:
                        writer.add(video_id, stored(features, pca_params, args.dtype))
                        num_frames += len(features)
                    bar.update()
                    bar.set_postfix(frames_per_s=f"{num_frames / (time.time() - start):.1f}")
        finally:
            writer.flush()  # also when interrupted: the finished videos are kept
        ranks = sharding.gather(dist, (writer.written, failures, num_frames))
        if dist.rank != 0:
            return
        elapsed = time.time() - start
        sharding.check_parts_visible([part for parts, _, _ in ranks for part in parts])
        merge_parts(args.output, settings)
        merge_time = time.time() - start - elapsed
        order = {video_id: i for i, (video_id, _) in enumerate(videos)}
        failures = sorted((failure for _, failures, _ in ranks for failure in failures), key=lambda f: order[f[0]])
        write_failures(failures_path, failures)
    finally:
        lock.release()

    num_frames = sum(frames for _, _, frames in ranks)
    print(f"extracted {len(todo) - len(failures)} videos ({num_frames} frames, "
          f"{num_frames / max(elapsed, 1e-9):.1f} frames/s) into {args.output}, "
          f"skipped {len(videos) - len(todo)} already done, failed {len(failures)}"
          + (f" (listed in {failures_path})" if failures else "") + f"; merged in {merge_time:.1f} s")


if __name__ == "__main__":
    run_main(main)
