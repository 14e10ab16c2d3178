"""`make demo`: the whole TCA pipeline on the mini benchmark, in a few minutes on CPU.

    1. demo/build_benchmark.py          videos + vcdb.pickle (train) + fivr.pickle (eval)
    2. pre-processing/extract_features.py  ResNet-50 iMAC frame features, per split (under horovodrun,
                                        one rank per GPU, where there are two or more GPUs)
    3. pre-processing/pca.py            PCA-whitening learned on the train split, applied to both
    4. horovodrun -np 2 train.py        TCA trained on the train split's copy pairs, validated on the
                                        eval split every epoch (curves.png, TensorBoard in model/)
    5. evaluation.py                    FIVR-style DSVR/CSVR/ISVR mAP of the untrained baseline
                                        (PCA features, mean / chamfer) and TCA_c, TCA_f, TCA_sym
    6. index.py, search.py              the eval split indexed, searched with two query video files
                                        (docs/search.md)

Every command is printed before it runs, so each step can be re-run by hand.
A step whose output already exists is skipped: delete --out to start over.

Departures from the paper's settings, all forced by the demo's size: frames
are sampled at --fps 4 rather than 1 (clips are a few seconds long), and the
PCA keeps --components 256 rather than 1024 (the train split has a few hundred
frames; whitening more directions than that would divide by zero variances).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import UserError, load_pickle, run_main  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ["DSVR", "CSVR", "ISVR"]
GLOBAL_BATCH, LEARNING_RATE = 4, 1e-4  # pairs per step over all workers, learning rate of the whole step
BENCHMARK_FLAGS = ["--train_procedural", "29", "--train_copies", "8", "--backgrounds", "24",
                   "--procedural", "12", "--distractors", "16"]


def get_args_parser():
    parser = argparse.ArgumentParser("Run the TCA pipeline on the mini benchmark", add_help=True)
    parser.add_argument("--out", default="demo_output", help="directory for every output (benchmark, features, model, results)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the benchmark, the PCA frame sampling and the training")
    parser.add_argument("--fps", type=float, default=4.0, help="frames per second sampled for features (the paper: 1)")
    parser.add_argument("--components", type=int, default=256, help="PCA-whitened feature size (the paper: 1024)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs")
    parser.add_argument("--np", type=int, default=2, help="Horovod workers: 1 (plain single-process training), 2 or 4 (they share the global batch of 4 pairs)")
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                        help="extract features under bfloat16 autocast; auto: where it runs faster on this "
                             "machine (AMX, or extract_features.py's timing of both at start-up), decided once "
                             "for both splits, so the table depends on the CPU. Extraction always uses "
                             "--channels_last (same features as fp32 to 1e-4, faster on CPU)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", help="local torchvision ResNet-50 ImageNet state dict (resnet50-0676ba61.pth), "
                                           "for machines that cannot download it")
    weights.add_argument("--random_weights", "--random-weights", action="store_true",
                         help="random ResNet-50 (what the demo falls back to, with a warning, when neither flag is "
                              "given and the ImageNet weights are neither in the torch hub cache nor downloadable)")
    return parser


def imagenet_weights_available(timeout=5.0):
    """True if torchvision's ImageNet ResNet-50 is in the torch hub cache or its
    URL answers within `timeout` seconds (extract_features.py then downloads it)."""
    import torch
    import torchvision
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    if os.path.exists(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))):
        return True
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except Exception:  # no network, DNS failure, proxy refusal, timeout, ...
        return False


def choose_backbone(args, available=imagenet_weights_available):
    """extract_features.py flags for the ResNet-50 weights, and their name for the table."""
    if args.weights:
        return ["--weights", args.weights], f"ImageNet ResNet-50 ({args.weights})"
    if args.random_weights:
        return ["--random_weights"], "random ResNet-50 (--random_weights)"
    if available():
        return [], "ImageNet ResNet-50 (torchvision IMAGENET1K_V1)"
    print("[demo] WARNING: ImageNet ResNet-50 weights neither cached nor downloadable: falling back to a RANDOM "
          "ResNet-50 (pass --weights resnet50-0676ba61.pth for real features)", flush=True)
    return ["--random_weights"], "random ResNet-50 (ImageNet weights unavailable offline)"


def extraction_ranks(np):
    """Ranks for the sharded extraction: one per GPU, up to --np, when there
    are two or more; else one process. On a CPU the lanes of one process
    already keep every core busy, so ranks would only add horovodrun's
    start-up (2 ranks ran 0.95-1.05x one process on 2 cores, README)."""
    import torch
    gpus = torch.cuda.device_count()
    return min(np, gpus) if gpus >= 2 else 1


def recorded_bf16(path):
    """Whether the features in `path` were extracted under bf16, as
    extract_features.py records it (None: not recorded, an older run's)."""
    import h5py
    with h5py.File(path, "r") as f:
        return None if "bf16" not in f.attrs else bool(f.attrs["bf16"])


def horovodrun(np, py):
    """The launcher's command line for `np` local ranks."""
    launcher = shutil.which("horovodrun", path=os.path.dirname(py)) or shutil.which("horovodrun")
    if launcher is None:
        raise UserError("horovodrun not found (run `make install`), or pass --np 1 for single-process training")
    return [launcher, "-np", str(np), "-H", f"localhost:{np}"]


# the "[1,0]<stderr>:" (mpirun) or "[0]<stdout>:" (Gloo) tag horovodrun puts before every piece of a rank's
# output, which cuts a progress bar's carriage-return updates into fragments
LAUNCHER_TAG = re.compile(rb"\[\d+(?:,\d+)?\]<std(?:out|err)>:")


def untag(chunks, out):
    """Copy the launcher's output, read in `chunks`, to `out` without its rank tags,
    so the demo's log shows the progress bars and results as one process
    prints them (a tag split between two reads is held back until whole)."""
    pending = b""
    for chunk in chunks:
        data = pending + chunk
        start = data.rfind(b"[")
        keep = start >= 0 and len(data) - start < 24 and LAUNCHER_TAG.match(data, start) is None
        data, pending = (data[:start], data[start:]) if keep else (data, b"")
        out.write(LAUNCHER_TAG.sub(b"", data))
        out.flush()
    out.write(LAUNCHER_TAG.sub(b"", pending))
    out.flush()


def step(name, cmd, output):
    """Run `cmd` unless `output` exists; fail with the step's name."""
    if os.path.exists(output):
        print(f"[demo] {name}: {output} exists, skipped", flush=True)
        return
    print(f"[demo] {name}: {' '.join(cmd)}", flush=True)
    start = time.time()
    if os.path.basename(cmd[0]) != "horovodrun":
        returncode = subprocess.run(cmd, cwd=REPO).returncode
    else:
        with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as launcher:
            untag(iter(lambda: launcher.stdout.read1(1 << 16), b""), sys.stdout.buffer)
        returncode = launcher.returncode
    if returncode != 0:
        raise UserError(f"step '{name}' failed (command above)")
    print(f"[demo] {name}: done in {time.time() - start:.0f} s", flush=True)


def main():
    args = get_args_parser().parse_args()
    if args.np < 1 or GLOBAL_BATCH % args.np:
        raise UserError(f"--np {args.np} must divide the global batch of {GLOBAL_BATCH} pairs")
    py = sys.executable
    out = os.path.abspath(args.out)
    bench = os.path.join(out, "benchmark")
    feats = os.path.join(out, "features")
    model_dir = os.path.join(out, "model")
    results = os.path.join(out, "results")
    os.makedirs(feats, exist_ok=True)
    os.makedirs(results, exist_ok=True)
    start = time.time()

    # 30 train copy groups of 9 videos and 14 eval queries instead of the
    # generator's defaults (5 groups of 6, 6 queries): with few copies per
    # source the transformer learns the sources instead of the
    # transformations, and TCA_c falls below the baseline (demo/README.md)
    step("benchmark", [py, "demo/build_benchmark.py", "--out", bench, "--seed", str(args.seed)] + BENCHMARK_FLAGS,
         os.path.join(bench, "benchmark.json"))

    # features of an existing run were extracted with the backbone that run chose
    backbone_note = os.path.join(feats, "backbone.txt")
    if all(os.path.exists(os.path.join(feats, f"{split}_imac.h5")) for split in ("train", "eval")) \
            and os.path.exists(backbone_note):
        with open(backbone_note) as f:
            backbone, backbone_name = [], f.read().strip()
    else:
        backbone, backbone_name = choose_backbone(args)
        with open(backbone_note, "w") as f:
            f.write(backbone_name + "\n")
    ranks = extraction_ranks(args.np)
    bf16 = args.bf16
    for split in ("train", "eval"):
        extract = [py, "pre-processing/extract_features.py", "--video_list", os.path.join(bench, f"{split}_videos.txt"),
                   "--output", os.path.join(feats, f"{split}_imac.h5"), "--fps", str(args.fps), "--channels_last",
                   "--bf16", bf16] + backbone
        step(f"features ({split})", horovodrun(ranks, py) + extract if ranks > 1 else extract,
             os.path.join(feats, f"{split}_imac.h5"))
        # the eval split is extracted as the train split was, whatever auto chose there
        recorded = recorded_bf16(os.path.join(feats, f"{split}_imac.h5"))
        bf16 = bf16 if recorded is None else "on" if recorded else "off"
    backbone_name += f", extracted with --channels_last, bf16 {bf16}" + (" (auto)" if args.bf16 == "auto" else "")

    pca_params = os.path.join(feats, "pca_params.npz")
    # every frame of the small train split: upstream samples 10 per video of 100k VCDB videos
    step("PCA (learn)", [py, "pre-processing/pca.py", "--learn", os.path.join(feats, "train_imac.h5"),
                         "--params", pca_params, "--frames_per_video", "1000", "--seed", str(args.seed)], pca_params)
    for split in ("train", "eval"):
        step(f"PCA (apply, {split})", [py, "pre-processing/pca.py", "--apply", os.path.join(feats, f"{split}_imac.h5"),
                                       "--params", pca_params, "--components", str(args.components),
                                       "--output", os.path.join(feats, f"{split}_pca.h5")],
             os.path.join(feats, f"{split}_pca.h5"))

    # the same global batch and learning rate whatever --np: train.py multiplies
    # the learning rate by the number of workers (as upstream), each worker
    # takes --batch_sz pairs
    per_worker_batch = GLOBAL_BATCH // args.np
    train = [py, "train.py", "--annotation_path", os.path.join(bench, "vcdb.pickle"),
             "--feature_path", os.path.join(feats, "train_pca.h5"), "--model_path", model_dir,
             "--pca_components", str(args.components), "--padding_size", "64", "--neg_num", "4",
             "--batch_sz", str(per_worker_batch), "--epochs", str(args.epochs),
             "--learning_rate", str(LEARNING_RATE / args.np),
             "--moco_k", "256", "--moco_m", "0", "--moco_t", "1.0", "--num_workers", "0",
             "--print-freq", "10", "--save_every", str(args.epochs), "--seed", str(args.seed),
             # validation curves on the demo's benchmark (it has no separate validation split, so the
             # table below evaluates the last epoch's model.pth, not model_best.pth)
             "--val_dataset", "FIVR-5K", "--val_annotation_dir", bench,
             "--val_feature_path", os.path.join(feats, "eval_pca.h5")]
    if args.np > 1:
        train = horovodrun(args.np, py) + train
    step("train", train, os.path.join(model_dir, "model.pth"))
    print(f"[demo] training curves: {os.path.join(model_dir, 'curves.png')}, or tensorboard --logdir {model_dir}",
          flush=True)

    runs = [("baseline (mean of PCA frames)", ["--baseline", "--metric", "cosine"]),
            ("baseline (chamfer of PCA frames)", ["--baseline", "--metric", "chamfer"]),
            ("TCA_c", ["--model_path", os.path.join(model_dir, "model.pth"), "--metric", "cosine"]),
            ("TCA_f", ["--model_path", os.path.join(model_dir, "model.pth"), "--metric", "chamfer"]),
            ("TCA_sym", ["--model_path", os.path.join(model_dir, "model.pth"), "--metric", "symmetric_chamfer"])]
    rows = []
    for i, (name, flags) in enumerate(runs):
        json_out = os.path.join(results, f"{i}_{name.split(' ')[0]}_{flags[-1]}.json")
        step(f"evaluate {name}", [py, "evaluation.py", "--dataset", "FIVR-5K", "--annotation_dir", bench,
                                  "--feature_path", os.path.join(feats, "eval_pca.h5"), "--device", "cpu",
                                  "--json_out", json_out] + flags, json_out)
        with open(json_out) as f:
            metrics = json.load(f)
        rows.append((name, [metrics.get(m) for m in METRICS]))

    table = [f"| {'method':<34} | " + " | ".join(f"{m} mAP" for m in METRICS) + " |",
             f"|{'-' * 36}|" + "|".join("-" * 10 for _ in METRICS) + "|"]
    for name, values in rows:
        table.append(f"| {name:<34} | " + " | ".join(f"{v:8.4f}" if v is not None else "     n/a" for v in values) + " |")
    table.append(f"\nframe features: {backbone_name}")
    text = "\n".join(table)
    with open(os.path.join(results, "table.md"), "w") as f:
        f.write(text + "\n")
    print(f"\nmini benchmark (FIVR format), {time.time() - start:.0f} s in all, outputs in {out}\n{text}")

    # search your own videos (docs/search.md): the eval split indexed (its queries too, so each finds
    # itself first), then searched with two query *video files*, extracted as the index records
    index_dir = os.path.join(out, "index")
    step("index", [py, "index.py", "--model_path", os.path.join(model_dir, "model.pth"), "--feature_path",
                   os.path.join(feats, "eval_pca.h5"), "--pca_params", pca_params, "--index_dir", index_dir,
                   "--device", "cpu"], os.path.join(index_dir, "manifest.json"))
    queries = sorted(load_pickle(os.path.join(bench, "fivr.pickle"))["5k"]["queries"])[:2]
    with open(os.path.join(bench, "eval_videos.txt")) as f:
        paths = dict(line.rstrip("\n").split("\t") for line in f if "\t" in line and not line.startswith("#"))
    search = [py, "search.py", "--index_dir", index_dir, "--query"] + [os.path.join(bench, paths[q]) for q in queries]
    search += ["--k", "5", "--plot", os.path.join(results, "search"), "--device", "cpu"]
    search += ["--weights", args.weights] if args.weights else []
    print(f"[demo] search: {' '.join(search)}", flush=True)
    if subprocess.run(search, cwd=REPO).returncode != 0:
        raise UserError("step 'search' failed (command above)")


if __name__ == "__main__":
    run_main(main)
