"""bench/run_bench.py --quick runs every section and writes a report and a
JSON file with every figure the full `make bench` reports."""
import json
import os
import subprocess
import sys

from conftest import ANNOTATION_DIR as ANNOTATIONS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_run_reports_every_section(tmp_path):
    out, results = tmp_path / "BENCHMARKS.md", tmp_path / "results.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "run_bench.py"), "--quick",
                           "--out", str(out), "--json", str(results), "--annotation_dir", ANNOTATIONS],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(results.read_text())

    for section in ("peak", "tca", "chamfer", "retrieval", "map", "train", "extraction"):
        assert section in data and "error" not in data[section], (section, data.get(section))
    assert data["peak"]["gflops"]["median"] > 0
    for key in ("median", "min", "max", "n"):
        assert key in data["tca"]["speedup"]
    assert data["tca"]["speedup"]["min"] <= data["tca"]["speedup"]["median"] <= data["tca"]["speedup"]["max"]
    # the project's results agree with the naive baselines they are timed against
    assert data["tca"]["max_abs_diff_vs_upstream"] < 1e-4
    assert data["chamfer"]["chamfer"]["max_abs_diff_vs_loop"] < 1e-4
    assert data["chamfer"]["symmetric_chamfer"]["max_abs_diff_vs_loop"] < 1e-4
    assert data["map"]["max_abs_diff_vs_visil"] < 1e-9
    assert set(data["map"]["mAP"]) == {"DSVR", "CSVR", "ISVR"}
    assert data["train"]["workers_2"]["pairs_per_s"]["median"] > 0
    for mode in data["extraction"]["config"]["modes"]:
        assert data["extraction"][mode]["pipeline_frames_per_s"]["median"] > 0
        assert data["extraction"][mode]["pipeline_overlap_frames_per_s"]["median"] > 0
        assert data["extraction"][mode]["resnet50_forward_yardstick_frames_per_s"]["median"] > 0
        assert data["extraction"][mode]["max_abs_diff_overlap_vs_lanes"] < 1e-5  # same features either way
    assert data["extraction"]["fp32"]["mean_cosine_to_fp32"] > 0.9999

    report = out.read_text()
    assert "## Targets" in report and "## Conditions" in report
    assert len(data["targets"]) >= 6 and all("met" in row for row in data["targets"])
