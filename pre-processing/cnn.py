"""Frames to features: the ImageNet ResNet-50 (its weights, and what they
are recorded as), the preprocessing of a batch of frames, iMAC (or
upstream's R-MAC) pooling of the outputs of layer1..layer4 into one
3840-d vector per frame, as TCA's pre-processing does, and the batch size
and precision the CNN runs at.
"""
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms.v2 import functional as TF

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import UserError, check_input_file, l2_normalize, load_state_dict  # noqa: E402
from writer import file_digest  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYERS = ("layer1", "layer2", "layer3", "layer4")  # 256 + 512 + 1024 + 2048 = 3840 channels
FEATURE_DIMS = 3840
# Default frames per forward: CPUs run small batches faster per frame, GPUs
# want large ones (bench/NOTES.md).
CPU_BATCH_SIZE, GPU_BATCH_SIZE = 8, 64
# The weights of `weights=RANDOM_WEIGHTS`, and how every file records them.
RANDOM_WEIGHTS = "random:seed0"
IMAGENET_WEIGHTS = "torchvision:" + str(torchvision.models.ResNet50_Weights.IMAGENET1K_V1)


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


def load_backbone(weights=None):
    """torchvision ResNet-50: ImageNet weights (IMAGENET1K_V1, the weights
    `pretrained=True` gave upstream) from torchvision's cache or download
    (weights None), a local state-dict file (a path), or - for offline tests
    only - fixed random weights (RANDOM_WEIGHTS)."""
    if weights == RANDOM_WEIGHTS:
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


def weights_identity(weights=None):
    """What the features depend on in the ResNet-50 `weights` (as load_backbone
    takes them), as every output records it: RANDOM_WEIGHTS, IMAGENET_WEIGHTS
    or the weights file's 'sha256:...'."""
    if weights is None or weights == RANDOM_WEIGHTS:
        return weights or IMAGENET_WEIGHTS
    check_input_file(weights, "weights file")
    return file_digest(weights)


def build_extractor(feature="imac", weights=None, device="cpu", channels_last=False):
    model = FrameFeatureExtractor(load_backbone(weights), feature)
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
