"""demo/build_benchmark.py: the mini benchmark's annotations match the videos
it renders. One small benchmark (1.2 s clips, every transformation) is built
once into a temporary directory; the tests read it back with PyAV and with
the project's own annotation readers."""
import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "demo", "build_benchmark.py")
from data import FIVR
from utils import load_pickle


def test_ffmpeg_is_installed():
    # `make install` installs it; without it the demo cannot build its benchmark
    assert shutil.which("ffmpeg"), "ffmpeg CLI not installed (apt-get install -y ffmpeg)"

# every ND and DS transformation, so each one is checked
SMALL = ["--clip_seconds", "1.2", "--procedural", "1", "--train_procedural", "1", "--distractors", "2", "--backgrounds", "2",
         "--train_copies", "3", "--eval_nd", "6", "--eval_ds", "3", "--seed", "3"]


def load_builder():
    spec = importlib.util.spec_from_file_location("build_benchmark", BUILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark")
    result = subprocess.run([sys.executable, BUILD, "--out", str(out)] + SMALL,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(out / "benchmark.json") as f:
        manifest = json.load(f)
    return {"dir": out, "manifest": manifest, "videos": {v["id"]: v for v in manifest["videos"]},
            "vcdb": load_pickle(out / "vcdb.pickle"), "fivr": load_pickle(out / "fivr.pickle")}


def read_list(path):
    with open(path) as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    assert all(len(row) == 2 for row in rows), path
    return {vid: os.path.join(os.path.dirname(path), p) for vid, p in rows}


def gray_frames(path, size=(32, 18)):
    """Every frame as a small grey thumbnail, (T, 18, 32) float."""
    with av.open(str(path)) as container:
        return np.stack([frame.reformat(width=size[0], height=size[1], format="gray").to_ndarray().astype(np.float32)
                         for frame in container.decode(video=0)])


def correlation(a, b):
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-6))


def test_video_lists_cover_every_video_once(bench):
    everything = read_list(bench["dir"] / "videos.txt")
    train = read_list(bench["dir"] / "train_videos.txt")
    evaluation = read_list(bench["dir"] / "eval_videos.txt")
    assert not set(train) & set(evaluation)
    assert everything == {**train, **evaluation}
    assert set(everything) == set(bench["videos"])
    for vid, path in everything.items():
        assert os.path.isfile(path), vid
    with open(bench["dir"] / "videos.txt") as f:  # relative paths: the directory can be moved
        assert not any(os.path.isabs(line.split("\t")[1]) for line in f)


def test_every_annotated_id_has_a_video_of_its_split(bench):
    train = set(read_list(bench["dir"] / "train_videos.txt"))
    evaluation = set(read_list(bench["dir"] / "eval_videos.txt"))
    vcdb, fivr = bench["vcdb"], bench["fivr"]

    paired = {v for pair in vcdb["video_pairs"] for v in pair["videos"]}
    core = vcdb["index"][:len(vcdb["index"]) - len(vcdb["negs"])]
    assert set(core) == paired and vcdb["index"][len(core):] == vcdb["negs"]
    assert set(vcdb["index"]) == train
    assert not paired & set(vcdb["negs"])

    for version in ("5k", "200k"):
        queries, database = fivr[version]["queries"], fivr[version]["database"]
        assert set(queries) | set(database) == evaluation and not set(queries) & set(database)
    assert set(fivr["annotation"]) == set(fivr["5k"]["queries"])
    for query, labels in fivr["annotation"].items():
        assert set(labels) == {"ND", "DS", "CS", "IS"}
        assert labels["ND"] and labels["DS"] and labels["CS"], query
        assert set().union(*labels.values()) <= fivr["5k"]["database"]


def test_annotations_have_the_real_files_structure(annotation_dir, bench):
    """Same keys and container types as the real vcdb.pickle / fivr.pickle, and
    the project's FIVR reader accepts the generated file."""
    vcdb, fivr = bench["vcdb"], bench["fivr"]
    assert set(vcdb) == {"video_pairs", "index", "negs"}
    assert isinstance(vcdb["index"], list) and isinstance(vcdb["negs"], list)
    for pair in vcdb["video_pairs"]:
        assert set(pair) == {"videos", "overlap"} and len(pair["videos"]) == 2 and len(pair["overlap"]) == 2
    assert isinstance(fivr["5k"]["queries"], list) and isinstance(fivr["5k"]["database"], set)
    assert all(isinstance(ids, list) for labels in fivr["annotation"].values() for ids in labels.values())

    # the same structure as the real annotation files
    real_vcdb = load_pickle(os.path.join(annotation_dir, "vcdb.pickle"))
    real_fivr = load_pickle(os.path.join(annotation_dir, "fivr.pickle"))
    assert set(real_vcdb) == set(vcdb) and set(real_vcdb["video_pairs"][0]) == set(vcdb["video_pairs"][0])
    assert set(real_fivr) == set(fivr) and set(real_fivr["5k"]) == set(fivr["5k"])
    assert type(real_fivr["5k"]["database"]) is type(fivr["5k"]["database"])

    benchmark = FIVR("5k", annotation_dir=str(bench["dir"]))
    assert benchmark.queries == fivr["5k"]["queries"]
    assert benchmark.database == sorted(fivr["5k"]["database"])


def test_videos_decode_with_the_planned_frames_size_and_duration(bench):
    for vid, spec in bench["videos"].items():
        with av.open(str(bench["dir"] / spec["path"])) as container:
            stream = container.streams.video[0]
            frames = sum(1 for _ in container.decode(video=0))
            assert frames == spec["num_frames"], vid
            assert [stream.width, stream.height] == spec["size"], vid
            assert stream.average_rate == 25, vid
            assert float(stream.duration * stream.time_base) == pytest.approx(frames / 25, abs=0.05), vid
            assert not container.streams.audio, vid


def test_train_and_eval_use_disjoint_sources(bench):
    videos, masters = bench["videos"], {m["id"]: m for m in bench["manifest"]["masters"]}

    def origins(vid):
        """Real files, lavfi graphs and masters a video is made of, followed back to the start."""
        out = set()
        for inp in videos[vid]["inputs"]:
            if isinstance(inp, dict) and "master" in inp:
                out |= {inp["master"]} | {m["lavfi"] for m in masters[inp["master"]]["inputs"]}
            elif isinstance(inp, dict):
                out.add(inp["lavfi"])
            elif inp in videos:
                out |= {inp} | origins(inp)
            else:
                out.add(os.path.realpath(inp))
        return out

    by_split = {split: set().union(*(origins(v) | {videos[v]["group"]} for v in videos if videos[v]["split"] == split))
                for split in ("train", "eval")}
    assert by_split["train"] and by_split["eval"]
    assert not by_split["train"] & by_split["eval"]
    # the real videos are divided between the splits, not shared
    real = {split: {o for o in by_split[split] if os.path.isfile(o)} for split in by_split}
    assert len(real["train"]) == 2 and len(real["eval"]) == 2  # carphone pair / bigbuckbunny, bikes


def test_positives_are_derived_from_their_query(bench):
    videos, fivr = bench["videos"], bench["fivr"]
    for query, labels in fivr["annotation"].items():
        q = videos[query]
        for label, ids in labels.items():
            for vid in ids:
                p = videos[vid]
                assert p["group"] == query and p["label"] == label and p["role"] == "positive"
                if label in ("ND", "DS"):
                    assert p["inputs"][0] == query  # made from the query's file
                else:  # CS / IS: the same master, another window or a later time
                    assert p["inputs"] == q["inputs"]
                    assert (p["window"] != q["window"]) if label == "CS" else (p["master_frames"][0] >= q["num_frames"])
    for vid, v in videos.items():  # distractors and hosts are nobody's positive
        if v["role"] == "distractor":
            assert all(vid not in ids for labels in fivr["annotation"].values() for ids in labels.values())


def test_copied_frames_are_where_the_annotation_says(bench):
    """The decoded pixels agree with the recorded segments: a temporal crop or a
    re-encode shows the query's frames at the recorded offsets, an inserted clip
    shows them between the host's frames, a CS/IS clip is a different view."""
    videos, base = bench["videos"], bench["dir"]
    for query in bench["fivr"]["5k"]["queries"]:
        q = gray_frames(base / videos[query]["path"])
        for vid, v in videos.items():
            if v["group"] != query or v["role"] != "positive":
                continue
            frames = gray_frames(base / v["path"])
            a, b = v["segment"] or (0, 0)
            if v["transform"] in ("reencode", "temporal_crop"):
                for k in range(b - a):
                    assert correlation(frames[k], q[a + k]) > 0.9, (vid, k)
            elif v["transform"] == "inserted":
                before = v["params"]["host_frames_before"]
                host = gray_frames(base / videos[v["host"]]["path"])
                for k in range(b - a):
                    assert correlation(frames[before + k], q[a + k]) > 0.9, (vid, k)
                assert correlation(frames[0], host[0]) > 0.9
                assert correlation(frames[-1], host[before + v["params"]["host_frames_after"] - 1]) > 0.9
            elif v["label"] in ("CS", "IS"):
                assert np.mean([correlation(f, g) for f, g in zip(frames, q)]) < 0.9, vid


def test_vcdb_overlaps_follow_the_segments(bench):
    videos = bench["videos"]
    for pair in bench["vcdb"]["video_pairs"]:
        x, y = (videos[v] for v in pair["videos"])
        assert x["group"] == y["group"] and x["split"] == y["split"] == "train"
        assert all(0 < o <= 1 for o in pair["overlap"]), pair
        if x["role"] == "source" and y["transform"] in ("temporal_crop", "inserted"):
            a, b = y["segment"]
            assert pair["overlap"] == pytest.approx([(b - a) / x["num_frames"], (b - a) / y["num_frames"]], abs=1e-3)


def test_same_seed_same_benchmark(bench, tmp_path):
    builder = load_builder()
    config = dict(seed=3, clip_seconds=1.2, num_procedural=1, num_distractors=2, num_backgrounds=2,
                  train_copies=3, eval_nd=6, eval_ds=3, num_train_procedural=1)
    first, second = builder.plan(**config), builder.plan(**config)
    assert pickle.dumps(first) == pickle.dumps(second)
    assert pickle.dumps(builder.plan(**dict(config, seed=4))) != pickle.dumps(first)
    assert first[2] == bench["vcdb"]
    assert first[3] == bench["fivr"]

    # ffmpeg runs bit-exact: re-running a recorded command gives the same bytes
    spec = next(v for v in bench["manifest"]["videos"] if v["transform"] == "overlay")
    command = list(spec["command"])
    command[-1] = str(tmp_path / "again.mp4")
    subprocess.run(command, check=True, cwd=bench["dir"])
    digest = [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (bench["dir"] / spec["path"], command[-1])]
    assert digest[0] == digest[1]


def test_train_flags_do_not_change_the_eval_split():
    """Each split has its own random generator: a bigger train split leaves
    the eval videos, masters and annotation exactly as they were."""
    builder = load_builder()
    config = dict(seed=3, clip_seconds=1.2, num_procedural=1, num_distractors=2, num_backgrounds=2,
                  train_copies=3, eval_nd=6, eval_ds=3, num_train_procedural=1)
    small = builder.plan(**config)
    big = builder.plan(**dict(config, num_backgrounds=5, train_copies=4, num_train_procedural=3))
    assert pickle.dumps(big[0]) == pickle.dumps(small[0])  # eval masters
    assert pickle.dumps([v for v in big[1] if v["split"] == "eval"]) == \
        pickle.dumps([v for v in small[1] if v["split"] == "eval"])
    assert big[3] == small[3]
    assert len(big[2]["video_pairs"]) > len(small[2]["video_pairs"]) and len(big[2]["negs"]) == 5


def test_bad_arguments_are_one_line_errors(tmp_path):
    result = subprocess.run([sys.executable, BUILD, "--out", str(tmp_path), "--clip_seconds", "9"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --clip_seconds 9.0: must be between 0.5 and 4.5"
    result = subprocess.run([sys.executable, BUILD, "--out", str(tmp_path), "--ffmpeg", "no-such-ffmpeg"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "ffmpeg not found" in result.stderr


def test_run_demo_weights_fallback(capsys):
    """Offline, the demo falls back to a random ResNet-50 with a warning and names it; explicit flags win."""
    spec = importlib.util.spec_from_file_location("run_demo", os.path.join(ROOT, "demo", "run_demo.py"))
    run_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_demo)
    parse = run_demo.get_args_parser().parse_args
    flags, name = run_demo.choose_backbone(parse([]), available=lambda: False)
    assert flags == ["--random_weights"] and "random" in name
    assert "WARNING" in capsys.readouterr().out
    flags, name = run_demo.choose_backbone(parse([]), available=lambda: True)
    assert flags == [] and "ImageNet" in name
    assert run_demo.choose_backbone(parse(["--weights", "r.pth"]), available=lambda: False)[0] == ["--weights", "r.pth"]
    assert run_demo.choose_backbone(parse(["--random-weights"]), available=lambda: True)[0] == ["--random_weights"]


def test_run_demo_shards_extraction_only_over_two_or_more_gpus(monkeypatch):
    spec = importlib.util.spec_from_file_location("run_demo", os.path.join(ROOT, "demo", "run_demo.py"))
    run_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_demo)
    import torch
    for gpus, np_, expected in ((0, 2, 1), (1, 2, 1), (2, 2, 2), (8, 2, 2), (8, 4, 4), (2, 4, 2)):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        assert run_demo.extraction_ranks(np_) == expected


def test_run_demo_strips_the_launchers_rank_tags_even_when_a_read_splits_one(tmp_path):
    """horovodrun puts "[1,0]<stderr>:" (mpirun) or "[0]<stdout>:" (Gloo) before every piece of a rank's
    output, cutting progress bars into fragments; the demo's log shows what the ranks printed, untagged."""
    import io
    spec = importlib.util.spec_from_file_location("run_demo", os.path.join(ROOT, "demo", "run_demo.py"))
    run_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_demo)
    launched = (b"[1,0]<stdout>:32 training pairs\n[1,0]<stderr>:\repoch 1/2:  25%| 1/4 [00:00<00:01]"
                b"[1,0]<stderr>:\repoch 1/2: 100%| 4/4 [00:01<00:00]\n[0]<stdout>:saved m/model.pth\n")
    printed = b"32 training pairs\n\repoch 1/2:  25%| 1/4 [00:00<00:01]\repoch 1/2: 100%| 4/4 [00:01<00:00]\n" \
              b"saved m/model.pth\n"
    for cut in range(1, len(launched)):  # every place a read can end, tags included
        out = io.BytesIO()
        run_demo.untag([launched[:cut], launched[cut:]], out)
        assert out.getvalue() == printed, cut
