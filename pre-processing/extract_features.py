"""Extract frame-level CNN features from videos into HDF5, one dataset per
video id of shape (T, 3840): ImageNet ResNet-50, iMAC (or R-MAC) pooling of
the outputs of layer1..layer4, as TCA's pre-processing does.

    python pre-processing/extract_features.py --video_list videos.tsv --output imac.h5
    python pre-processing/extract_features.py --frames_dir frames/ --output imac.h5
    horovodrun -np 8 -H host1:4,host2:4 python pre-processing/extract_features.py --video_list videos.tsv --output imac.h5

With --video_list the videos are decoded by parallel worker processes
(video.py: 1 fps, shorter side 256, centre crop 256) and the frames stream
straight into the CNN (cnn.py), a window of 256 frames at a time, so a
worker's memory does not grow with a video's length; nothing but the
features is stored. --frames_dir reads extract_frames.py's .npy files. On a
CPU each worker process (one per core) runs the CNN itself, one thread, on
the videos it decodes, in batches of 8 (--schedule lanes); on a GPU the main
process runs it on batches of 64 frames across videos while the workers
decode ahead (--schedule overlap): pipeline.py. With --pca_params the
features are PCA-whitened (whitening.py) before they are stored, at --dtype.

Under horovodrun the ranks share the videos (sharding.py), each on its local
GPU or its share of the cores, and rank 0 merges their parts. Killing the run
loses at most --checkpoint_every seconds of work; a re-run, with any number
of ranks, skips the videos already extracted, and refuses an output made
with other settings (writer.py). Videos that cannot be decoded, or whose
worker process dies, are reported, listed in a failures file and skipped.
"""
import argparse
import os
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utils import UserError, check_outputs_apart, local_device, run_main  # noqa: E402
import pipeline  # noqa: E402
import sharding  # noqa: E402
from cnn import POOLING, RANDOM_WEIGHTS, bf16_is_faster, build_extractor  # noqa: E402
from lanes import limit_heap_growth  # noqa: E402
from video import list_frame_files, read_video_list  # noqa: E402
from writer import ResumableH5Writer, check_failures_path, check_video_ids, write_failures  # noqa: E402

DTYPES, SCHEDULES = pipeline.DTYPES, pipeline.SCHEDULES


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

def main():
    args = get_args_parser().parse_args()
    limit_heap_growth()  # also in this process: lanes 0, or the CNN of --schedule overlap
    dist = sharding.start()
    device = local_device(dist, args.device)
    batch_size = pipeline.default_batch_size(device.type) if args.batch_size is None else args.batch_size
    lanes = pipeline.uses_lanes(args.schedule, device.type)
    workers = pipeline.default_workers(lanes, dist.local_size) if args.workers is None else args.workers
    if args.fps <= 0 or batch_size <= 0 or workers < 0:
        raise UserError("--fps and --batch_size must be positive, --workers non-negative")
    if args.video_list is not None:
        videos, fps = read_video_list(args.video_list), args.fps
    else:
        videos, fps = list_frame_files(args.frames_dir), None
    check_video_ids([video_id for video_id, _ in videos], args.video_list or args.frames_dir)
    whitening = pipeline.load_whitening(args.pca_params, args.components, args.feature)
    weights = RANDOM_WEIGHTS if args.random_weights else args.weights
    settings = pipeline.extraction_settings(fps=fps, feature=args.feature, weights=weights, bf16=args.bf16 == "on",
                                            channels_last=args.channels_last, pca_params=args.pca_params,
                                            components=args.components, dtype=args.dtype)
    failures_path = args.failures or args.output + ".failures.tsv"
    check_failures_path(failures_path)
    check_outputs_apart({"--output": args.output, "--failures": failures_path},
                        {"--video_list": args.video_list, "--pca_params": args.pca_params, "--weights": args.weights})
    model = None

    def settle(recorded):  # rank 0, holding the output's lock: --bf16 auto
        nonlocal model
        if args.bf16 != "auto":
            return {}
        if "bf16" in recorded:
            bf16, why = recorded["bf16"], f"as {args.output} was made"
        else:
            model = build_extractor(args.feature, weights, device, args.channels_last)
            bf16, why = bf16_is_faster(model, device, args.channels_last, batch_size,
                                       1 if lanes else torch.get_num_threads())
        print(f"--bf16 auto: {'on' if bf16 else 'off'} ({why})", flush=True)
        return {"bf16": bf16}

    with ResumableH5Writer(args.output, args.checkpoint_every, settings, dist, settle) as writer:
        todo = [(video_id, path) for video_id, path in videos if video_id not in writer]
        mine = sharding.share(todo, dist)
        if dist.rank == 0:
            print(f"{len(videos)} videos, {len(videos) - len(todo)} already done, {len(todo)} to extract"
                  + (f" by {dist.size} ranks" if dist.size > 1 else ""), flush=True)
        model = model or build_extractor(args.feature, weights, device, args.channels_last)
        start, num_frames, failures = time.time(), 0, []
        with tqdm(total=len(mine), unit="video", disable=dist.rank != 0) as bar:
            for video_id, path, features, error in pipeline.video_features(
                    model, mine, fps, workers, batch_size, device, args.channels_last, writer.settings["bf16"],
                    args.schedule):
                if error is not None:
                    tqdm.write(f"skipping {video_id} ({path}): {error}", file=sys.stderr)
                    failures.append((video_id, path, error))
                else:
                    writer.add(video_id, pipeline.stored(features, whitening, args.dtype))
                    num_frames += len(features)
                bar.update()
                bar.set_postfix(frames_per_s=f"{num_frames / (time.time() - start):.1f}")
        elapsed = time.time() - start
        ranks = writer.finish((failures, num_frames))
        if ranks is None:  # not rank 0
            return
        merge_time = time.time() - start - elapsed
        order = {video_id: i for i, (video_id, _) in enumerate(videos)}
        failures = sorted((failure for failures, _ in ranks for failure in failures), key=lambda f: order[f[0]])
        write_failures(failures_path, failures)

    num_frames = sum(frames for _, frames in ranks)
    print(f"extracted {len(todo) - len(failures)} videos ({num_frames} frames, "
          f"{num_frames / max(elapsed, 1e-9):.1f} frames/s) into {args.output}, "
          f"skipped {len(videos) - len(todo)} already done, failed {len(failures)}"
          + (f" (listed in {failures_path})" if failures else "") + f"; merged in {merge_time:.1f} s")


if __name__ == "__main__":
    run_main(main)
