"""Train TCA (or an ablation aggregator) on VCDB copy pairs with MoCo-style
supervised contrastive learning (Shao et al., "Temporal Context Aggregation for
Video Retrieval with Contrastive Learning", WACV 2021, Sec. 3.2).

Each step: the query encoder embeds the anchors, the key encoder the positives
and the `--neg_num` background negatives of every pair; each anchor is scored
against its positive and against the queue of negatives from earlier steps
(every rank's negatives, gathered); then this step's negatives are enqueued.

One process:          python train.py --annotation_path datasets/vcdb.pickle --feature_path F.hdf5 --model_path runs/tca
Horovod, N workers:   horovodrun -np N -H localhost:N python train.py ...   (--use_adasum needs `horovodrun --mpi`)

Writes into --model_path: model.pth ({"model": the query encoder's state dict,
"model_args": its model.build_model arguments}, what evaluation.py loads with
no architecture flag), checkpoint.pth (the same, plus everything --resume
needs), args.json and log.jsonl (one JSON object per logged step and epoch).
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

import utils
from data import DATASETS_DIR, VCDBPairDataset, collate_pairs
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


def save_checkpoint(model_path, model, optimizer, scheduler, epoch, args, lr_scaler):
    """model.pth (the query encoder, self-describing) and checkpoint.pth
    (everything --resume needs). model.pth first: a checkpoint never claims an
    epoch the model file lacks."""
    encoder = {"model": model.encoder_q.state_dict(), "model_args": model_args(args)}
    utils.atomic_torch_save(encoder, os.path.join(model_path, "model.pth"))
    utils.atomic_torch_save(encoder | {"moco": model.state_dict(), "optimizer": optimizer.state_dict(),
                                       "scheduler": scheduler.state_dict(), "epoch": epoch, "args": vars(args),
                                       "lr_scaler": lr_scaler},
                            os.path.join(model_path, "checkpoint.pth"))


RESUME_FLAGS = ("aggregator", "pca_components", "output_dim", "num_clusters", "num_layers", "moco_k", "epochs")


def restart_from_checkpoint(path, model, optimizer, scheduler, args, lr_scaler, device, verbose=True):
    """Load checkpoint.pth into the model, optimizer and schedule; returns the
    epoch it ended. A run resumed on another number of ranks keeps its
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
    return checkpoint["epoch"]


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
            log({"epoch": epoch, "step": step, "loss": loss.item(), "lr": lr, "pairs_per_s": pairs_per_s})
            window_start, window_steps = time.time(), 0
    return total_loss / len(loader)


def check_args(args, dist):
    for flag in ("epochs", "batch_sz", "neg_num", "padding_size", "moco_k", "print_freq", "save_every"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.use_adasum and dist.size > 1 and not dist.hvd.mpi_enabled():
        raise UserError("--use_adasum needs Horovod's MPI controller: run with `horovodrun --mpi ...`")
    model_file = os.path.join(args.model_path, "model.pth")
    if not args.resume and not args.overwrite and os.path.exists(model_file):
        raise UserError(f"{model_file} exists: pass --resume to continue that run or --overwrite to replace it")
    if dist.rank == 0:
        utils.check_writable(model_file)


def train(args):
    """The whole run; returns the trained MoCo model (every rank's own)."""
    dist = utils.init_distributed()
    check_args(args, dist)
    device = utils.local_device(dist)
    is_main = dist.rank == 0

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
    start_epoch = 1
    if args.resume:
        checkpoint_path = os.path.join(args.model_path, "checkpoint.pth")
        start_epoch = restart_from_checkpoint(checkpoint_path, model, optimizer, scheduler, args, lr_scaler,
                                              device, verbose=is_main) + 1
        if is_main:
            print(f"resuming {checkpoint_path} after epoch {start_epoch - 1} of {args.epochs}"
                  + (": nothing left to train" if start_epoch > args.epochs else ""))
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
    log_file = open(os.path.join(args.model_path, "log.jsonl"), "a") if is_main else None

    def log(record):
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    # ---- training
    for epoch in range(start_epoch, args.epochs + 1):
        seed_everything(args.seed, epoch, dist.rank)
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        lr, epoch_start = optimizer.param_groups[0]["lr"], time.time()
        epoch_loss = torch.tensor(train_one_epoch(model, loader, criterion, optimizer, epoch, args, dist, device, log))
        scheduler.step()
        if dist.hvd:  # mean loss over the ranks
            epoch_loss = dist.hvd.allreduce(epoch_loss, name="epoch_loss", op=dist.hvd.Average)
        seconds = time.time() - epoch_start
        if is_main:
            pairs_per_s = len(loader) * args.batch_sz * dist.size / seconds
            print(f"epoch {epoch}/{args.epochs}: loss {epoch_loss.item():.4f}, lr {lr:.3g}, "
                  f"{pairs_per_s:.1f} pairs/s, {seconds:.1f} s")
            log({"epoch": epoch, "loss": epoch_loss.item(), "lr": lr, "pairs_per_s": pairs_per_s,
                 "seconds": seconds})
            if epoch % args.save_every == 0 or epoch == args.epochs:
                save_checkpoint(args.model_path, model, optimizer, scheduler, epoch, args, lr_scaler)
    if is_main:
        log_file.close()
        print(f"saved {os.path.join(args.model_path, 'model.pth')}")
    return model


def main():
    train(get_args_parser().parse_args())


if __name__ == "__main__":
    utils.run_main(main)
