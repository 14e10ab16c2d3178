"""Find the copies of videos in an index made by index.py: TCA_c top
--shortlist from the FAISS index (stage 1), then TCA_f (chamfer) or TCA_sym
(symmetric_chamfer) of the shortlist from the frame store (stage 2).

    python search.py --index_dir IDX --query_features queries.h5 --k 10
    python search.py --index_dir IDX --query_ids vid1,vid2 --rerank symmetric_chamfer --json_out r.json
    python search.py --index_dir IDX --query a.mp4 b.mp4 --plot plots/

Queries: video files (extracted with exactly the settings the index records,
whitened with its copy of the PCA), videos of a features file with those
settings (all, or --query_ids), or --query_ids alone: videos already in the
index. Every query is embedded as evaluation.py embeds it (the index's
--padding_size). The output lists, per query, rank, id, score and stage-1
score, and the seconds of each stage. As evaluation.py --shortlist ranks a
benchmark: the --shortlist videos re-scored in stage 2 come first, by their
stage-2 score; a --k beyond the shortlist continues in stage-1 order.

A sharded index (index.py --shards) is searched under horovodrun with one
rank per shard, as it was built:
    horovodrun -np 8 -H host1:4,host2:4 python search.py --index_dir IDX --query_features queries.h5
each rank takes its shard's TCA_c top --shortlist, rank 0's merge of them is
the global shortlist (what one index of every video would give), each rank
re-ranks the candidates its shard holds, and rank 0 prints the merged top --k.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

import index_store
from retrieval import DEFAULT_SHORTLIST, SHORTLIST_OFFSET, encode_videos, frame_scores, load_model
from utils import (UserError, agree, atomic_path, check_outputs_apart, check_writable, gather_objects,
                   init_distributed, local_device, on_rank0, open_features, run_main)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "pre-processing"))
from writer import dataset_names, read_settings  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description="Search an index (index.py) for the copies of query videos.")
    parser.add_argument("--index_dir", required=True, help="Folder written by index.py")
    parser.add_argument("--query", nargs="+", default=None, help="Query video files")
    parser.add_argument("--query_list", default=None, help="Text file of query video paths, one per line")
    parser.add_argument("--query_features", default=None,
                        help="HDF5 features of the queries, made with the index's settings (extract_features.py "
                             "+ pca.py --apply)")
    parser.add_argument("--query_ids", default=None,
                        help="Comma-separated ids: of --query_features' videos, or without it videos in the index")
    parser.add_argument("--weights", default=None,
                        help="For video-file queries of an index whose features used a --weights file: that file "
                             "again (checked against the SHA-256 the index records)")
    parser.add_argument("--k", type=int, default=100, help="Results printed per query (default: %(default)s)")
    parser.add_argument("--shortlist", type=int, default=DEFAULT_SHORTLIST,
                        help="Stage 1 keeps this many videos per query for stage 2; a --k beyond it continues in "
                             "stage-1 order. The default is the smallest that kept >= 99%% of exhaustive TCA_f mAP "
                             "on the demo benchmark (bench/NOTES.md 'Coarse to fine'); a collection whose queries "
                             "have more copies than that wants more (stage 2 costs ~2 s per 1,000 videos of ~200 "
                             "frames on 2 cores) (default: %(default)s)")
    parser.add_argument("--rerank", default="chamfer", choices=("chamfer", "symmetric_chamfer", "none"),
                        help="Stage 2: TCA_f (chamfer), TCA_sym (symmetric_chamfer) of the shortlist, or none "
                             "(the TCA_c order) (default: %(default)s)")
    parser.add_argument("--nprobe", type=int, default=None,
                        help="IVF indexes: inverted lists visited per query; more is slower and finds more "
                             "(default: the index's, bench/NOTES.md 'Choosing the index')")
    parser.add_argument("--ef_search", type=int, default=None, help="HNSW indexes: efSearch (default: FAISS's)")
    parser.add_argument("--json_out", default=None,
                        help="Write the top --k per query as {query: {video: score}} (ViSiL's result format, "
                             "what evaluation.py --similarities reads; a top-k file lists only k videos per query, "
                             "so evaluate it on FIVR with --protocol full, where unlisted relevant videos count "
                             "as misses). With a --k beyond --shortlist the re-scored videos' scores are their "
                             f"stage-2 scores + {SHORTLIST_OFFSET:g}, the others' their stage-1 scores, as "
                             "evaluation.py --shortlist writes them, so that the scores keep the ranking")
    parser.add_argument("--plot", default=None,
                        help="Folder: per query a PNG of its frame-to-frame similarities against its top matches "
                             "(copied segments show as diagonals)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return parser


def query_videos(args, manifest, known):
    """The queries as (ids, features: dict id -> (T, C) float32 or None for
    videos of the index, whose ids are `known`). Refuses a features file or
    video made with other settings than the index's."""
    settings = manifest["settings"]
    if args.query_features is not None:
        with open_features(args.query_features) as f:
            index_store.check_same(args.query_features, index_store.jsonable(read_settings(f)), settings["features"],
                                   "the index's")
            names = dataset_names(f)
            ids = names if args.query_ids is None else [v for v in args.query_ids.split(",") if v]
            unknown = [v for v in ids if v not in names]
            if unknown:
                raise UserError(f"{args.query_features}: no video {unknown[0]!r}")
            return ids, {v: np.asarray(f[v][()], dtype=np.float32) for v in ids}
    if args.query_ids is not None:
        ids = [v for v in args.query_ids.split(",") if v]
        unknown = [v for v in ids if v not in known]
        if unknown:
            raise UserError(f"{args.index_dir}: no video {unknown[0]!r} in the index")
        return ids, None
    paths = list(args.query or [])
    if args.query_list is not None:
        try:
            with open(args.query_list) as f:
                paths += [line.strip() for line in f if line.strip() and not line.startswith("#")]
        except OSError as e:
            raise UserError(f"{args.query_list}: cannot read ({e.strerror})") from None
    return paths, extract_videos(args, settings, paths)


def extract_videos(args, settings, paths):
    """Video files -> whitened frame features with exactly the index's
    extraction settings (its copy of the PCA; a --weights file checked)."""
    from cnn import IMAGENET_WEIGHTS
    from pipeline import extract, extraction_settings  # decode, CNN, PCA, all in memory
    recorded = settings["features"]
    if not isinstance(recorded.get("fps"), (int, float)) or recorded.get("pca_params") in (None, "none"):
        raise UserError(f"{args.index_dir}: its features record no video extraction settings (fps, PCA), so a "
                        "video file cannot be extracted the same way; give --query_features")
    weights = {IMAGENET_WEIGHTS: None}.get(recorded.get("weights"), recorded.get("weights"))
    if str(weights).startswith("sha256:"):
        if args.weights is None:
            raise UserError(f"{args.index_dir}: its features used a weights file ({weights}); give it with --weights")
        weights = args.weights
    pca_path = os.path.join(args.index_dir, index_store.PCA_FILE)
    if not os.path.isfile(pca_path):
        raise UserError(f"{pca_path}: missing (the index was built without --pca_params)")
    options = dict(fps=recorded["fps"], feature=recorded.get("feature", "imac"), weights=weights,
                   bf16=bool(recorded.get("bf16")), channels_last=bool(recorded.get("channels_last")),
                   pca_params=pca_path, components=recorded.get("components"), dtype=recorded.get("dtype", "float32"))
    index_store.check_same(args.index_dir + " (its features)", recorded,
                           index_store.jsonable(extraction_settings(**options)), "this query extraction")
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"{path}: video file not found")
    return {v: np.asarray(x, dtype=np.float32) for v, x in extract(paths, **options)}


def stored_queries(dist, store, ids):
    """(Q, C) TCA_c embeddings and [(T, C)] frame embeddings of videos of the
    index, as index.py stored them (each from the shard that holds it)."""
    held = {}
    for mine in gather_objects(dist, {v: (store.embeddings([store.position[v]])[0], store.frames(store.position[v]))
                                      for v in ids if v in store.position}):
        held.update(mine)
    return np.stack([held[v][0] for v in ids]).astype(np.float32), [held[v][1] for v in ids]


def embed_queries(model, ids, features, padding_size, device):
    """(Q, C) TCA_c embeddings and [(T, C)] frame embeddings of the queries."""
    embeddings, frames = [None] * len(ids), [None] * len(ids)
    lengths = np.array([len(features[v]) for v in ids], dtype=np.int64)
    for batch in encode_videos(model, features, ids, lengths, video_level=True, frame_level=True,
                               padding_size=padding_size, device=device, desc="queries"):
        for n, i in enumerate(batch.indices):
            embeddings[i] = batch.embeddings[n].cpu().numpy()
            frames[i] = batch.frames[n, :batch.num_frames[n]].cpu().numpy()
    return np.stack(embeddings).astype(np.float32), frames


def plot_matches(path, query, query_frames, matches):
    """PNG of the query's frame-to-frame similarities against its top matches
    [(id, (T, C) frames, score)]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, len(matches), figsize=(3.2 * len(matches), 3.4), squeeze=False)
    for axis, (video, frames, score) in zip(axes[0], matches):
        similarities = query_frames @ frames.T  # (Tq, Td)
        axis.imshow(similarities, vmin=-1, vmax=1, cmap="viridis", aspect="auto")
        axis.set_title(f"{video}\n{score:.3f}", fontsize=8)
        axis.set_xlabel("its frames")
        axis.set_ylabel("query frames")
    figure.suptitle(os.path.basename(query), fontsize=9)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    plt.close(figure)


def main():
    args = get_args_parser().parse_args()
    given = [name for name, value in (("--query", args.query), ("--query_list", args.query_list),
                                      ("--query_features", args.query_features)) if value is not None]
    if len(given) > 1 or (not given and args.query_ids is None):
        raise UserError("give one of --query, --query_list, --query_features (with or without --query_ids), "
                        "or --query_ids alone")
    if args.k < 1 or args.shortlist < 1:
        raise UserError("--k and --shortlist must be >= 1")
    check_outputs_apart({"--json_out": args.json_out, "--plot": args.plot},
                        {"--query_features": args.query_features, "--query_list": args.query_list,
                         "--index_dir": args.index_dir})
    if args.json_out:
        check_writable(args.json_out)
    if args.plot:
        if os.path.exists(args.plot) and not os.path.isdir(args.plot):
            raise UserError(f"{args.plot}: exists and is not a folder")
        check_writable(os.path.join(args.plot, "probe.png"))
    dist = init_distributed()

    def finished_manifest():  # rank 0's: a rank of another host needs only its shard's folder
        manifest = index_store.read_manifest(args.index_dir)
        if not manifest.get("complete"):
            raise UserError(f"{args.index_dir}: unfinished (index.py was stopped): run the same index.py command "
                            "again")
        return manifest
    manifest = on_rank0(dist, finished_manifest)
    store, index = open_shard(args.index_dir, manifest, dist)
    device = local_device(dist, args.device)
    known = None
    if args.query_features is None and args.query_ids is not None:  # videos of the index: in which shards
        known = set().union(*gather_objects(dist, set(store.ids)))
    started = time.perf_counter()
    ids, features = on_rank0(dist, lambda: query_videos(args, manifest, known))
    extract_seconds = time.perf_counter() - started if args.query or args.query_list else None

    started = time.perf_counter()
    if features is None:
        embeddings, query_frames = stored_queries(dist, store, ids)
    else:
        embeddings, query_frames = on_rank0(dist, lambda: embed_queries(
            load_index_model(args.index_dir, manifest, device), ids, features, manifest["settings"]["padding_size"],
            device))
    embed_seconds = time.perf_counter() - started
    started = time.perf_counter()
    index_store.set_search_parameter(index, args.nprobe or manifest.get("default_nprobe"), args.ef_search)
    shortlist = 0 if args.rerank == "none" else min(args.shortlist, manifest["videos"])
    shortlists = global_shortlists(dist, store, index, embeddings, min(max(args.k, shortlist), manifest["videos"]))
    stage1_seconds = time.perf_counter() - started
    started = time.perf_counter()
    scores = {}  # (query number, place in its shortlist) -> stage-2 score, from the shard holding the video
    if shortlist:
        mine = {}
        for q, candidates in enumerate(shortlists):
            places = [i for i, (_, shard, _, _) in enumerate(candidates[:shortlist]) if shard == dist.rank]
            if places:
                videos = store.shortlist_frames([candidates[i][2] for i in places])
                found = frame_scores(query_frames[q], videos, args.rerank, device)
                mine.update({(q, i): float(score) for i, score in zip(places, found)})
        for part in gather_objects(dist, mine):
            scores.update(part)
    results = {}  # query -> [(shard, position, id, score or None, stage-1 score)], best first
    for q, query in enumerate(ids):
        candidates = shortlists[q]
        fine = [scores[q, i] for i in range(min(shortlist, len(candidates)))]
        order = list(np.argsort(-np.array(fine, dtype=np.float64), kind="stable")) + list(range(len(fine), len(candidates)))
        results[query] = [(candidates[i][1], candidates[i][2], candidates[i][3],
                           float(fine[i]) if i < len(fine) else None, float(candidates[i][0])) for i in order[:args.k]]
    stage2_seconds = time.perf_counter() - started

    matches = {}  # (query number, rank) -> frames of the top 4 for the plots, from the shard holding each
    if args.plot:
        for part in gather_objects(dist, {(q, n): store.frames(position) for q, rows in enumerate(results.values())
                                          for n, (shard, position, *_) in enumerate(rows[:4]) if shard == dist.rank}):
            matches.update(part)
    if dist.rank == 0:
        write_outputs(args, manifest, results, query_frames, matches, shortlist,
                      (extract_seconds, embed_seconds, stage1_seconds, stage2_seconds))
    store.close()


def open_shard(index_dir, manifest, dist):
    """This rank's (frame store, FAISS index): the whole index in one process,
    shard `rank` of a sharded index under horovodrun with one rank per shard."""
    shards = manifest.get("shards")
    if (shards or 1) != dist.size:
        agree(dist, f"{index_dir}: has {shards} shards: search it with horovodrun -np {shards} python search.py ..."
              if shards else f"{index_dir}: is not sharded: search it with one process (python search.py, "
              f"not {dist.size} ranks)")
    directory = index_store.shard_dir(index_dir, dist.rank) if shards else index_dir
    expected = manifest["shard_videos"][dist.rank] if shards else manifest["videos"]
    error, store, index = None, None, None
    try:
        store = index_store.FrameStore(directory)
        if len(store.ids) != expected:
            raise UserError(f"{directory}: the frame store holds {len(store.ids):,} videos, the manifest "
                            f"{expected:,} (parts missing?)")
        index = index_store.read_faiss(directory)
        if index.ntotal != len(store.ids):
            raise UserError(f"{directory}: index.faiss holds {index.ntotal:,} videos, the frame store "
                            f"{len(store.ids):,}")
    except UserError as e:
        error = str(e)
    agree(dist, error)
    return store, index


def load_index_model(index_dir, manifest, device):
    """The index's copy of the checkpoint, checked against the manifest."""
    model_path = os.path.join(index_dir, index_store.MODEL_FILE)
    if not os.path.isfile(model_path) or index_store.sha256(model_path) != manifest["settings"]["model_sha256"]:
        raise UserError(f"{model_path}: missing or not the checkpoint the index was made with")
    return load_model(model_path, {}, device)


def global_shortlists(dist, store, index, embeddings, shortlist):
    """Per query, its TCA_c top `shortlist` over every shard, best first, as
    [(stage-1 score, shard, position in the shard, id)]: each shard's own top
    `shortlist` holds every video of the global one that it holds."""
    rows = [[] for _ in range(len(embeddings))]
    if index.ntotal:
        coarse, positions = index.search(embeddings, min(shortlist, index.ntotal))  # -1: fewer found
        rows = [[(float(s), dist.rank, int(p), store.ids[p]) for s, p in zip(coarse[q], positions[q]) if p >= 0]
                for q in range(len(embeddings))]
    merged = [sum(per_query, []) for per_query in zip(*gather_objects(dist, rows))]
    # stable: equal scores keep shard order, then each shard's own order
    return [sorted(candidates, key=lambda c: -c[0])[:shortlist] for candidates in merged]


def write_outputs(args, manifest, results, query_frames, matches, shortlist, seconds):
    """Rank 0: the printed results, --json_out and --plot."""
    for query, rows in results.items():
        print(f"query {query}:")
        print(f"  {'rank':>4}  {'score':>8}  {'stage 1':>8}  id")
        for rank, (_, _, video, score, first) in enumerate(rows, 1):
            print(f"  {rank:>4}  {'-' if score is None else f'{score:.4f}':>8}  {first:8.4f}  {video}")
    extract_seconds, embed_seconds, stage1_seconds, stage2_seconds = seconds
    extracted = "" if extract_seconds is None else f"decoding + CNN + PCA {extract_seconds:.3f} s, "
    depth = max(args.k, shortlist)
    print(f"{len(results)} queries: {extracted}embedding {embed_seconds:.3f} s, stage 1 (TCA_c top-{depth}, "
          f"{manifest['index_factory']}) {stage1_seconds:.3f} s, stage 2 ({args.rerank} of the top {shortlist}) "
          f"{stage2_seconds:.3f} s")
    if args.json_out:
        # scores that keep the ranking (evaluation.py --shortlist's): a --k beyond the
        # shortlist puts the re-scored videos SHORTLIST_OFFSET above the stage-1 ones
        offset = SHORTLIST_OFFSET if shortlist and args.k > shortlist else 0.0
        with atomic_path(args.json_out) as tmp, open(tmp, "w") as f:
            json.dump({query: {video: first if score is None else score + offset
                               for _, _, video, score, first in rows} for query, rows in results.items()}, f)
        print(f"wrote {args.json_out}")
    if args.plot:
        os.makedirs(args.plot, exist_ok=True)
        for q, (query, rows) in enumerate(results.items()):
            # a video file's plot is named after the file, an id's after the id ('/' -> '_')
            name = (os.path.basename(query) if os.path.isfile(query) else query).replace(os.sep, "_") + ".png"
            plot_matches(os.path.join(args.plot, name), query, query_frames[q],
                         [(video, matches[q, n], first if score is None else score)
                          for n, (_, _, video, score, first) in enumerate(rows[:4])])
        print(f"wrote {len(results)} plots to {args.plot}")


if __name__ == "__main__":
    run_main(main)
