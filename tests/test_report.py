"""report.py: the paper's rows beside the measured ones, per-query rows, the
precision-recall CSV and plot, on the real FIVR annotation."""
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import report
from data import CC_WEB_VIDEO, FIVR, Evaluation


@pytest.fixture(scope="module")
def fivr200k(annotation_dir):
    return FIVR("200k", annotation_dir)


def test_paper_rows_under_a_complete_tca_run(fivr200k):
    measured = {"DSVR": 0.880, "CSVR": 0.820, "ISVR": 0.700}
    complete = Evaluation(measured, fivr200k.queries, len(fivr200k.database), {})
    lines = report.results_table(fivr200k, {"chamfer": complete}, {"chamfer": "TCA_f"}).splitlines()
    assert lines[0].split() == ["metric", "DSVR", "CSVR", "ISVR"]
    assert lines[1].split()[0] == "chamfer"
    assert lines[2].split() == ["TCA_f", "(paper)", "0.8770", "0.8300", "0.7030"]
    assert lines[3].split() == ["chamfer", "-", "paper", "0.0030", "-0.0100", "-0.0030"]
    # a run that left out a query (or a benchmark that is not the real one) gets no paper row
    partial = complete._replace(queries=fivr200k.queries[:99])
    assert "paper" not in report.results_table(fivr200k, {"chamfer": partial}, {"chamfer": "TCA_f"})
    assert report.paper_row(fivr200k, "TCA_netvlad", complete) is None


def test_per_query_rows_curves_and_files(annotation_dir, tmp_path):
    b = FIVR("5k", annotation_dir)
    q = b.queries[0]
    near = sorted({v for label in ("ND", "DS") for v in b.annotation[q].get(label, ())} & set(b.database))
    negatives = sorted(set(b.database) - {v for vs in b.annotation[q].values() for v in vs})[:2]
    columns = [negatives[0], near[0], negatives[1], near[1]]
    evaluation = b.evaluate_with_details([q], columns, np.array([[0.9, 0.8, 0.7, 0.6]]), log=lambda _: None)
    rows = {row["task"]: row for row in report.per_query_rows(evaluation)}
    # DSVR: hits at ranks 2 and 4 of 2 relevant videos with results
    assert rows["DSVR"] == {"query": q, "task": "DSVR", "AP": pytest.approx((1 / 2 + 2 / 4) / 2),
                            "num_relevant": 2, "first_relevant_rank": 2.0}
    curve = report.precision_recall_curves(evaluation)["DSVR"]
    # precision 1/2 at recall 1/2, 2/4 at recall 1; 1 at recall 0
    np.testing.assert_allclose(curve, [1.0] + [0.5] * 20)

    evaluations = {"precomputed": evaluation}
    report.write_per_query(tmp_path / "q.csv", evaluations)
    report.write_pr_curves(tmp_path / "pr.csv", evaluations)
    report.plot_pr_curves(tmp_path / "pr.png", evaluations, "FIVR-5K")
    table = pd.read_csv(tmp_path / "q.csv")
    assert list(table.columns) == ["metric", "query", "task", "AP", "num_relevant", "first_relevant_rank"]
    assert set(table["task"]) == set(evaluation.tasks)
    curves = pd.read_csv(tmp_path / "pr.csv")
    assert len(curves) == 21 * len(evaluation.tasks)
    np.testing.assert_allclose(curves[curves.task == "DSVR"]["precision"], curve)
    with Image.open(tmp_path / "pr.png") as image:
        assert image.format == "PNG" and image.size[0] > 100
        image.load()  # decodes


@pytest.mark.parametrize("annotation_file", ["cc_web_video.pickle", "cc_web_video_tca.pickle"])
def test_cc_web_video_paper_rows_under_a_complete_tca_run_for_both_annotation_files(annotation_dir, tmp_path,
                                                                                     annotation_file):
    # a folder holding only one of the two files: CC_WEB_VIDEO reads whichever is there
    os.symlink(os.path.join(annotation_dir, annotation_file), tmp_path / annotation_file)
    benchmark = CC_WEB_VIDEO(str(tmp_path))
    measured = {"cc_web": 0.970, "cc_web_star": 0.950, "cc_web_c": 0.980, "cc_web_star_c": 0.960}
    complete = Evaluation(measured, benchmark.queries, len(benchmark.database), {})
    lines = report.results_table(benchmark, {"cosine": complete}, {"cosine": "TCA_c"}).splitlines()
    assert lines[0].split() == ["metric", "cc_web", "cc_web*", "cc_web_c", "cc_web*_c"]
    assert lines[2].split() == ["TCA_c", "(paper)", "0.9730", "0.9470", "0.9830", "0.9650"]
    assert lines[3].split() == ["cosine", "-", "paper", "-0.0030", "0.0030", "-0.0030", "-0.0050"]
    for metric, name, row in (("symmetric_chamfer", "TCA_sym", ["0.9820", "0.9620", "0.9920", "0.9810"]),
                              ("chamfer", "TCA_f", ["0.9830", "0.9690", "0.9940", "0.9900"])):
        lines = report.results_table(benchmark, {metric: complete}, {metric: name}).splitlines()
        assert lines[2].split() == [name, "(paper)", *row]
    # a run that left out database videos gets none
    partial = complete._replace(num_database=len(benchmark.database) - 1)
    assert "paper" not in report.results_table(benchmark, {"cosine": partial}, {"cosine": "TCA_c"})


def test_evve_has_no_paper_row():
    assert "EVVE" not in report.PAPER
