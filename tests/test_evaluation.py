"""evaluation.py: similarity files, the command line, model and baseline modes."""
import json
import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

import evaluation
from model import build_model
from similarity import chamfer_similarity
from evaluation_helpers import C, ROOT, evaluate_mini, fivr5k_case, run
from utils import l2_normalize
# --------------------------------------------------------------------------
# precomputed similarities on the real FIVR-5K annotation

@pytest.mark.parametrize("ext", [".npz", ".json", ".h5"])
def test_similarity_files_round_trip_and_json_out(annotation_dir, ext, tmp_path, capsys):
    queries, columns, sims, expected_dsvr = fivr5k_case(annotation_dir)
    path = tmp_path / f"sims{ext}"
    evaluation.save_similarities(str(path), queries, columns, sims)
    q, d, s = evaluation.load_similarities(str(path))
    assert (q, d) == (queries, columns)
    np.testing.assert_allclose(s, sims)
    status, out, _ = run(["--dataset", "FIVR-5K", "--annotation_dir", annotation_dir, "--similarities", path,
                          "--json_out", tmp_path / "m.json"], capsys)
    assert status == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert {"DSVR", "CSVR", "ISVR"} <= set(metrics)  # and the µAP / hard keys (issue 14)
    assert metrics["DSVR"] == pytest.approx(expected_dsvr)
    assert "48 queries are missing" in out and "DSVR" in out


def test_json_results_with_different_videos_per_query(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"q1": {"a": 0.5, "b": 0.25}, "q2": {"b": 1.0, "c": 0.0}}))
    q, d, s = evaluation.load_similarities(str(path))
    assert q == ["q1", "q2"] and d == ["a", "b", "c"]
    np.testing.assert_array_equal(s, [[0.5, 0.25, np.nan], [np.nan, 1.0, 0.0]])


def test_results_csv_appends_rows(annotation_dir, tmp_path, capsys):
    import pandas as pd
    queries, columns, sims, expected_dsvr = fivr5k_case(annotation_dir)
    evaluation.save_similarities(str(tmp_path / "s.npz"), queries, columns, sims)
    for _ in range(2):
        status, _, _ = run(["--dataset", "FIVR-5K", "--annotation_dir", annotation_dir,
                            "--similarities", tmp_path / "s.npz", "--results_csv", tmp_path / "runs.csv"], capsys)
        assert status == 0
    table = pd.read_csv(tmp_path / "runs.csv")
    assert len(table) == 2
    assert list(table["dataset"]) == ["FIVR-5K"] * 2
    assert table["DSVR"].tolist() == pytest.approx([expected_dsvr] * 2)
    assert {"checkpoint", "metric", "CSVR", "ISVR", "s_per_query"} <= set(table.columns)


# --------------------------------------------------------------------------
# bad input: one line, exit 2, no traceback

@pytest.mark.parametrize("argv, message", [
    (["--dataset", "NOPE", "--similarities", "x.npz"], "unknown dataset 'NOPE'"),
    (["--dataset", "EVVE", "--annotation_dir", "/nonexistent", "--similarities", "x.npz"], "python datasets/download.py re-fetches them"),
    (["--dataset", "EVVE", "--annotation_dir", "@annotations"], "give --similarities"),
    (["--dataset", "EVVE", "--annotation_dir", "@annotations", "--feature_path", "f.h5"], "exactly one of"),
])
def test_bad_command_lines(argv, message, capsys, annotation_dir):
    status, _, err = run([annotation_dir if a == "@annotations" else a for a in argv], capsys)
    assert status == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_malformed_similarity_files(annotation_dir, tmp_path, capsys):
    cases = {"garbage.npz": b"not a zip", "garbage.json": b"{not json", "list.json": b"[1, 2]",
             "garbage.h5": b"not hdf5", "sims.txt": b""}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    np.savez(tmp_path / "nokeys.npz", x=np.zeros(2))
    np.savez(tmp_path / "shape.npz", queries=np.array(["a"]), database=np.array(["b", "c"]),
             similarities=np.zeros((1, 3)))
    np.savez(tmp_path / "twice.npz", queries=np.array(["a", "a"]), database=np.array(["b", "c"]),
             similarities=np.zeros((2, 2)))  # the error named no file
    (tmp_path / "folder.npz").mkdir()
    for name in list(cases) + ["nokeys.npz", "shape.npz", "twice.npz", "folder.npz", "missing.npz"]:
        status, _, err = run(["--dataset", "EVVE", "--annotation_dir", annotation_dir,
                              "--similarities", tmp_path / name], capsys)
        assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, (name, err)
        assert name in err


@pytest.mark.parametrize("content, message", [
    ('{"q": {"a": "0.9"}}', "query q, video a: score '0.9' is not a number"),
    ('{"q": {"a": true}}', "query q, video a: score True is not a number"),
    ('{"q": {"a": 0.5, "a": 0.7}}', "lists 'a' twice in one object"),
    ('{"q": {"a": 0.5}, "q": {"a": 0.7}}', "lists 'q' twice in one object"),
    ('{"q": {"a": Infinity}}', "query q, video a: score inf is not finite"),
    ('{"q": {"a": NaN}}', "every score is NaN (not computed)"),
])
def test_json_scores_must_be_finite_numbers_under_unique_keys(annotation_dir, content, message, tmp_path, capsys):
    (tmp_path / "s.json").write_text(content)
    status, _, err = run(["--dataset", "EVVE", "--annotation_dir", annotation_dir, "--similarities",
                          tmp_path / "s.json"], capsys)
    assert status == 2 and err == f"error: {tmp_path / 's.json'}: {message}\n"


def test_npz_with_an_infinite_score_is_refused(annotation_dir, tmp_path, capsys):
    sims = np.array([[0.5, np.nan], [np.inf, 0.1]])
    np.savez(tmp_path / "s.npz", queries=np.array(["q1", "q2"]), database=np.array(["a", "b"]), similarities=sims)
    status, _, err = run(["--dataset", "EVVE", "--annotation_dir", annotation_dir, "--similarities",
                          tmp_path / "s.npz"], capsys)
    assert status == 2 and err == f"error: {tmp_path / 's.npz'}: query q2, video a: score inf is not finite\n"


def test_error_exit_from_the_shell():
    result = subprocess.run([sys.executable, "evaluation.py", "--dataset", "FIVR-5K",
                             "--annotation_dir", "/nonexistent", "--similarities", "x.npz"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: /nonexistent/fivr.pickle: annotation file not found")
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_unknown_ids_are_counted_and_ignored(annotation_dir, tmp_path, capsys):
    queries, columns, sims, expected_dsvr = fivr5k_case(annotation_dir)
    sims = np.hstack([sims, [[5.0], [5.0]]])
    evaluation.save_similarities(str(tmp_path / "s.npz"), queries + [], columns + ["not_a_video"], sims)
    status, out, _ = run(["--dataset", "FIVR-5K", "--annotation_dir", annotation_dir,
                          "--similarities", tmp_path / "s.npz", "--json_out", tmp_path / "m.json"], capsys)
    assert status == 0 and "1 database ids are not in the FIVR-5K database" in out
    assert json.loads((tmp_path / "m.json").read_text())["DSVR"] == pytest.approx(expected_dsvr)


# --------------------------------------------------------------------------
# model mode on a mini benchmark in FIVR format (what the demo builds)
def test_baseline_cosine_is_mean_of_frames(mini, capsys, tmp_path):
    s, metrics, out = evaluate_mini(mini, capsys, tmp_path, "--baseline")
    mean = lambda v: l2_normalize(mini.videos[v].astype(np.float64).mean(0))
    expected = [[mean(q) @ mean(v) for v in mini.database] for q in ("q1", "q2")]
    np.testing.assert_allclose(s, expected, atol=1e-5)
    assert s[0, 0] == pytest.approx(1) and s[1, 1] == pytest.approx(1)  # copy, reversed copy
    assert metrics["DSVR"] == pytest.approx(1.0)
    assert "s/query" in out and "KB/video" in out


def test_baseline_chamfer_is_chamfer_of_frames(mini, capsys, tmp_path):
    s, metrics, _ = evaluate_mini(mini, capsys, tmp_path, "--baseline", "--metric", "chamfer")
    frames = lambda v: l2_normalize(mini.videos[v].astype(np.float64))
    expected = [[(frames(q) @ frames(v).T).max(1).mean() for v in mini.database] for q in ("q1", "q2")]
    np.testing.assert_allclose(s, expected, atol=1e-5)
    assert metrics["DSVR"] == pytest.approx(1.0)


def test_tca_cosine_chunks_and_batches(mini, capsys, tmp_path, tca_checkpoint):
    path, model = tca_checkpoint
    # padding_size 10: q1/a (23 frames) -> chunks of 8, 8, 7 frames; n1 (31) -> 8, 8, 8, 7; q2/b (9) whole
    s, _, _ = evaluate_mini(mini, capsys, tmp_path, "--model_path", path, "--padding_size", 10)

    def embed(v):
        x = torch.from_numpy(mini.videos[v])
        chunks = np.array_split(np.arange(len(x)), -(-len(x) // 10)) if len(x) > 10 else [np.arange(len(x))]
        with torch.no_grad():
            parts = [model(x[c].T.unsqueeze(0), torch.tensor([len(c)]))[0] * len(c) for c in chunks]
        return l2_normalize(torch.stack(parts).sum(0))

    expected = [[float(embed(q) @ embed(v)) for v in mini.database] for q in ("q1", "q2")]
    np.testing.assert_allclose(s, expected, atol=1e-5)
    # one video per forward pass gives the same numbers: padding never leaks into the output
    s_small, _, _ = evaluate_mini(mini, capsys, tmp_path, "--model_path", path, "--padding_size", 10,
                                  "--frames_per_batch", 1)
    np.testing.assert_allclose(s_small, s, atol=1e-5)


def test_tca_chamfer_whole_videos(mini, capsys, tmp_path, tca_checkpoint):
    path, model = tca_checkpoint
    s, _, _ = evaluate_mini(mini, capsys, tmp_path, "--model_path", path, "--padding_size", 0,
                            "--metric", "chamfer")
    with torch.no_grad():
        frames = {v: model.encode(torch.from_numpy(x).T.unsqueeze(0), torch.tensor([len(x)]))[0]
                  for v, x in mini.videos.items()}
    for i, q in enumerate(("q1", "q2")):
        for j, v in enumerate(mini.database):
            expected = chamfer_similarity(frames[q][None], None, frames[v][None], None)
            assert s[i, j] == pytest.approx(float(expected), abs=1e-5)


def test_a_flag_contradicting_the_checkpoint_names_both_values(mini, capsys, tca_checkpoint):
    path, _ = tca_checkpoint
    status, _, err = run(["--dataset", "FIVR-5K", "--annotation_dir", mini.root,
                          "--feature_path", mini.root / "features.hdf5", "--model_path", path,
                          "--num_layers", 2, "--device", "cpu"], capsys)
    assert status == 2 and err.count("\n") == 1
    assert err == f"error: {path}: the checkpoint was trained with --num_layers 1, not 2\n"


def test_a_non_default_architecture_needs_no_flag(mini, capsys, tmp_path):
    """A self-describing checkpoint of 2 layers and 8 input channels, with no
    args.json beside it, evaluates with no architecture flag."""
    model_args = {"aggregator": "tca", "feature_size": 8, "num_layers": 2, "num_clusters": 4, "output_dim": 8,
                  "normalize_input": False, "dropout": 0.2}
    torch.manual_seed(1)
    model = build_model(**model_args).eval()
    torch.save({"model": model.state_dict(), "model_args": model_args}, tmp_path / "model.pth")
    with h5py.File(tmp_path / "f8.hdf5", "w") as f:
        for v, x in mini.videos.items():
            f[v] = x[:, :8]
    status, out, err = run(["--dataset", "FIVR-5K", "--annotation_dir", mini.root, "--feature_path",
                            tmp_path / "f8.hdf5", "--model_path", tmp_path / "model.pth", "--padding_size", 0,
                            "--save_similarities", tmp_path / "s.npz"], capsys)
    assert status == 0, err
    with torch.no_grad():
        embed = {v: model([torch.from_numpy(x[:, :8])])[0] for v, x in mini.videos.items()}
    _, _, s = evaluation.load_similarities(str(tmp_path / "s.npz"))
    expected = [[float(embed[q] @ embed[v]) for v in mini.database] for q in ("q1", "q2")]
    np.testing.assert_allclose(s, expected, atol=1e-5)


def test_bare_state_dict_uses_args_json_then_flags(mini, capsys, tmp_path):
    """Upstream's (and this project's earlier) bare state dict loads strictly
    with the architecture of the args.json beside it; flags override it."""
    torch.manual_seed(2)
    model = build_model("tca", feature_size=C, num_layers=2).eval()
    torch.save(model.state_dict(), tmp_path / "model.pth")
    (tmp_path / "args.json").write_text(json.dumps({"aggregator": "tca", "pca_components": C, "num_layers": 2}))
    common = ["--dataset", "FIVR-5K", "--annotation_dir", mini.root, "--feature_path", mini.root / "features.hdf5",
              "--model_path", tmp_path / "model.pth", "--padding_size", 0]
    status, _, err = run(common + ["--save_similarities", tmp_path / "s.npz"], capsys)
    assert status == 0, err
    with torch.no_grad():
        embed = {v: model([torch.from_numpy(x)])[0] for v, x in mini.videos.items()}
    _, _, s = evaluation.load_similarities(str(tmp_path / "s.npz"))
    np.testing.assert_allclose(s[0, 0], float(embed["q1"] @ embed["a"]), atol=1e-5)
    status, _, err = run(common + ["--num_layers", 1], capsys)
    assert status == 2 and err.count("\n") == 1 and "does not fit a tca model" in err


def test_evaluation_does_not_import_train():
    code = "import evaluation, sys; assert 'train' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_metric_all_equals_three_single_metric_runs(mini, capsys, tmp_path, tca_checkpoint):
    path, _ = tca_checkpoint
    common = ["--dataset", "FIVR-5K", "--annotation_dir", mini.root, "--feature_path", mini.root / "features.hdf5",
              "--model_path", path, "--padding_size", 10]
    status, out, err = run(common + ["--metric", "all", "--save_similarities", tmp_path / "all.npz",
                                     "--json_out", tmp_path / "all.json"], capsys)
    assert status == 0, err
    table = out[out.index("====="):].splitlines()
    assert table[1].split()[:2] == ["metric", "DSVR"]
    assert [line.split()[0] for line in table[2:5]] == ["cosine", "chamfer", "symmetric_chamfer"]
    together = json.loads((tmp_path / "all.json").read_text())
    for metric in ("cosine", "chamfer", "symmetric_chamfer"):
        status, _, err = run(common + ["--metric", metric, "--save_similarities", tmp_path / "one.npz",
                                       "--json_out", tmp_path / "one.json"], capsys)
        assert status == 0, err
        _, _, alone = evaluation.load_similarities(str(tmp_path / "one.npz"))
        _, _, combined = evaluation.load_similarities(str(tmp_path / f"all.{metric}.npz"))
        np.testing.assert_allclose(combined, alone, atol=1e-6)  # one model pass for both: same to rounding
        assert together[metric] == pytest.approx(json.loads((tmp_path / "one.json").read_text()), abs=1e-6)


def test_unknown_metric_is_one_line(mini, capsys, tca_checkpoint):
    path, _ = tca_checkpoint
    status, _, err = run(["--dataset", "FIVR-5K", "--annotation_dir", mini.root, "--feature_path",
                          mini.root / "features.hdf5", "--model_path", path, "--metric", "cosine,l2"], capsys)
    assert status == 2 and err.count("\n") == 1 and "--metric cosine,l2" in err


def test_features_of_the_wrong_size_are_one_line(tmp_path, mini, capsys, tca_checkpoint):
    path, _ = tca_checkpoint
    with h5py.File(tmp_path / "f.hdf5", "w") as f:
        for v in ("q1", "q2", "a"):
            f[v] = np.zeros((3, C // 2), np.float32)
    status, _, err = run(["--dataset", "FIVR-5K", "--annotation_dir", mini.root, "--feature_path",
                          tmp_path / "f.hdf5", "--model_path", path, "--device", "cpu"], capsys)
    assert status == 2 and err.count("\n") == 1 and f"expected (frames, {C})" in err


def test_a_non_finite_feature_is_refused_naming_video_and_frame(mini, capsys, tmp_path):
    with h5py.File(tmp_path / "f.hdf5", "w") as f:
        for v, x in mini.videos.items():
            f[v] = x
        del f["n3"]
        bad = mini.videos["n3"].copy()
        bad[4, 2] = np.nan
        f["n3"] = bad
    status, _, err = run(["--dataset", "FIVR-5K", "--annotation_dir", mini.root, "--feature_path",
                          tmp_path / "f.hdf5", "--baseline", "--device", "cpu"], capsys)
    assert status == 2 and err.count("error:") == 1
    assert err.endswith(f"error: {tmp_path / 'f.hdf5'}: video n3: non-finite feature value at frame 4\n")


def test_two_horovod_ranks_equal_one_process(mini, capsys, tmp_path, tca_checkpoint):
    """Each rank encodes and scores its share of the database; rank 0 gathers,
    evaluates and writes every output once: the numbers of one process."""
    path, _ = tca_checkpoint
    common = ["--dataset", "FIVR-5K", "--annotation_dir", str(mini.root), "--feature_path",
              str(mini.root / "features.hdf5"), "--model_path", str(path), "--padding_size", "10", "--metric", "all"]
    status, single_out, err = run(common + ["--save_similarities", tmp_path / "one.npz"], capsys)
    assert status == 0, err
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    for baseline in (False, True):
        args = common if not baseline else [a for a in common if a not in ("--model_path", str(path))] + ["--baseline"]
        if baseline:
            status, single_out, err = run(args + ["--save_similarities", tmp_path / "one.npz"], capsys)
            assert status == 0, err
        proc = subprocess.run([horovodrun, "--gloo", "-np", "2", "-H", "localhost:2", sys.executable,
                               os.path.join(ROOT, "evaluation.py"), *args, "--save_similarities",
                               str(tmp_path / "two.npz"), "--json_out", str(tmp_path / "two.json")],
                              env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        # horovodrun prefixes each line with its rank: "[0]<stdout>:"
        stdout = re.sub(r"^\[\d+\]<stdout>:", "", proc.stdout, flags=re.M)
        assert stdout.count("=====") == 2  # one table, printed by rank 0 only
        for metric in ("cosine", "chamfer", "symmetric_chamfer"):
            q1, d1, one = evaluation.load_similarities(str(tmp_path / f"one.{metric}.npz"))
            q2, d2, two = evaluation.load_similarities(str(tmp_path / f"two.{metric}.npz"))
            assert (q1, d1) == (q2, d2)
            np.testing.assert_allclose(two, one, atol=1e-6)
            table = [line for line in stdout.splitlines() if line.split()[:1] == [metric]]
            assert table == [line for line in single_out.splitlines() if line.split()[:1] == [metric]]


def test_outputs_are_checked_before_the_work_and_a_full_disk_loses_nothing_else(mini, capsys, tmp_path, small_tmpfs):
    common = ["--dataset", "FIVR-5K", "--annotation_dir", mini.root, "--feature_path", mini.root / "features.hdf5",
              "--baseline", "--metric", "chamfer"]
    # a directory where the file goes: refused before any video is read
    (tmp_path / "dir.npz").mkdir()
    status, out, err = run(common + ["--save_similarities", tmp_path / "dir.npz"], capsys)
    assert status == 2 and err.strip().splitlines() == [f"error: {tmp_path / 'dir.npz'}: is a directory"]
    assert "=====" not in out
    # a full disk: the table is printed, the similarities fail in one line, the metrics are still written
    small_tmpfs.fill()
    status, out, err = run(common + ["--save_similarities", small_tmpfs / "s.json", "--json_out",
                                     tmp_path / "m.json"], capsys)
    assert status == 2 and "===== FIVR-5K =====" in out
    assert err.strip().splitlines()[-1] == f"error: {small_tmpfs / 's.json'}: No space left on device"
    assert json.loads((tmp_path / "m.json").read_text())["DSVR"] == pytest.approx(1.0)
    assert os.listdir(small_tmpfs) == ["filler"]  # no partial file, no temporary
    # a read-only folder: refused before the work
    small_tmpfs.remount_ro()
    status, out, err = run(common + ["--json_out", small_tmpfs / "m.json"], capsys)
    assert status == 2 and "=====" not in out
    assert err.strip().splitlines()[-1].startswith(f"error: {small_tmpfs / 'm.json'}: cannot write in {small_tmpfs}")


# --------------------------------------------------------------------------
# µAP, hard, --protocol, --pr_curve, --plot, --per_query (issue 14)

def test_protocol_curves_and_per_query_outputs(tmp_path, capsys, annotation_dir):
    import pandas as pd
    from PIL import Image
    queries, columns, sims, expected_dsvr = fivr5k_case(annotation_dir)
    evaluation.save_similarities(str(tmp_path / "s.npz"), queries, columns, sims)
    common = ["--dataset", "FIVR-5K", "--annotation_dir", annotation_dir, "--similarities", tmp_path / "s.npz"]
    status, out, err = run(common + ["--protocol", "full", "--json_out", tmp_path / "m.json", "--pr_curve",
                                     tmp_path / "pr.csv", "--plot", tmp_path / "pr.png", "--per_query",
                                     tmp_path / "q.csv", "--results_csv", tmp_path / "runs.csv"], capsys)
    assert status == 0, err
    assert "===== FIVR-5K ===== protocol: full" in out
    assert "DSVD" in out and "ISVR_hard" in out
    full = json.loads((tmp_path / "m.json").read_text())
    tasks = ["DSVR", "CSVR", "ISVR", "DSVD", "CSVD", "ISVD"]
    assert set(full) == set(tasks + [f"{t}_hard" for t in tasks])
    assert full["DSVR"] < expected_dsvr  # the relevant videos without results are misses now
    per_query = pd.read_csv(tmp_path / "q.csv")
    assert set(per_query["query"]) == set(queries) and set(per_query["task"]) == {"DSVR", "CSVR", "ISVR",
                                                                                   "DSVR_hard", "CSVR_hard",
                                                                                   "ISVR_hard"}
    dsvr = per_query[per_query.task == "DSVR"]
    assert dsvr["AP"].mean() == pytest.approx(full["DSVR"])
    assert dsvr["first_relevant_rank"].tolist() == [1, 2]  # the case's hand-worked ranking
    curves = pd.read_csv(tmp_path / "pr.csv")
    assert list(curves.columns) == ["metric", "task", "recall", "precision"] and len(curves) == 6 * 21
    with Image.open(tmp_path / "pr.png") as image:
        assert image.format == "PNG"
        image.load()
    assert {"DSVD", "ISVR_hard"} <= set(pd.read_csv(tmp_path / "runs.csv").columns)


def test_new_bad_inputs_are_one_line(tmp_path, capsys, annotation_dir):
    queries, columns, sims, _ = fivr5k_case(annotation_dir)
    evaluation.save_similarities(str(tmp_path / "s.npz"), queries, columns, sims)
    bad = tmp_path / "bad"
    bad.mkdir()
    os.symlink(os.path.join(annotation_dir, "fivr.pickle"), bad / "fivr.pickle")
    (bad / "fivr_easy_duplicates.txt").write_text("abcdefghijk\nnot an id\n")
    cases = [
        (["--dataset", "FIVR-5K", "--annotation_dir", bad], "fivr_easy_duplicates.txt, line 2"),
        (["--dataset", "EVVE", "--annotation_dir", annotation_dir, "--protocol", "full"], "--protocol full: EVVE"),
        (["--dataset", "FIVR-5K", "--annotation_dir", annotation_dir, "--protocol", "official"], "--protocol official"),
        (["--dataset", "FIVR-5K", "--annotation_dir", annotation_dir, "--plot", "/proc/curves.png"],
         "/proc/curves.png: cannot write"),
    ]
    for argv, message in cases:
        status, out, err = run(argv + ["--similarities", tmp_path / "s.npz"], capsys)
        assert status == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, (argv, err)
        assert "=====" not in out


def test_similarity_path_imports_no_torch(tmp_path, annotation_dir):
    queries, columns, sims, _ = fivr5k_case(annotation_dir)
    evaluation.save_similarities(str(tmp_path / "s.npz"), queries, columns, sims)
    result = subprocess.run([sys.executable, "-X", "importtime", "evaluation.py", "--dataset", "FIVR-5K",
                             "--annotation_dir", annotation_dir, "--similarities", tmp_path / "s.npz"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "import time:" in line]
    assert "numpy" in imported and not [m for m in imported if m.split(".")[0] == "torch"]


def test_evaluate_model_is_what_evaluation_py_computes(mini, capsys, tmp_path, tca_checkpoint):
    """train.py's validation calls retrieval.evaluate_model: the metrics of
    evaluation.py's --json_out, to the bit, and the model's train mode is kept."""
    from data import load_benchmark
    import retrieval
    path, model = tca_checkpoint
    status, _, err = run(["--dataset", "FIVR-5K", "--annotation_dir", mini.root, "--feature_path",
                          mini.root / "features.hdf5", "--model_path", path, "--padding_size", 10,
                          "--metric", "cosine,chamfer", "--json_out", tmp_path / "m.json"], capsys)
    assert status == 0, err
    metrics = json.loads((tmp_path / "m.json").read_text())
    benchmark = load_benchmark("FIVR-5K", str(mini.root))
    model.train()
    try:
        results = retrieval.evaluate_model(model, benchmark, str(mini.root / "features.hdf5"),
                                           ["cosine", "chamfer"], padding_size=10, log=lambda *a: None)
        assert model.training
    finally:
        model.eval()
    assert json.loads(json.dumps(results)) == metrics
