"""Decode videos into frames at a fixed rate (default 1 frame per second),
resized so the shorter side is 256 and centre-cropped to 256x256, as TCA's
pre-processing does (video.py). Each video becomes DIR/<id>.npy, uint8
(T, 256, 256, 3) RGB.

    python pre-processing/extract_frames.py --video_list videos.tsv --output frames/
    python pre-processing/extract_frames.py --video_list 'videos/*/{id}.mp4' --output frames/

The frames need not be stored: extract_features.py --video_list decodes with
the same function (video.decode_windows, a window of frames at a time, so
memory does not grow with a video's length) and streams the frames straight
into the CNN. This script writes each video whole.

A video is written once complete (write then rename), so a killed run loses
nothing and a re-run skips the finished videos. Videos that cannot be decoded
(corrupt, truncated, empty, not a video), or whose worker process dies
(lanes.py), are reported, listed in a failures file and skipped.
"""
import argparse
import os
import sys
import time

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utils import UserError, check_outputs_apart, run_main  # noqa: E402
from lanes import videos_in_lanes  # noqa: E402
from video import frames_path, read_video_list, remove_stale_frames, save_frames, video_items  # noqa: E402
from writer import check_failures_path, write_failures  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--video_list", required=True,
                        help="file of 'id<TAB>path' lines (paths relative to the file), "
                             "or a quoted glob pattern with {id}, e.g. 'videos/*/{id}.mp4'")
    parser.add_argument("--output", required=True, help="directory for the <id>.npy frame files")
    parser.add_argument("--fps", type=float, default=1.0, help="frames kept per second of video")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="parallel decoding processes (lanes.py: one that dies costs only its video; 0: decode in "
                             "this process)")
    parser.add_argument("--failures", default=None,
                        help="where to list the videos that failed (a file this program wrote, or none: another "
                             "file is refused); None: OUTPUT/failures.tsv")
    return parser


def main():
    args = get_args_parser().parse_args()
    if args.fps <= 0 or args.workers < 0:
        raise UserError("--fps must be positive, --workers non-negative")
    videos = read_video_list(args.video_list)
    failures_path = args.failures or os.path.join(args.output, "failures.tsv")
    check_failures_path(failures_path)
    check_outputs_apart({"--output": args.output, "--failures": failures_path}, {"--video_list": args.video_list})
    os.makedirs(args.output, exist_ok=True)
    remove_stale_frames(args.output)

    todo = [(video_id, path) for video_id, path in videos if not os.path.exists(frames_path(args.output, video_id))]
    print(f"{len(videos)} videos, {len(videos) - len(todo)} already done, {len(todo)} to decode")

    def decode(video_id, path):  # in a lane: one item, the video's number of frames
        return video_items(video_id, path, lambda: [save_frames(args.output, video_id, path, args.fps)])

    start, num_frames, failures, count = time.time(), 0, [], 0
    with tqdm(total=len(todo), unit="video") as bar:
        for video_id, path, frames, error in videos_in_lanes(todo, decode, args.workers):
            if frames is not None:
                count = frames
                continue
            if error is not None:
                tqdm.write(f"skipping {video_id} ({path}): {error}", file=sys.stderr)
                failures.append((video_id, path, error))
            else:
                num_frames += count
            bar.update()

    elapsed = time.time() - start
    write_failures(failures_path, failures)
    print(f"decoded {len(todo) - len(failures)} videos ({num_frames} frames, "
          f"{num_frames / max(elapsed, 1e-9):.1f} frames/s), skipped {len(videos) - len(todo)} already done, "
          f"failed {len(failures)}" + (f" (listed in {failures_path})" if failures else ""))


if __name__ == "__main__":
    run_main(main)
