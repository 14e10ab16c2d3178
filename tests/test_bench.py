"""bench/: the timing and target helpers on hand-computed cases, and a
`--quick` run of every section whose report `--render_only` reproduces."""
import json
import os
import subprocess
import sys

from bench.common import Target, check_targets, interleaved, summary, tca_flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_summary_is_median_min_max():
    assert summary([3, 1, 2, 10], "s") == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4, "unit": "s"}


def test_interleaved_runs_every_contender_once_per_round():
    calls = []
    seconds = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2, warmup=1)
    assert calls == ["a", "b", "a", "b", "a", "b"]  # the warm-up, then two rounds
    assert [len(s) for s in seconds.values()] == [2, 2]


def test_tca_flops_hand_computed():
    # one video of 2 frames, C=4, feed-forward 8: 2 * (8*16 + 4*4*8) + 4 * 2**2 * 4
    assert tca_flops([2], channels=4, feedforward=8) == 576.0


def test_check_targets_rows():
    results = {"config": {"database": 20000},
               "speedup": summary([1.2, 1.5, 1.8], "x"),
               "fraction": summary([0.6]),
               "seconds": summary([2.5], "s")}
    targets = (Target("speed-up", ("speedup",), 1.5, "≥ 1.5×"),
               Target("of peak", ("fraction",), 0.8, "≥ 80%"),
               Target("retrieval ({config[database]:,})", ("seconds",), 2.0, "< 2 s", higher_is_better=False),
               Target("a mode this run left out", ("bf16", "fraction"), 0.8, "≥ 80%"))
    assert check_targets(targets, results) == [
        {"figure": "speed-up", "measured": "1.5 [1.2–1.8] x", "target": "≥ 1.5×", "met": True, "shortfall": ""},
        {"figure": "of peak", "measured": "60% [60–60%]", "target": "≥ 80%", "met": False,
         "shortfall": "short by 25% (0.6 vs 0.8)"},
        {"figure": "retrieval (20,000)", "measured": "2.5 [2.5–2.5] s", "target": "< 2 s", "met": False,
         "shortfall": "over by 25% (2.5 vs 2)"},
    ]


def test_unknown_section_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "run_bench.py"), "--sections", "tca,nope",
                           "--out", str(tmp_path / "B.md"), "--json", str(tmp_path / "b.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: unknown section(s) nope" in proc.stderr
    assert not (tmp_path / "b.json").exists()


def test_quick_run_reports_every_section(tmp_path, annotation_dir):
    out, results = tmp_path / "BENCHMARKS.md", tmp_path / "results.json"
    bench = [sys.executable, os.path.join(REPO, "bench", "run_bench.py"), "--json", str(results)]
    proc = subprocess.run(bench + ["--quick", "--out", str(out), "--annotation_dir", annotation_dir],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(results.read_text())

    for section in ("peak", "tca", "chamfer", "retrieval", "index", "rerank", "shortlist", "query", "map", "train",
                    "extraction", "scaling"):
        assert section in data and "error" not in data[section], (section, data.get(section))
    assert data["meta"]["quick"] is True
    # the project's results agree with the naive baselines they are timed against
    assert data["tca"]["max_abs_diff_vs_upstream"] < 1e-4
    assert data["chamfer"]["chamfer"]["max_abs_diff_vs_loop"] < 1e-4
    assert data["chamfer"]["symmetric_chamfer"]["max_abs_diff_vs_loop"] < 1e-4
    assert data["map"]["max_abs_diff_vs_visil"] < 1e-9
    # exact search finds the copies planted closest to their query (quick sizes: 64-d, so not the faint ones)
    assert data["index"]["clustered"]["Flat"]["exact"]["found_by_band"]["0.95"] == 1.0
    # the exact search split over 2 processes finds what one process finds
    assert data["index"]["clustered"]["Flat"]["sharded"]["same_shortlists"] == 1.0
    assert set(data["query"]["seconds"]) >= {"decode", "CNN", "PCA", "TCA", "stage 1", "extract (lanes)"}
    assert data["query"]["frames"] == data["query"]["video_seconds"]  # 1 fps
    assert data["rerank"]["shortlists"]["40"]["frame_pairs"] > data["rerank"]["shortlists"]["10"]["frame_pairs"]
    assert set(data["map"]["mAP"]) == {"DSVR", "CSVR", "ISVR"}
    assert data["train"]["workers_2"]["steps_timed"] == 1  # 2 steps, the first dropped as warm-up
    assert data["extraction"]["config"]["modes"] == ["fp32"]
    assert data["extraction"]["fp32"]["max_abs_diff_overlap_vs_lanes"] < 1e-5  # same features either way
    assert data["extraction"]["fp32"]["mean_cosine_to_fp32"] > 0.9999

    assert data["scaling"]["bytes_per_frame_float16"] < 0.6 * data["scaling"]["bytes_per_frame_float32"]
    assert data["scaling"]["max_abs_map_difference_float16"] < 1e-3
    assert data["scaling"]["extraction"]["frames"] > 0
    # one row per target of the sections run: tca 2, chamfer 2, retrieval 1, map 1, extraction's one mode 1
    # and its long video 1, scaling 5; and the shortlist section's 1 where make demo's outputs are there
    figures = [row["figure"] for row in data["targets"]]
    assert len(figures) == 13 + ("skipped" not in data["shortlist"])
    assert "FIVR-200K-scale TCA_c retrieval (10 × 20,000, top-100)" in figures
    report = out.read_text()
    assert "QUICK smoke run" in report
    for row in data["targets"]:
        assert f"| {row['figure']} | {row['measured']} | {row['target']} |" in report

    # --render_only rewrites the same report from the JSON alone
    again = tmp_path / "again.md"
    proc = subprocess.run(bench + ["--render_only", "--out", str(again)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert again.read_text() == report


def test_gpu_check_without_a_gpu_is_one_line():
    """`make gpu-check` where CUDA is absent (hidden here): one line, no
    traceback, exit 0 (-o: do not re-run the installer from the test)."""
    # as typed at a shell: under `make test` the inherited MAKELEVEL makes the inner make announce its directory
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run(["make", "-o", ".venv/.installed", "gpu-check", f"PY={sys.executable}"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 0 and len(lines) == 1, lines
    assert lines[0].startswith("gpu-check: no GPU is present")
