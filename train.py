"""Train TCA (or an ablation aggregator) on VCDB copy pairs with MoCo-style
supervised contrastive learning (Shao et al., "Temporal Context Aggregation for
Video Retrieval with Contrastive Learning", WACV 2021, Sec. 3.2).

Each step: the query encoder embeds the anchors, the key encoder the positives
and the `--neg_num` background negatives of every pair; each anchor is scored
against its positive and against the queue of negatives from earlier steps
(every rank's negatives, gathered); then this step's negatives are enqueued.

One process:          python train.py --annotation_path datasets/vcdb.pickle --feature_path F.hdf5 --model_path runs/tca
Horovod, N workers:   horovodrun -np N -H localhost:N python train.py ...   (--use_adasum needs `horovodrun --mpi`)

With --val_dataset, every --val_every epochs (and after the last) the query
encoder is evaluated on a benchmark exactly as evaluation.py evaluates a
model (retrieval.evaluate_model, sharded over the ranks), and the best epoch
by --val_key is kept in model_best.pth.

Writes into --model_path: model.pth ({"model": the query encoder's state dict,
"model_args": its model.build_model arguments}, what evaluation.py loads with
no architecture flag), model_best.pth (the same for the best validated epoch,
with "epoch" and "val"), checkpoint.pth (the same, plus everything --resume
needs), args.json, and what curves.py writes: log.jsonl (one JSON object per
logged step and epoch, one run's story), TensorBoard event files and curves.png.
"""
import argparse
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

import retrieval
import utils
from curves import TrainingLog, now_iso
from data import DATASETS, DATASETS_DIR, VCDBPairDataset, collate_pairs, load_benchmark
from model import AGGREGATORS, ARCHITECTURE_FLAGS, MoCo, build_model
from utils import UserError


def get_args_parser():
    parser = argparse.ArgumentParser("TCA training on VCDB", add_help=True)
    # data and output
    parser.add_argument("-ap", "--annotation_path", type=str, default=os.path.join(DATASETS_DIR, "vcdb.pickle"),
                        help="Path to vcdb.pickle: 'video_pairs' give the anchor/positive pairs, 'negs' the background "
                             "videos (default: the repository's datasets/vcdb.pickle, which ships with it)")
    parser.add_argument("-fp", "--feature_path", type=str, required=True,
                        help="HDF5 file with one (frames, --pca_components) dataset per video id, anchors, positives and negatives")
    parser.add_argument("-mp", "--model_path", type=str, required=True,
                        help="Directory for model.pth, checkpoint.pth, args.json and log.jsonl (created if missing)")
    # model
    parser.add_argument("--aggregator", type=str, default="tca", choices=AGGREGATORS,
                        help="Video aggregator to train: TCA (the paper's model, mean pooling), tca_netvlad (TCA "
                             "with a NetVLAD head, the paper's NetVLAD+Transformer ablation) or one of the paper's "
                             "ablation baselines")
    parser.add_argument("-nc", "--num_clusters", type=int, default=256,
                        help="Number of clusters of --aggregator netvlad/nextvlad/tca_netvlad (no effect on tca, lstm, gru)")
    parser.add_argument("-od", "--output_dim", type=int, default=1024,
                        help="Embedding size of --aggregator netvlad/nextvlad/tca_netvlad and hidden size of lstm/gru "
                             "(no effect on tca, whose embedding has --pca_components dimensions)")
    parser.add_argument("-nl", "--num_layers", type=int, default=1,
                        help="Number of transformer encoder layers of TCA (recurrent layers of LSTM/GRU)")
    parser.add_argument("-ni", "--normalize_input", action="store_true",
                        help="L2-normalise each frame descriptor inside NetVLAD/NeXtVLAD; "
                             "accepted for the upstream README command, no effect on tca, lstm, gru")
    parser.add_argument("-pc", "--pca_components", type=int, default=1024,
                        help="Dimension of the frame features in --feature_path (checked at start-up)")
    parser.add_argument("--dropout", type=float, default=0.2,
                        help="Dropout of the TCA transformer and between LSTM/GRU layers (upstream trains TCA with 0.2)")
    # training data
    parser.add_argument("-nn", "--neg_num", type=int, default=1,
                        help="Number of background negatives drawn per pair; they are pushed into the MoCo queue")
    parser.add_argument("-ps", "--padding_size", type=int, default=300,
                        help="Maximum number of frames per video; longer videos are cropped to a random window. "
                             "Batches are padded only to their longest video, which gives the same TCA output as "
                             "padding to this size, but faster")
    parser.add_argument("-rs", "--random_sampling", action="store_true",
                        help="Crop videos longer than --padding_size to random frames (kept in temporal order) "
                             "instead of a random window")
    parser.add_argument("-nw", "--num_workers", type=int, default=4,
                        help="DataLoader worker processes per rank reading HDF5 features (0: read in the training process)")
    parser.add_argument("-nr", "--num_readers", type=int, default=16,
                        help="Accepted for the upstream README command only (upstream's unused KVReader setting); "
                             "feature reading is parallelised by --num_workers")
    # optimisation
    parser.add_argument("-e", "--epochs", type=int, default=5,
                        help="Number of epochs; the learning rate follows a cosine from --learning_rate to 0 over them")
    parser.add_argument("-bs", "--batch_sz", type=int, default=256,
                        help="Pairs per step on each rank (incomplete last batches are dropped)")
    parser.add_argument("-lr", "--learning_rate", type=float, default=1e-4,
                        help="Base learning rate; multiplied by the number of ranks as upstream "
                             "(not with --use_adasum, except by GPUs per node for GPU Adasum with NCCL)")
    parser.add_argument("--optimizer", type=str, default="adam", choices=["adam", "sgd"],
                        help="Adam (what upstream trains with) or SGD with --momentum")
    parser.add_argument("--momentum", type=float, default=0.9, metavar="M",
                        help="Momentum of --optimizer sgd (Adam does not use it)")
    parser.add_argument("-wd", "--weight_decay", type=float, default=1e-4,
                        help="Weight decay (L2 penalty) of the optimizer")
    parser.add_argument("--loss", type=str, default="circle", choices=["circle", "infonce", "circle_upstream"],
                        help="circle: circle loss (m=0.25, gamma=256) with the positive weighting on the positive "
                             "column; infonce: cross-entropy of the logits (divided by --moco_t); circle_upstream: "
                             "upstream's circle loss as written, which applies the positive weighting to row 0 of "
                             "the batch instead (for exact reproduction only)")
    # MoCo
    parser.add_argument("--moco_k", type=int, default=65536,
                        help="Queue size: number of negative keys each anchor is compared with")
    parser.add_argument("--moco_m", type=float, default=0.999,
                        help="Momentum of the key encoder update (0: the key encoder is a copy of the query encoder)")
    parser.add_argument("--moco_t", type=float, default=0.07,
                        help="Temperature: logits are cosine similarities divided by it, for every --loss as upstream "
                             "(the README trains the circle loss with 1.0)")
    # distributed
    parser.add_argument("--fp16_allreduce", "--fp16-allreduce", action="store_true",
                        help="Compress gradients to fp16 for the Horovod allreduce")
    parser.add_argument("--use_adasum", "--use-adasum", action="store_true",
                        help="Reduce gradients with Adasum instead of averaging (on CPU needs `horovodrun --mpi`)")
    # logging, checkpoints, reproducibility
    parser.add_argument("-p", "--print_freq", "--print-freq", type=int, default=10, metavar="N",
                        help="Log loss, learning rate and pairs/s every N steps (to tqdm and log.jsonl)")
    parser.add_argument("--save_every", type=int, default=1,
                        help="Write model.pth and checkpoint.pth every N epochs (and always after the last one)")
    parser.add_argument("--resume", action="store_true",
                        help="Continue the run saved in --model_path/checkpoint.pth (same flags, same --seed; on "
                             "another number of ranks the learning rate is rescaled to it)")
    parser.add_argument("--overwrite", action="store_true",
                        help="Start afresh in a --model_path that holds a model.pth, replacing it (without this "
                             "flag or --resume such a run is refused)")
    parser.add_argument("--seed", type=int, default=0,
                        help="Seed of initialisation, shuffling, negative sampling, cropping and dropout")
    parser.add_argument("--tensorboard", action="store_true", default=True,
                        help="Write TensorBoard event files of loss, learning rate, pairs/s and the validation "
                             "keys into --model_path (rank 0): the default, the flag only says so")
    parser.add_argument("--no_tensorboard", "--no-tensorboard", dest="tensorboard", action="store_false",
                        help="No TensorBoard event files (curves.png is drawn from log.jsonl either way)")
    # validation
    parser.add_argument("--val_dataset", type=str, default=None,
                        help=f"Evaluate the query encoder on this benchmark during training ({', '.join(DATASETS)}), "
                             "as evaluation.py does, and keep the best epoch in model_best.pth (default: no validation)")
    parser.add_argument("--val_feature_path", type=str, default=None,
                        help="HDF5 frame features of the --val_dataset videos (needed with --val_dataset)")
    parser.add_argument("--val_annotation_dir", type=str, default=DATASETS_DIR,
                        help="Directory of the --val_dataset annotation file, as evaluation.py --annotation_dir "
                             "(default: the repository's datasets/)")
    parser.add_argument("--val_every", type=int, default=1, metavar="N",
                        help="Validate every N epochs, and after the last one")
    parser.add_argument("--val_metric", type=str, default="cosine",
                        help="Similarity of the validation, as evaluation.py --metric: cosine (TCA_c), chamfer "
                             "(TCA_f), symmetric_chamfer (TCA_sym), a comma-separated list or all; the first one "
                             "chooses the best epoch")
    parser.add_argument("--val_key", type=str, default=None,
                        help="The first --val_metric's key that chooses model_best.pth, e.g. DSVR (FIVR), "
                             "cc_web_star (CC_WEB_VIDEO), mAP (EVVE, VCDB) (default: the benchmark's first key)")
    return parser


# --------------------------------------------------------------------------
# losses: logits (N, 1 + K) with the positive in column 0

def circle_loss(logits, m=0.25, gamma=256):
    """Circle loss (Sun et al., CVPR 2020) with one positive per row:
    softplus(logsumexp_j(gamma * a_n_j * (s_n_j - m)) - gamma * a_p * (s_p - (1 - m)))
    with a_p = [1 + m - s_p]_+ and a_n = [s_n + m]_+ held constant."""
    s_p, s_n = logits[:, :1], logits[:, 1:]  # (N, 1), (N, K)
    alpha_p = torch.clamp_min(1 + m - s_p, 0).detach()
    alpha_n = torch.clamp_min(s_n + m, 0).detach()
    scaled = gamma * torch.cat([alpha_p * (s_p - (1 - m)), alpha_n * (s_n - m)], dim=1)
    return F.cross_entropy(scaled, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def circle_loss_upstream(logits, m=0.25, gamma=256):
    """Upstream's CircleLoss: `alpha[labels] = ...` with labels all 0 indexes
    rows, so row 0 of the batch gets the positive weighting and margin in every
    column and all other rows are treated as negatives only, positives included."""
    alpha = torch.clamp_min(logits + m, 0).detach()
    delta = torch.full_like(logits, m)
    alpha[0] = torch.clamp_min(1 + m - logits[0], 0).detach()
    delta[0] = 1 - m
    return F.cross_entropy(gamma * alpha * (logits - delta),
                           torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def infonce_loss(logits):
    """InfoNCE: cross-entropy with the positive as the class (logits already divided by the temperature)."""
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


LOSSES = {"circle": circle_loss, "circle_upstream": circle_loss_upstream, "infonce": infonce_loss}


def seed_everything(seed, epoch, rank):
    """Seed torch, numpy and random from (seed, epoch, rank) at the start of every
    epoch: a run resumed at an epoch boundary draws exactly what an uninterrupted
    run draws, on every rank, without carrying RNG states in the checkpoint."""
    state = np.random.SeedSequence([seed, epoch, rank]).generate_state(2)
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))
    np.random.seed(state)
    random.seed(int(state[0]))


def model_args(args):
    """build_model's arguments for this run: what model.pth carries so that it
    describes itself (evaluation.py needs no architecture flag)."""
    return {name: getattr(args, flag) for flag, name in ARCHITECTURE_FLAGS.items()} | {"dropout": args.dropout}


def lr_scale(args, dist, device):
    """Upstream multiplies the learning rate by the number of ranks, since
    gradients are averaged over a world_size times larger batch; Adasum adapts
    the combination itself, so it is not scaled (but for GPU Adasum with NCCL,
    which averages within a node: by GPUs per node)."""
    if not args.use_adasum:
        return dist.size
    return dist.local_size if device.type == "cuda" and dist.hvd and dist.hvd.nccl_built() else 1


def make_optimizer(model, args, dist, lr_scaler):
    """The optimizer of the query encoder (the key encoder follows by momentum,
    not by gradients), Horovod's distributed wrapper, and the cosine schedule."""
    params = list(model.encoder_q.parameters())
    lr = args.learning_rate * lr_scaler
    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if dist.hvd:
        hvd = dist.hvd
        optimizer = hvd.DistributedOptimizer(
            optimizer, named_parameters=model.encoder_q.named_parameters(),
            compression=hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none,
            op=hvd.Adasum if args.use_adasum else hvd.Average)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    return optimizer, scheduler


def save_checkpoint(model_path, model, optimizer, scheduler, epoch, args, lr_scaler, run_start, best):
    """model.pth (the query encoder, self-describing) and checkpoint.pth
    (everything --resume needs, with the run's start time and the best
    validation so far). model.pth first: a checkpoint never claims an epoch
    the model file lacks."""
    encoder = {"model": model.encoder_q.state_dict(), "model_args": model_args(args)}
    utils.atomic_torch_save(encoder, os.path.join(model_path, "model.pth"))
    utils.atomic_torch_save(encoder | {"moco": model.state_dict(), "optimizer": optimizer.state_dict(),
                                       "scheduler": scheduler.state_dict(), "epoch": epoch, "args": vars(args),
                                       "lr_scaler": lr_scaler, "run_start": run_start, "best": best},
                            os.path.join(model_path, "checkpoint.pth"))


RESUME_FLAGS = ("aggregator", "pca_components", "output_dim", "num_clusters", "num_layers", "moco_k", "epochs")


def restart_from_checkpoint(path, model, optimizer, scheduler, args, lr_scaler, device, verbose=True):
    """Load checkpoint.pth into the model, optimizer and schedule; returns the
    epoch it ended, the run's start time and its best validation so far
    (None for a checkpoint written before they were kept). A run resumed on another number of ranks keeps its
    schedule but has its learning rate rescaled to the new world size
    (lr_scaler: the new scale, see lr_scale), printed if verbose."""
    if not os.path.isfile(path):
        raise UserError(f"--resume: {path} not found")
    checkpoint = utils.load_torch_file(path, map_location=device)
    if not isinstance(checkpoint, dict) or not {"moco", "optimizer", "scheduler", "epoch", "args"} <= checkpoint.keys():
        raise UserError(f"--resume: {path} is not a train.py checkpoint.pth (a model.pth copied over it?)")
    for flag in RESUME_FLAGS:
        if checkpoint["args"].get(flag) != getattr(args, flag):
            raise UserError(f"--resume: {path} was trained with --{flag} {checkpoint['args'].get(flag)}, "
                            f"not {getattr(args, flag)}")
    try:
        model.load_state_dict(checkpoint["moco"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"--resume: {path} does not fit this model ({str(e).splitlines()[0]})") from None
    old_scaler = checkpoint.get("lr_scaler", checkpoint["args"].get("world_size", lr_scaler))
    if old_scaler != lr_scaler:
        ratio = lr_scaler / old_scaler
        scheduler.base_lrs = [lr * ratio for lr in scheduler.base_lrs]
        for group in optimizer.param_groups:
            group["lr"] *= ratio
            group["initial_lr"] *= ratio
        if verbose:
            print(f"--resume: learning rate rescaled x{ratio:g} ({old_scaler} -> {lr_scaler} ranks' scale)")
    return checkpoint["epoch"], checkpoint.get("run_start"), checkpoint.get("best")


# --------------------------------------------------------------------------
# validation: the query encoder on a benchmark, as evaluation.py scores a model

def validation_settings(args):
    """The --val_dataset benchmark, the --val_metric list and the --val_key,
    checked before training rather than after its first epoch."""
    if args.val_feature_path is None:
        raise UserError("--val_dataset needs --val_feature_path (the benchmark's HDF5 frame features)")
    benchmark = load_benchmark(args.val_dataset, args.val_annotation_dir)
    try:
        metrics = retrieval.parse_metrics(args.val_metric)
    except UserError as e:
        raise UserError(str(e).replace("--metric", "--val_metric", 1)) from None
    keys = tuple(benchmark.metric_keys) + tuple(getattr(benchmark, "DETECTION", ()))
    if getattr(benchmark, "easy_duplicates", None) is not None:  # FIVR with S2VS's list: the "hard" keys too
        keys += tuple(f"{k}_hard" for k in keys)
    key = args.val_key or benchmark.metric_keys[0]
    if key not in keys:
        raise UserError(f"--val_key {key}: {benchmark.name} reports {', '.join(keys)}")
    with utils.open_features(args.val_feature_path):
        pass  # a missing or damaged file stops the run now
    return benchmark, metrics, key


def validate(encoder, benchmark, metrics, args, dist, device, verbose):
    """{metric: {key: mAP}} of the query encoder on --val_dataset (on rank 0;
    None on the others, which score their share of the database) and the
    seconds it took. retrieval.evaluate_model is evaluation.py's own
    computation: eval mode (no dropout), videos in chunks of --padding_size
    frames, the encoder put back in train mode after. verbose: print the
    benchmark's coverage line (missing videos, ...)."""
    start = time.time()
    results = retrieval.evaluate_model(encoder, benchmark, args.val_feature_path, metrics,
                                       padding_size=args.padding_size, dist=dist, device=device,
                                       log=print if verbose else lambda *a: None)
    return results, time.time() - start


def keep_best(best, results, metric, key, dataset, epoch, encoder, args):
    """The best validation so far ({"dataset", "metric", "key", "value",
    "epoch"}, None before the first): if this epoch's results[metric][key]
    beats it (ties keep the earlier epoch, NaN never wins), model_best.pth
    becomes this epoch's query encoder, self-describing as model.pth
    (evaluation.py loads it by path), with its epoch and validation."""
    value = results[metric][key]
    if not value > (best["value"] if best is not None else -math.inf):
        return best
    utils.atomic_torch_save({"model": encoder.state_dict(), "model_args": model_args(args), "epoch": epoch,
                             "val": results}, os.path.join(args.model_path, "model_best.pth"))
    return {"dataset": dataset, "metric": metric, "key": key, "value": value, "epoch": epoch}


def train_one_epoch(model, loader, criterion, optimizer, epoch, args, dist, device, log):
    """One pass over the loader; returns this rank's mean loss."""
    model.train()
    lr = optimizer.param_groups[0]["lr"]
    total_loss, window_start, window_steps = 0.0, time.time(), 0
    progress = tqdm(loader, total=len(loader), desc=f"epoch {epoch}/{args.epochs}",
                    disable=dist.rank != 0, dynamic_ncols=True)
    for step, (anchors, anchor_frames, positives, positive_frames, negatives, negative_frames) in enumerate(progress, 1):
        # the aggregators take (N, C, T) like upstream
        anchors, positives, negatives = (x.to(device, non_blocking=True).transpose(1, 2)
                                         for x in (anchors, positives, negatives))
        anchor_frames, positive_frames, negative_frames = (
            x.to(device) for x in (anchor_frames, positive_frames, negative_frames))
        logits, _ = model(anchors, positives, negatives, anchor_frames, positive_frames, negative_frames)
        loss = criterion(logits)
        if not math.isfinite(loss.item()):
            raise UserError(f"loss is {loss.item()} at epoch {epoch} step {step} (features are checked finite on "
                            f"reading: lower --learning_rate?)")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        total_loss += loss.item()
        window_steps += 1
        if dist.rank == 0 and step % args.print_freq == 0:
            pairs_per_s = window_steps * args.batch_sz * dist.size / (time.time() - window_start)
            progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", pairs_s=f"{pairs_per_s:.1f}")
            log({"epoch": epoch, "step": step, "global_step": (epoch - 1) * len(loader) + step,
                 "loss": loss.item(), "lr": lr, "pairs_per_s": pairs_per_s})
            window_start, window_steps = time.time(), 0
    return total_loss / len(loader)


# what a run writes into --model_path (curves.py adds TensorBoard's event files)
OUTPUTS = ("model.pth", "model_best.pth", "checkpoint.pth", "args.json", "log.jsonl", "curves.png")


def check_args(args, dist):
    for flag in ("epochs", "batch_sz", "neg_num", "padding_size", "moco_k", "print_freq", "save_every", "val_every"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.use_adasum and dist.size > 1 and not dist.hvd.mpi_enabled():
        raise UserError("--use_adasum needs Horovod's MPI controller: run with `horovodrun --mpi ...`")
    if args.val_dataset is None and args.val_feature_path is not None:
        raise UserError("--val_feature_path is used by validation only: add --val_dataset NAME")
    utils.check_outputs_apart({"--model_path": args.model_path} |
                              {f"--model_path ({name})": os.path.join(args.model_path, name) for name in OUTPUTS},
                              {"--annotation_path": args.annotation_path, "--feature_path": args.feature_path,
                               "--val_feature_path": args.val_feature_path})
    model_file, checkpoint_file = (os.path.join(args.model_path, name) for name in ("model.pth", "checkpoint.pth"))
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --model_path, --overwrite replaces it: choose one")
    # a run whose first checkpoint write failed (a full disk) left model.pth without checkpoint.pth
    orphan = os.path.exists(model_file) and not os.path.exists(checkpoint_file)
    if args.resume and orphan:
        raise UserError(f"--resume: {model_file} exists but {checkpoint_file} does not (the run's first checkpoint "
                        "was not written): nothing to resume, pass --overwrite to start that run afresh")
    if not args.resume and not args.overwrite and os.path.exists(model_file):
        raise UserError(f"{model_file} exists without {checkpoint_file}: nothing to resume, pass --overwrite to "
                        "start afresh" if orphan else
                        f"{model_file} exists: pass --resume to continue that run or --overwrite to replace it")
    if dist.rank == 0:
        utils.check_writable(model_file)


def train(args):
    """The whole run; returns the trained MoCo model (every rank's own)."""
    dist = utils.init_distributed()
    check_args(args, dist)
    device = utils.local_device(dist)
    is_main = dist.rank == 0
    benchmark, val_metrics, val_key = validation_settings(args) if args.val_dataset else (None, None, None)

    # ---- data
    dataset = VCDBPairDataset(args.annotation_path, args.feature_path, padding_size=args.padding_size,
                              random_sampling=args.random_sampling, neg_num=args.neg_num,
                              feature_size=args.pca_components, seed=args.seed)
    if is_main:
        print(f"{len(dataset)} training pairs ({dataset.num_dropped_pairs} dropped: a video without features), "
              f"{len(dataset.negatives)} background negatives ({dataset.num_dropped_negatives} dropped)")
    sampler = DistributedSampler(dataset, num_replicas=dist.size, rank=dist.rank, shuffle=True, seed=args.seed)
    if len(sampler) < args.batch_sz:
        raise UserError(f"{len(dataset)} usable pairs give each of the {dist.size} rank(s) {len(sampler)} pairs, "
                        f"fewer than one batch of --batch_sz {args.batch_sz}")
    loader = DataLoader(dataset, batch_size=args.batch_sz, sampler=sampler, drop_last=True,
                        num_workers=args.num_workers, collate_fn=collate_pairs, pin_memory=device.type == "cuda")

    # ---- model, optimizer, schedule
    seed_everything(args.seed, 0, 0)  # same initial weights everywhere (rank 0's are broadcast anyway)
    encoder = build_model(**model_args(args))
    model = MoCo(encoder, dim=encoder.output_dim, K=args.moco_k, m=args.moco_m, T=args.moco_t,
                 gather=utils.all_gatherer(dist, name="moco_keys")).to(device)
    criterion = LOSSES[args.loss]
    lr_scaler = lr_scale(args, dist, device)
    optimizer, scheduler = make_optimizer(model, args, dist, lr_scaler)

    os.makedirs(args.model_path, exist_ok=True)
    start_epoch, run_start, best = 1, None, None
    if args.resume:
        checkpoint_path = os.path.join(args.model_path, "checkpoint.pth")
        last_epoch, run_start, best = restart_from_checkpoint(checkpoint_path, model, optimizer, scheduler, args,
                                                              lr_scaler, device, verbose=is_main)
        start_epoch = last_epoch + 1
        if is_main:
            print(f"resuming {checkpoint_path} after epoch {last_epoch} of {args.epochs}"
                  + (": nothing left to train" if start_epoch > args.epochs else ""))
        if best is not None and (best["dataset"], best["metric"], best["key"]) != (
                getattr(benchmark, "name", None), val_metrics and val_metrics[0], val_key):
            best = None  # chosen by another benchmark or key: the next validation starts over
    elif is_main:
        # a fresh run (or --overwrite): the folder's previous run, if any, is no longer resumable or best
        for name in ("checkpoint.pth", "model_best.pth"):
            if os.path.exists(os.path.join(args.model_path, name)):
                os.remove(os.path.join(args.model_path, name))
    run_start = run_start or now_iso()
    if dist.hvd:
        dist.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        # A fresh optimizer has the same (empty) state on every rank; Horovod would
        # fill it by an optimizer step with zero gradients, which weight decay turns
        # into a real update, so only a loaded state is broadcast.
        if args.resume:
            dist.hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    if is_main:
        with utils.atomic_path(os.path.join(args.model_path, "args.json")) as tmp, open(tmp, "w") as f:
            json.dump(vars(args) | {"world_size": dist.size}, f, indent=1)
    # a fresh run starts a new log; a resumed one drops what it trains again
    training_log = TrainingLog(args.model_path, run_start, last_epoch if args.resume else None,
                               args.tensorboard) if is_main else None

    # ---- training
    validated = False  # the benchmark's coverage line (missing videos, ...) is printed once
    shown = dict.fromkeys([*benchmark.metric_keys, val_key]) if benchmark else ()  # printed; log.jsonl has all
    for epoch in range(start_epoch, args.epochs + 1):
        seed_everything(args.seed, epoch, dist.rank)
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        lr, epoch_start = optimizer.param_groups[0]["lr"], time.time()
        epoch_loss = torch.tensor(train_one_epoch(model, loader, criterion, optimizer, epoch, args, dist, device,
                                                  training_log and training_log.log))
        scheduler.step()
        if dist.hvd:  # mean loss over the ranks
            epoch_loss = dist.hvd.allreduce(epoch_loss, name="epoch_loss", op=dist.hvd.Average)
        seconds = time.time() - epoch_start
        if is_main:
            pairs_per_s = len(loader) * args.batch_sz * dist.size / seconds
            print(f"epoch {epoch}/{args.epochs}: loss {epoch_loss.item():.4f}, lr {lr:.3g}, "
                  f"{pairs_per_s:.1f} pairs/s, {seconds:.1f} s")
            record = {"epoch": epoch, "loss": epoch_loss.item(), "lr": lr, "pairs_per_s": pairs_per_s,
                      "seconds": seconds}
        if benchmark is not None and (epoch % args.val_every == 0 or epoch == args.epochs):
            results, val_seconds = validate(model.encoder_q, benchmark, val_metrics, args, dist, device,
                                            verbose=is_main and not validated)
            validated = True
            if is_main:
                record |= {"val": results, "val_seconds": val_seconds}
                best = keep_best(best, results, val_metrics[0], val_key, benchmark.name, epoch, model.encoder_q, args)
                print(f"epoch {epoch}/{args.epochs} validation on {benchmark.name} ({val_seconds:.1f} s): "
                      + "; ".join(f"{m} " + " ".join(f"{k} {r[k]:.4f}" for k in shown) for m, r in results.items())
                      + (f"; best {val_key} {best['value']:.4f} (epoch {best['epoch']})" if best else ""))
        if is_main:
            training_log.log(record)
            if epoch % args.save_every == 0 or epoch == args.epochs:
                save_checkpoint(args.model_path, model, optimizer, scheduler, epoch, args, lr_scaler, run_start,
                                best)
            training_log.end_epoch()
    if is_main:
        training_log.close()
        print(f"saved {os.path.join(args.model_path, 'model.pth')}"
              + (f" and model_best.pth (epoch {best['epoch']}, {val_key} {best['value']:.4f})" if best else "")
              + f"; curves: {os.path.join(args.model_path, 'curves.png')}"
              + (f", tensorboard --logdir {args.model_path}" if args.tensorboard else ""))
    return model


def main():
    train(get_args_parser().parse_args())


if __name__ == "__main__":
    utils.run_main(main)
