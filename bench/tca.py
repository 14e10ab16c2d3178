"""TCA_c video embeddings: model.TCA through retrieval.encode_videos against
upstream's evaluation loop (batch size 1, every video padded to 300 frames)."""
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import retrieval
from bench.common import Target, fmt, gflops_summary, interleaved, pct, per_round, random_lengths, random_videos, \
    rates_against_peak, summary, table, tca_flops
from model import TCA
from utils import FRAMES_PER_BATCH, make_frame_mask, pad_sequences

SIZES = {"full": dict(videos=128, min_frames=30, max_frames=300, channels=1024, padding_size=300, repeats=3),
         "quick": dict(videos=6, min_frames=5, max_frames=40, channels=256, padding_size=40, repeats=2)}
TARGETS = (
    Target("TCA_c encoding speed-up vs upstream loop", ("speedup",), 1.8, "≥ 1.8×"),
    Target("TCA_c useful GFLOP/s / matmul peak", ("project", "useful_fraction_of_peak"), 0.7, "≥ 70%"),
)
CHUNK_FRAMES = 100  # the chunked contender: attention within 100-frame pieces


class UpstreamTCA(nn.Module):
    """TCA's forward as upstream writes it (xwen99/temporal_context_aggregation,
    model.py), made device-agnostic: a (T, N, C) nn.TransformerEncoder with a
    key padding mask, the masked mean of its outputs, L2-normalised. Same
    parameter names as model.TCA, so one state dict serves both."""

    def __init__(self, feature_size=1024, nhead=8, nlayers=1, dropout=0.1):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=feature_size, nhead=nhead, dim_feedforward=2048, dropout=dropout)
        with warnings.catch_warnings():  # "enable_nested_tensor is True, but ... batch_first was not True"
            warnings.simplefilter("ignore")
            self.transformer_encoder = nn.TransformerEncoder(layer, nlayers)

    def forward(self, x, num_frames):
        x = x.permute(2, 0, 1)  # (T, N, C)
        frame_mask = make_frame_mask(num_frames, x.shape[0]).float()  # (N, T)
        output = self.transformer_encoder(x, src_key_padding_mask=(1 - frame_mask).bool())  # (T, N, C)
        output = output.permute(1, 0, 2) * frame_mask.unsqueeze(-1)  # (N, T, C)
        return F.normalize(output.sum(1) / frame_mask.sum(1, keepdim=True), p=2, dim=1)  # (N, C)


def upstream_encode_loop(model, videos, padding_size):
    """Upstream's evaluation loop: a DataLoader of batch size 1 whose
    FeatureDataset zero-pads every video to padding_size frames."""
    embeddings = []
    with torch.no_grad():
        for video in videos:  # (T, C)
            padded, num_frames = pad_sequences([video], max_frames=padding_size)  # (1, padding_size, C), (1,)
            embeddings.append(model(padded.transpose(1, 2), num_frames)[0])
    return torch.stack(embeddings)  # (N, C)


def project_encode(model, videos, padding_size):
    """evaluation.py's model mode (retrieval.py): encode_videos batches videos of similar
    length (padding_size 0: whole videos; else chunks of that many frames)."""
    features = {str(i): v.numpy() for i, v in enumerate(videos)}
    lengths = np.array([len(v) for v in videos])
    out = torch.empty(len(videos), videos[0].shape[1])
    for batch in retrieval.encode_videos(model, features, list(features), lengths, padding_size=padding_size,
                                         desc="bench"):
        out[torch.as_tensor(batch.indices)] = batch.embeddings
    return out


def run(size, peak):
    C = size["channels"]
    lengths = random_lengths(size["videos"], size["min_frames"], size["max_frames"], seed=1)
    videos = random_videos(lengths, C, seed=1)
    torch.manual_seed(0)
    model = TCA(feature_size=C, nlayers=1).eval()
    upstream = UpstreamTCA(feature_size=C, nlayers=1).eval()
    upstream.load_state_dict(model.state_dict())
    feedforward = model.transformer_encoder.layers[0].linear1.out_features

    with torch.no_grad():
        ours, theirs = project_encode(model, videos, 0), upstream_encode_loop(upstream, videos, size["padding_size"])
    max_diff = float((ours - theirs).abs().max())

    peak_run, peak_flops = peak
    seconds = interleaved({
        "upstream_loop": lambda: upstream_encode_loop(upstream, videos, size["padding_size"]),
        "project": lambda: project_encode(model, videos, 0),
        "project_chunks100": lambda: project_encode(model, videos, CHUNK_FRAMES),
        "peak": peak_run,
    }, size["repeats"], size["warmup"])
    useful = tca_flops(lengths, C, feedforward)
    padded = tca_flops(np.full(len(lengths), size["padding_size"]), C, feedforward)
    result = {"config": size | {"mean_frames": float(lengths.mean())},
              "useful_gflop_per_video": useful / len(lengths) / 1e9,
              "upstream_padding_share": 1 - useful / padded,
              "max_abs_diff_vs_upstream": max_diff,
              "peak_gflops": gflops_summary(peak_flops, seconds["peak"])}
    for name in ("upstream_loop", "project", "project_chunks100"):
        gflops, fraction = rates_against_peak(seconds[name], useful, seconds["peak"], peak_flops)
        result[name] = {"videos_per_s": summary([len(videos) / s for s in seconds[name]], "videos/s"),
                        "useful_gflops": gflops, "useful_fraction_of_peak": fraction}
    result["upstream_loop"]["computed_gflops"] = gflops_summary(padded, seconds["upstream_loop"])
    result["speedup"] = summary(per_round(lambda u, p: u / p, seconds["upstream_loop"], seconds["project"]), "x")
    result["speedup_chunks100"] = summary(
        per_round(lambda u, p: u / p, seconds["upstream_loop"], seconds["project_chunks100"]), "x")
    return result


def render(result, meta):
    c = result["config"]
    default_chunks = retrieval.PADDING_SIZE
    lines = ["## TCA_c encoding\n",
             f"{c['videos']} videos of {c['min_frames']}–{c['max_frames']} frames (mean {c['mean_frames']:.0f}) "
             f"at {c['channels']}-d, 1-layer TCA, eval mode; {result['useful_gflop_per_video']:.2f} useful GFLOP per "
             f"video. Upstream-style loop: batch size 1, every video padded to {c['padding_size']} frames "
             f"({100 * result['upstream_padding_share']:.0f}% of its FLOPs are padding). Project: "
             f"`retrieval.encode_videos` (videos sorted by length, batched up to {FRAMES_PER_BATCH:,} padded "
             "frames) with `model.TCA`; max |difference| of the embeddings vs upstream "
             f"{result['max_abs_diff_vs_upstream']:.1e}.\n"]
    contenders = (("upstream_loop", f"upstream loop (batch size 1, padded to {c['padding_size']})"),
                  ("project", "project, whole videos (`--padding_size 0`)"),
                  ("project_chunks100", f"project, {CHUNK_FRAMES}-frame chunks (`--padding_size {CHUNK_FRAMES}`)"))
    lines += table(("", "videos/s", "useful GFLOP/s", "of peak"), [
        (label, fmt(result[name]["videos_per_s"]), fmt(result[name]["useful_gflops"]),
         pct(result[name]["useful_fraction_of_peak"])) for name, label in contenders])
    whole = (f" evaluation.py's default, `--padding_size {default_chunks}`, keeps these videos whole (the second row)."
             if c["max_frames"] <= default_chunks else "")
    lines.append(f"\nSpeed-up, whole videos: **{fmt(result['speedup'])}**; {CHUNK_FRAMES}-frame chunks: "
                 f"{fmt(result['speedup_chunks100'])} (chunks change the embedding: attention stays within a chunk)."
                 f"{whole} Upstream loop computes {fmt(result['upstream_loop']['computed_gflops'])} including "
                 f"padding. Peak in these rounds: {fmt(result['peak_gflops'])}.\n")
    return lines
