"""Index a collection of videos for search.py: TCA_c embeddings in a FAISS
index, TCA frame embeddings in a frame store for re-ranking a shortlist.

    python index.py --model_path runs/tca/model.pth --feature_path mine.h5 --pca_params pca.npz --index_dir IDX
    python index.py --model_path runs/tca/model.pth --feature_path more.h5 --index_dir IDX --add
    python index.py --model_path runs/tca/model.pth --video_list videos.txt --pca_params pca.npz \
        --components 1024 --index_dir IDX

The features are pca.py --apply's output (one (T, C) dataset per video id).
Each video is encoded exactly as evaluation.py encodes it (chunks of at most
--padding_size frames; retrieval.encode_videos). The index holds a copy of
the checkpoint and of the PCA parameters and a manifest of how it was made
(index_store.py: the layout), so search.py needs nothing else, and refuses a
query made another way.

Resumable: the embeddings are written in parts every --checkpoint_every
seconds, so a killed run loses at most that much work; running the same
command again skips the videos already in IDX and finishes. The FAISS index
is (re)built from the parts at the end. One run at a time writes IDX (it
holds IDX/index.lock).

Several processes or hosts (the feature file on a shared disk, IDX too):
    horovodrun -np 8 -H host1:4,host2:4 python index.py ... --index_dir IDX
each rank encodes its share of the videos (balanced by frames) into its own
parts; rank 0 then trains the coarse quantizer on a sample and assembles the
one FAISS index. With --shards each rank keeps its share as a shard of its
own (IDX/shard-KKKK/: parts and FAISS index), for a collection beyond one
machine's memory; rank 0 trains the one coarse quantizer on a sample of every
shard and every shard starts from it. search.py then runs under horovodrun
with as many ranks; --add and a resumed run need that many ranks too.
"""
import argparse
import contextlib
import functools
import itertools
import os
import sys
import time

import numpy as np

import index_store
from retrieval import PADDING_SIZE, encode_videos, load_model
from utils import (FRAMES_PER_BATCH, UserError, agree, check_outputs_apart, check_writable, gather_objects,
                   init_distributed, load_checkpoint, local_device, on_rank0, open_features, rank_share, run_main)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "pre-processing"))
from writer import OutputLock, dataset_names, file_digest, read_settings  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description="Index videos for search.py (TCA_c FAISS index + TCA frame store).")
    parser.add_argument("--model_path", required=True,
                        help="TCA checkpoint (train.py's model.pth; a bare state dict takes its architecture from "
                             "the args.json beside it); copied into the index")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--feature_path",
                        help="HDF5 file of PCA-whitened frame features (pca.py --apply), one (T, C) dataset per video")
    source.add_argument("--video_list",
                        help="Index video files instead: a file of 'id<TAB>path' lines (or a glob with {id}, as "
                             "extract_features.py takes), extracted and whitened in memory (nothing 3840-d written); "
                             "needs --pca_params and --components")
    parser.add_argument("--components", type=int, default=None,
                        help="--video_list: PCA components kept (the model's feature size)")
    parser.add_argument("--fps", type=float, default=1.0, help="--video_list: frames decoded per second (default: 1)")
    parser.add_argument("--weights", default=None,
                        help="--video_list: ResNet-50 state dict file (default: torchvision's ImageNet weights; "
                             "'random:seed0' for the seeded random ones of the tests)")
    parser.add_argument("--videos_per_chunk", type=int, default=64,
                        help="--video_list: videos extracted, then encoded, at a time (default: %(default)s)")
    parser.add_argument("--pca_params", default=None,
                        help="The PCA parameters the features were whitened with (pca.py --learn): copied into the "
                             "index for video-file queries, and checked against the hash the features record")
    parser.add_argument("--index_dir", required=True, help="Folder of the index (made if missing)")
    parser.add_argument("--index_factory", default=None,
                        help="FAISS index_factory string of the first stage, e.g. Flat (exact), IVF4096,PQ256x4fs, "
                             f"HNSW32 (default: by collection size, Flat up to {index_store.EXACT_UP_TO:,} videos, "
                             "else IVF4096,PQ256x4fs for 1024-d: 128-byte fast-scan codes; bench/NOTES.md 'Choosing "
                             "the index'). Fixed when the index is first built; --add keeps it")
    parser.add_argument("--padding_size", type=int, default=PADDING_SIZE,
                        help="Encode videos in chunks of at most this many frames, as evaluation.py "
                             "(0: whole); recorded, and used for every query (default: %(default)s)")
    parser.add_argument("--frame_dtype", default="float16", choices=("float16", "float32"),
                        help="Precision of the stored frame embeddings (float16: half the disk; chamfer scores "
                             "move by ~1e-3) (default: %(default)s)")
    parser.add_argument("--add", action="store_true",
                        help="Add the videos of --feature_path to an index already built (ids already in it are "
                             "skipped); without it an existing finished index is refused")
    parser.add_argument("--checkpoint_every", type=float, default=60.0,
                        help="Seconds of encoding between two parts written to disk: what a kill loses at most "
                             "(default: %(default)s)")
    parser.add_argument("--frames_per_batch", type=int, default=FRAMES_PER_BATCH,
                        help="Padded frames encoded per forward pass, bounds memory (default: %(default)s)")
    parser.add_argument("--train_size", type=int, default=index_store.TRAIN_SIZE,
                        help="Embeddings (evenly spaced over the collection) that train an IVF/PQ index "
                             "(default: %(default)s)")
    parser.add_argument("--shards", action="store_true",
                        help="Under horovodrun -np N: each rank keeps its share as one of N shards (its own FAISS "
                             "index and frame store), searched by search.py under horovodrun -np N. Fixed when the "
                             "index is first built")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return parser


def index_settings(model_path, model_args, feature_settings, pca_digest, padding_size, frame_dtype):
    """What a query must share with the index, as the manifest records it."""
    return {"model_sha256": index_store.sha256(model_path), "model_args": index_store.jsonable(model_args),
            "features": index_store.jsonable(feature_settings), "pca_params": pca_digest,
            "padding_size": padding_size, "frame_dtype": frame_dtype}


def encode_into_parts(model, features, keys, lengths, *, index_dir, padding_size, frame_dtype, frames_per_batch,
                      device, checkpoint_every, round_number, rank, part_numbers):
    """Encode the videos `keys` of `features` (an open HDF5 file, or a dict
    id -> (T, C)) and write them as parts (round_number, rank, next of
    part_numbers) of index_dir, one every checkpoint_every seconds and one at
    the end; returns the number of videos written."""
    pending, written, last = ([], [], []), 0, time.monotonic()

    def flush():
        nonlocal pending, written, last
        if pending[0]:
            index_store.write_part(index_dir, pending[0], np.concatenate(pending[1]), pending[2], frame_dtype,
                                   round_number, rank, next(part_numbers))
            written += len(pending[0])
        pending, last = ([], [], []), time.monotonic()

    for batch in encode_videos(model, features, keys, lengths, video_level=True, frame_level=True,
                               padding_size=padding_size, frames_per_batch=frames_per_batch, device=device,
                               desc="indexing"):
        pending[0].extend(keys[i] for i in batch.indices)
        pending[1].append(batch.embeddings.cpu().numpy())
        pending[2].extend(batch.frames[n, :batch.num_frames[n]].cpu().numpy() for n in range(len(batch.indices)))
        if time.monotonic() - last >= checkpoint_every:
            flush()
    flush()
    return written


def build_faiss(index_dir, store, factory, train_size, template=None):
    """The FAISS index of every part: index.faiss extended by the parts it
    does not hold yet, or a new one: a copy of `template` (a trained empty
    index), else trained on evenly spaced embeddings."""
    path = os.path.join(index_dir, index_store.FAISS_FILE)
    index = index_store.read_faiss(index_dir) if os.path.isfile(path) else None
    if index is not None and index.ntotal not in store.part_starts:
        index = None  # not a whole number of parts: rebuild
    if index is None and template is not None:
        import faiss
        index = faiss.clone_index(template)
    if index is None:
        channels = store.part_embeddings(0).shape[1]
        index = index_store.new_faiss_index(factory, channels)
        if not index.is_trained:
            total = len(store.ids)
            rows = np.linspace(0, total - 1, min(train_size, total)).astype(np.int64)
            print(f"training {factory} on {len(rows):,} of {total:,} embeddings")
            index.train(store.embeddings(rows))
    first = int(np.searchsorted(store.part_starts, index.ntotal))
    for number in range(first, len(store.paths)):
        index.add(store.part_embeddings(number))
    index_store.write_faiss(index, index_dir)
    return index


def prepare(args, settings, lock, size):
    """Rank 0, under the index's lock: check or start the manifest; returns
    (manifest, the round number of this run; None for a sharded index, whose
    ranks number their own shard's parts)."""
    lock.acquire()
    manifest_path = os.path.join(args.index_dir, index_store.MANIFEST)
    if os.path.isfile(manifest_path):
        manifest = index_store.read_manifest(args.index_dir)
        index_store.check_same(manifest_path, manifest["settings"], settings)
        if manifest.get("complete") and not args.add:
            raise UserError(f"{args.index_dir}: already holds an index of {manifest['videos']:,} videos; "
                            "--add adds the videos of --feature_path to it")
        if args.index_factory and manifest.get("index_factory") not in (None, args.index_factory):
            raise UserError(f"{args.index_dir}: was built with --index_factory {manifest['index_factory']}, "
                            f"not {args.index_factory}")
        shards = manifest.get("shards")
        if bool(shards) != args.shards:
            raise UserError(f"{args.index_dir}: " + (f"is sharded ({shards} shards): give --shards" if shards else
                                                     "is not sharded: drop --shards"))
        if shards and shards != size:
            raise UserError(f"{args.index_dir}: has {shards} shards; run it with horovodrun -np {shards}, "
                            f"not {size} ranks")
    else:
        if args.add:
            raise UserError(f"{args.index_dir}: no index to add to (drop --add to build one)")
        manifest = {"format": index_store.FORMAT, "settings": settings, "complete": False,
                    "index_factory": None, "videos": 0, "frames": 0}
        if args.shards:
            manifest["shards"] = size
        index_store.copy_file(args.model_path, os.path.join(args.index_dir, index_store.MODEL_FILE))
        if args.pca_params is not None:
            index_store.copy_file(args.pca_params, os.path.join(args.index_dir, index_store.PCA_FILE))
    manifest["complete"] = False  # until the FAISS index holds every part
    index_store.write_manifest(args.index_dir, manifest)
    return manifest, None if args.shards else index_store.next_round(args.index_dir)


def finish(args, manifest):
    """Rank 0, once every rank has written its parts: the FAISS index of
    every part and the finished manifest; returns (videos, frames, factory)."""
    store = index_store.FrameStore(args.index_dir)
    if not store.ids:
        raise UserError(f"{args.feature_path}: no video with frames to index")
    factory = (manifest.get("index_factory") or args.index_factory
               or index_store.default_factory(len(store.ids), store.part_embeddings(0).shape[1]))
    index = build_faiss(args.index_dir, store, factory, args.train_size)
    frames = int(sum(store.frames_count(i) for i in range(len(store.paths))))
    store.close()
    manifest.update(complete=True, index_factory=factory, videos=int(index.ntotal), frames=frames,
                    parts=len(store.paths), default_nprobe=index_store.DEFAULT_NPROBE)
    index_store.write_manifest(args.index_dir, manifest)
    return int(index.ntotal), frames, factory


def gather_to_rank0(dist, value, name):
    """[value of rank 0, value of rank 1, ...] on rank 0, None on the others:
    one broadcast per rank, so that a rank holds its own value and one other
    at a time, never every rank's (as utils.gather_objects would)."""
    if dist.size == 1:
        return [value]
    values = []
    for root in range(dist.size):
        got = dist.hvd.broadcast_object(value if dist.rank == root else None, root_rank=root, name=f"{name}.{root}")
        if dist.rank == 0:
            values.append(got)
        del got
    return values if dist.rank == 0 else None


def finish_shard(args, manifest, dist):
    """Every rank of a sharded index, once every rank has written its parts:
    its shard's FAISS index, started from the one trained empty index
    (IDX/quantizer.faiss: trained by rank 0 on evenly spaced embeddings of
    every shard the first time), and rank 0 the finished manifest; returns
    (videos, frames, factory) of the whole."""
    import faiss
    own = index_store.shard_dir(args.index_dir, dist.rank)
    os.makedirs(own, exist_ok=True)  # a rank with no video still has its (empty) shard
    store = index_store.FrameStore(own)
    count = len(store.ids)
    channels = store.part_embeddings(0).shape[1] if count else None
    counts, channels = zip(*gather_objects(dist, (count, channels)))
    total, channels = sum(counts), next((c for c in channels if c is not None), None)
    agree(dist, None if total else f"{args.feature_path or args.video_list}: no video with frames to index")
    factory = manifest.get("index_factory") or args.index_factory or index_store.default_factory(total, channels)
    template_path = os.path.join(args.index_dir, index_store.QUANTIZER_FILE)
    train = on_rank0(dist, lambda: not os.path.isfile(template_path)
                     and not index_store.new_faiss_index(factory, channels).is_trained)
    sample = None
    if train and count:  # this shard's share of the training sample, evenly spaced
        rows = np.linspace(0, count - 1, max(1, min(count, args.train_size * count // total))).astype(np.int64)
        sample = store.embeddings(rows)
    # to rank 0 alone, a rank's share at a time (160,000 x 1024 float32 is 655 MB)
    samples = gather_to_rank0(dist, sample, "index.train_sample") if train else None
    sample = None

    def template():
        if os.path.isfile(template_path):
            index = index_store.read_faiss(args.index_dir, index_store.QUANTIZER_FILE)
        else:
            index = index_store.new_faiss_index(factory, channels)
            if not index.is_trained:
                rows = np.concatenate([s for s in samples if s is not None])
                print(f"training {factory} on {len(rows):,} of {total:,} embeddings")
                index.train(rows)
            index_store.write_faiss(index, args.index_dir, index_store.QUANTIZER_FILE)
        return faiss.serialize_index(index)
    trained = faiss.deserialize_index(on_rank0(dist, template))
    index = build_faiss(own, store, factory, args.train_size, template=trained)
    frames = int(sum(store.frames_count(i) for i in range(len(store.paths))))
    store.close()
    shards = gather_objects(dist, (int(index.ntotal), frames))

    def write():
        manifest.update(complete=True, index_factory=factory, videos=sum(v for v, _ in shards),
                        frames=sum(f for _, f in shards), shard_videos=[v for v, _ in shards],
                        default_nprobe=index_store.DEFAULT_NPROBE)
        index_store.write_manifest(args.index_dir, manifest)
        return manifest["videos"], manifest["frames"], factory
    return on_rank0(dist, write)


def video_file_source(args):
    """--video_list: (the extraction settings its features get, as
    extract_features.py + pca.py --apply would record them; {id: path})."""
    from pipeline import extraction_settings
    from video import read_video_list
    if args.pca_params is None or args.components is None:
        raise UserError("--video_list needs --pca_params and --components (the whitening the model was trained on)")
    settings = extraction_settings(fps=args.fps, weights=args.weights, pca_params=args.pca_params,
                                   components=args.components)
    return settings, dict(read_video_list(args.video_list))


def extract_chunk(args, settings, videos):
    """{id: (T, C) whitened features} of `videos` [(id, path)]; a video that
    cannot be decoded is reported and left out (as extract_features.py does)."""
    from pipeline import extract

    def skip(video_id, path, error):
        print(f"warning: {path}: {error}; video {video_id} left out", file=sys.stderr)
    return {v: np.asarray(x, dtype=np.float32) for v, x in
            extract(videos, fps=args.fps, weights=args.weights, pca_params=args.pca_params,
                    components=args.components, dtype=settings["dtype"], on_error=skip)}


def main():
    args = get_args_parser().parse_args()
    if args.padding_size < 0 or args.frames_per_batch < 1 or args.checkpoint_every < 0 or args.train_size < 1:
        raise UserError("--padding_size and --checkpoint_every must be >= 0, --frames_per_batch and --train_size >= 1")
    check_outputs_apart({"--index_dir": args.index_dir},
                        {"--model_path": args.model_path, "--feature_path": args.feature_path,
                         "--pca_params": args.pca_params, "--video_list": args.video_list})
    if args.video_list is None and (args.components is not None or args.weights is not None):
        raise UserError("--components and --weights are for --video_list (features record their own)")
    if os.path.exists(args.index_dir) and not os.path.isdir(args.index_dir):
        raise UserError(f"{args.index_dir}: exists and is not a folder")
    check_writable(os.path.join(args.index_dir, index_store.MANIFEST))
    if args.pca_params is not None and not os.path.isfile(args.pca_params):
        raise UserError(f"{args.pca_params}: PCA parameters not found")
    dist = init_distributed()
    device = local_device(dist, args.device)
    _, model_args = load_checkpoint(args.model_path)
    model = load_model(args.model_path, {}, device)  # model_args None: a bare state dict (its SHA-256 names it)

    lock = OutputLock(os.path.join(args.index_dir, "index"))  # held by rank 0 for the whole run
    try:
        with contextlib.ExitStack() as stack:
            if args.feature_path is not None:
                features = stack.enter_context(open_features(args.feature_path))
                feature_settings, names = read_settings(features), dataset_names(features)
            else:
                features, (feature_settings, video_paths) = None, video_file_source(args)
                names = list(video_paths)
            source = args.feature_path or args.video_list
            pca_digest = None
            if args.pca_params is not None:
                pca_digest = file_digest(args.pca_params)
                recorded = feature_settings.get("pca_params")
                if recorded not in (None, pca_digest):
                    raise UserError(f"{args.pca_params}: is not the PCA the features were whitened with "
                                    f"({source} records pca_params {recorded}, this file is {pca_digest})")
            settings = index_settings(args.model_path, model_args, feature_settings, pca_digest, args.padding_size,
                                      args.frame_dtype)
            manifest, round_number = on_rank0(dist, lambda: prepare(args, settings, lock, dist.size))
            # a sharded index: this rank's parts go to its own shard, numbered after the shard's own
            parts_dir = index_store.shard_dir(args.index_dir, dist.rank) if args.shards else args.index_dir
            if round_number is None:
                round_number = index_store.next_round(parts_dir)

            store = index_store.FrameStore(parts_dir)
            done = set(store.ids)
            store.close()
            if args.shards:  # the videos of every shard
                done = set().union(*gather_objects(dist, done))
            keys = [v for v in names if v not in done]
            if len(keys) < len(names) and dist.rank == 0:
                print(f"{len(names) - len(keys):,} of {len(names):,} videos of {source} are already indexed")
            encode = functools.partial(encode_into_parts, model, index_dir=parts_dir,
                                       padding_size=args.padding_size, frame_dtype=args.frame_dtype,
                                       frames_per_batch=args.frames_per_batch, device=device,
                                       checkpoint_every=args.checkpoint_every, round_number=round_number,
                                       rank=dist.rank, part_numbers=itertools.count(1))
            started, error, written = time.perf_counter(), None, 0
            try:
                if features is not None:
                    lengths = np.array([features[k].shape[0] for k in keys], dtype=np.int64)
                    empty = [k for k, t in zip(keys, lengths) if t == 0]
                    if empty and dist.rank == 0:
                        print(f"warning: {len(empty)} videos have no frames (e.g. {empty[0]}); they are left out")
                    keys, lengths = [k for k, t in zip(keys, lengths) if t > 0], lengths[lengths > 0]
                    share = rank_share(lengths, dist.rank, dist.size)  # under horovodrun: this rank's videos
                    written = encode(features, [keys[i] for i in share], lengths[share])
                else:
                    mine = [keys[i] for i in rank_share(np.ones(len(keys)), dist.rank, dist.size)]
                    for start in range(0, len(mine), args.videos_per_chunk):
                        chunk = extract_chunk(args, feature_settings, [(v, video_paths[v]) for v in
                                                                       mine[start:start + args.videos_per_chunk]])
                        if chunk:
                            written += encode(chunk, list(chunk),
                                              np.array([len(x) for x in chunk.values()], dtype=np.int64))
            except UserError as e:
                error = str(e)
            agree(dist, error)  # waits for every rank's parts
            written = sum(gather_objects(dist, written))
            encode_seconds = time.perf_counter() - started
        started = time.perf_counter()
        if args.shards:
            videos, frames, factory = finish_shard(args, manifest, dist)
        else:
            videos, frames, factory = on_rank0(dist, lambda: finish(args, manifest))
        faiss_seconds = time.perf_counter() - started
    finally:
        lock.release()
    if dist.rank == 0:
        print(f"indexed {written:,} videos in {encode_seconds:.1f} s" + (f" on {dist.size} ranks" if dist.size > 1
                                                                           else "")
              + f", FAISS {factory} in {faiss_seconds:.1f} s: {args.index_dir} holds {videos:,} videos, "
              f"{frames:,} frames" + (f" in {dist.size} shards" if args.shards else ""))


if __name__ == "__main__":
    run_main(main)
