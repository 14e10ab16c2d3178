"""Benchmarks of data.py on the real annotation files, with hand-built
similarities whose mAP is worked out here."""
import os
import pickle
import shutil

import numpy as np
import pytest

import data
from data import CC_WEB_VIDEO, EVVE, FIVR, VCDB, load_benchmark
from metrics import average_precision
from utils import UserError



class Log(list):
    def __call__(self, line):
        self.append(line)


# --------------------------------------------------------------------------
# average_precision

def test_average_precision_hand_worked():
    sims = np.array([[0.9, 0.8, 0.7, 0.6]])
    relevant = np.array([[True, False, True, False]])
    # hits at ranks 1 and 3: (1/1 + 2/3) / 2
    assert average_precision(sims, relevant, np.ones(4, bool))[0] == pytest.approx((1 + 2 / 3) / 2)
    # EVVE trapezoids, hits at 0-based ranks 0 and 2 of 2 positives:
    # (1 + 1)/2 * 1/2 + (1/2 + 2/3)/2 * 1/2
    assert average_precision(sims, relevant, np.ones(4, bool), trapezoid=True)[0] == \
        pytest.approx(0.5 + (0.5 + 2 / 3) / 4)
    # K relevance sets on one ranking (FIVR's tasks) give (K, Q)
    stacked = average_precision(sims, np.stack([relevant, ~relevant]), np.ones(4, bool))
    np.testing.assert_allclose(stacked, [[(1 + 2 / 3) / 2], [(1 / 2 + 2 / 4) / 2]])


def test_average_precision_unranked_relevant_counts_as_miss_and_nan_is_not_ranked():
    sims = np.array([[0.9, np.nan, 0.7, 0.6]])
    relevant = np.array([[False, True, True, True]])
    ranked = np.array([True, True, True, False])
    # ranking: col0, col2 (col1 NaN, col3 not ranked); one hit at rank 2 of 3 relevant
    assert average_precision(sims, relevant, ranked)[0] == pytest.approx((1 / 2) / 3)
    # explicit denominator (CC_WEB counts positives without results)
    assert average_precision(sims, relevant, ranked, num_relevant=[10])[0] == pytest.approx((1 / 2) / 10)
    # no relevant video: NaN, to be reported and skipped
    assert np.isnan(average_precision(sims, np.zeros((1, 4), bool), ranked)[0])


def _stable_sort_ap(scores, relevant):
    """Reference: upstream's loop over Python's stable sorted(reverse=True)."""
    order = sorted(range(len(scores)), key=lambda j: scores[j], reverse=True)
    hits, total = 0, 0.0
    for r, j in enumerate(order, 1):
        if relevant[j]:
            hits += 1
            total += hits / r
    return total / max(sum(relevant), 1)


@pytest.mark.parametrize("levels", [3, 40, 10**6])  # many ties (stable-sort path), some ties, almost none
def test_average_precision_ties_follow_column_order_like_upstream(levels):
    rng = np.random.default_rng(levels)
    sims = rng.integers(0, levels, size=(5, 3000)) / levels
    relevant = rng.random((5, 3000)) < 0.05
    ap = average_precision(sims, relevant, np.ones(3000, bool))
    expected = [_stable_sort_ap(list(s), list(r)) for s, r in zip(sims, relevant)]
    np.testing.assert_allclose(ap, expected, rtol=1e-12)


# --------------------------------------------------------------------------
# FIVR

@pytest.fixture(scope="module")
def fivr5k(annotation_dir):
    return FIVR("5k", annotation_dir)


def test_fivr_self_annotated_query_missing_videos_and_unknown_ids(fivr5k):
    b = fivr5k
    q = "eCrhXArKE24"  # a FIVR-5K query, in the 5K database, annotated IS to itself
    gt = b.annotation[q]
    db = set(b.database)
    nd1 = sorted(set(gt["ND"]) & db)[0]
    ds1 = sorted(set(gt["DS"]) & db)[0]
    is1 = sorted(set(gt["IS"]) & db - {q})[0]
    annotated = {v for vs in gt.values() for v in vs}
    neg1, neg2 = sorted(db - annotated)[:2]
    other_query = "8ja0i5wV-io"  # another 5K query: no relevant video among these columns
    columns = [q, neg1, nd1, is1, neg2, ds1, "not_a_fivr_video"]
    sims = np.array([[1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 2.0],
                     [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
                     [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    log = Log()
    m = b.evaluate([q, other_query, "unknown_query"], columns, sims, log=log)
    # ranking of q, itself skipped and the unknown id ignored: neg1, nd1, is1, neg2, ds1
    # DSVR/CSVR {nd1, ds1} (the other relevant videos have no results): (1/2 + 2/5) / 2
    assert m["DSVR"] == pytest.approx((1 / 2 + 2 / 5) / 2)
    assert m["CSVR"] == pytest.approx((1 / 2 + 2 / 5) / 2)  # q has no CS video
    # ISVR {nd1, is1, ds1, q itself}: upstream keeps q in its relevant set
    assert m["ISVR"] == pytest.approx((1 / 2 + 2 / 3 + 3 / 5) / 4)
    text = "\n".join(log)
    assert "48 queries are missing" in text
    assert "1 query ids are not FIVR-5K queries" in text
    assert "1 database ids are not in the FIVR-5K database" in text
    assert "DSVR: 1 queries have no relevant video" in text and other_query in text


def test_fivr_200k_sizes_and_full_ranking(annotation_dir):
    b = FIVR("200k", annotation_dir)
    assert (len(b.queries), len(b.database)) == (100, 225960)
    # perfect similarities on a 2-query slice, ND/DS > CS > IS > the rest: AP 1 on every task
    qs = b.queries[:2]
    columns = sorted({v for q in qs for vs in b.annotation[q].values() for v in vs} & set(b.database))[:300]
    columns = list(dict.fromkeys(columns + b.database[:200]))
    level = {"ND": 3.0, "DS": 3.0, "CS": 2.0, "IS": 1.0}
    sims = np.array([[max([level[l] for l in level if c in b.annotation[q].get(l, ())] + [0.0]) for c in columns]
                     for q in qs])
    m = b.evaluate(qs, columns, sims, log=Log())
    tasks = ["DSVR", "CSVR", "ISVR", "DSVD", "CSVD", "ISVD"]
    assert m == {k: pytest.approx(1.0) for k in tasks + [f"{t}_hard" for t in tasks]}


def test_no_query_in_results_is_an_error(fivr5k):
    with pytest.raises(UserError, match="none of the FIVR-5K queries"):
        fivr5k.evaluate(["x"], ["y"], np.zeros((1, 1)), log=Log())
    with pytest.raises(UserError, match="do not match"):
        fivr5k.evaluate(["x"], ["y", "z"], np.zeros((1, 1)), log=Log())
    with pytest.raises(UserError, match="twice"):
        fivr5k.evaluate([fivr5k.queries[0]], ["y", "y"], np.zeros((1, 2)), log=Log())


# --------------------------------------------------------------------------
# CC_WEB_VIDEO

# query set 1 (query '1/1_1_Y', labelled E in its own set; 341 positives, all counted as upstream)
CC_COLUMNS = ["1/1_1_Y",    # the query, E
              "2/2_40_Y",   # not annotated for set 1, excluded
              "1/1_22_Y",   # X, excluded
              "2/2_4_Y",    # not annotated for set 1
              "1/1_5_Y",    # X
              "1/1_2_Y",    # S
              "no_such_video"]
CC_SCORES = [0.99, 0.97, 0.95, 0.93, 0.9, 0.8, 1.0]
CC_EXPECTED = {
    "cc_web": (1 + 2 / 4) / 341,         # annotated only: 1_1 (hit), 1_22, 1_5, 1_2 (hit)
    "cc_web_star": (1 + 2 / 6) / 341,    # whole collection: 1_1, 2_40, 1_22, 2_4, 1_5, 1_2
    "cc_web_c": (1 + 2 / 3) / 341,       # annotated, without excluded: 1_1, 1_5, 1_2
    "cc_web_star_c": (1 + 2 / 4) / 341,  # collection, without excluded: 1_1, 2_4, 1_5, 1_2
}


@pytest.fixture(scope="module")
def tca_only_dir(annotation_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("tca_annotations")
    shutil.copy(os.path.join(annotation_dir, "cc_web_video_tca.pickle"), d)
    return str(d)


@pytest.mark.parametrize("pickle_style", ["visil", "tca"])
@pytest.mark.parametrize("result_style", ["visil", "tca"])
def test_cc_web_both_id_styles(annotation_dir, pickle_style, result_style, tca_only_dir):
    b = CC_WEB_VIDEO(annotation_dir if pickle_style == "visil" else tca_only_dir)
    assert len(b.queries) == 24 and len(b.database) == 13115
    strip = (lambda v: v.rsplit("/", 1)[-1]) if result_style == "tca" else (lambda v: v)
    log = Log()
    m = b.evaluate([strip("1/1_1_Y")], [strip(c) for c in CC_COLUMNS], np.array([CC_SCORES]), log=log)
    assert m == {k: pytest.approx(v) for k, v in CC_EXPECTED.items()}
    assert any("23 queries are missing" in line for line in log)
    assert any("1 database ids are not in the CC_WEB_VIDEO database" in line for line in log)


def test_cc_web_feature_keys_cover_both_styles(annotation_dir):
    b = CC_WEB_VIDEO(annotation_dir)
    assert b.feature_keys("1/1_1_Y") == ["1_1_Y", "1/1_1_Y"]


# --------------------------------------------------------------------------
# EVVE

def test_evve_trapezoid_per_event_and_overall(annotation_dir):
    b = EVVE(annotation_dir)
    assert (len(b.queries), len(b.database), len(b.events)) == (620, 2373, 13)
    event_a, event_b = sorted(b.events)[:2]
    qa1, qa2 = sorted(b.events[event_a][0])[:2]
    qb = sorted(b.events[event_b][0])[0]
    a1, a2 = sorted(b.events[event_a][1])[:2]
    b1 = sorted(b.events[event_b][1])[0]
    n1 = sorted(set(b.database) - b.events[event_a][1] - b.events[event_b][1])[0]
    columns = [a1, n1, a2, b1, qa1]  # a query among the columns is not a database video: ignored
    sims = np.array([[0.9, 0.8, 0.7, 0.6, 1.0],   # A positives at ranks 0, 2
                     [0.9, 0.6, 0.8, 0.7, 1.0],   # A positives at ranks 0, 1
                     [0.6, 0.9, 0.7, 0.8, 1.0]])  # B positive at rank 1
    m = b.evaluate([qa1, qa2, qb], columns, sims, log=Log())
    ap_a1 = (1 + 1) / 2 / 2 + (1 / 2 + 2 / 3) / 2 / 2
    ap_a2 = 1.0
    ap_b = (0 + 1 / 2) / 2
    assert m["events"] == {event_a: pytest.approx((ap_a1 + ap_a2) / 2), event_b: pytest.approx(ap_b)}
    assert m["mAP"] == pytest.approx((ap_a1 + ap_a2 + ap_b) / 3)
    assert m["avg_mAP"] == pytest.approx(((ap_a1 + ap_a2) / 2 + ap_b) / 2)
    assert event_a in b.table(m) and "avg_mAP" in b.table(m)


# --------------------------------------------------------------------------
# VCDB

def test_vcdb_query_not_in_its_own_relevant_set(annotation_dir):
    b = VCDB(annotation_dir)
    assert len(b.queries) == 528 and len(b.database) == 100306  # 4 ids listed twice in the index
    q = b.queries[0]
    gt1, gt2 = sorted(b.ground_truth[q])[:2]
    background = b.database[600]
    columns = [q, gt1, background, gt2]
    m = b.evaluate([q], columns, np.array([[1.0, 0.9, 0.8, 0.7]]), log=Log())
    # q skipped: gt1 (hit), background, gt2 (hit). Upstream would divide by 3 (q in its ground truth).
    assert m["mAP"] == pytest.approx((1 + 2 / 3) / 2)


# --------------------------------------------------------------------------
# annotation files

def test_missing_annotation_file_says_where_to_get_it(tmp_path):
    for name in ("FIVR-5K", "CC_WEB_VIDEO", "EVVE", "VCDB"):
        with pytest.raises(UserError, match="the repository ships them in datasets/; python datasets/download.py re-fetches them"):
            load_benchmark(name, str(tmp_path))


def test_unknown_dataset(annotation_dir):
    with pytest.raises(UserError, match="unknown dataset 'SVD'"):
        load_benchmark("SVD", annotation_dir)


def test_malformed_annotation_file(tmp_path):
    with open(tmp_path / "fivr.pickle", "wb") as f:
        pickle.dump({"annotation": {}, "5k": {"queries": []}}, f)  # no 'database'
    with pytest.raises(UserError, match="not a FIVR annotation file"):
        FIVR("5k", str(tmp_path))
    with open(tmp_path / "evve.pickle", "wb") as f:
        f.write(b"not a pickle at all")
    with pytest.raises(UserError, match="evve.pickle"):
        EVVE(str(tmp_path))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "vcdb.pickle", "wb") as f:
        pickle.dump({"index": [], "video_pairs": [_Exploit()]}, f)
    with pytest.raises(UserError, match="only plain data"):
        VCDB(str(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_custom_fivr_format_benchmark(tmp_path):
    """A small benchmark in FIVR's format (what the demo builds) evaluates like the real one."""
    with open(tmp_path / "fivr.pickle", "wb") as f:
        pickle.dump({"5k": {"queries": ["q"], "database": {"a", "b", "c"}},
                     "annotation": {"q": {"ND": ["b"], "IS": ["c"]}}}, f)
    b = data.load_benchmark("FIVR-5K", str(tmp_path))
    assert b.database == ["a", "b", "c"]
    m = b.evaluate(["q"], ["a", "b", "c"], np.array([[0.9, 0.8, 0.1]]), log=Log())
    assert m["DSVR"] == pytest.approx(1 / 2)
    assert m["ISVR"] == pytest.approx((1 / 2 + 2 / 3) / 2)


# --------------------------------------------------------------------------
# µAP, FIVR "hard" and the `full` protocol (issue 14)

def fivr_dir(tmp_path, annotation_dir, easy_duplicates=None):
    """An annotation folder with the real fivr.pickle and, if given, this easy-duplicates text."""
    os.symlink(os.path.join(annotation_dir, "fivr.pickle"), tmp_path / "fivr.pickle")
    if easy_duplicates is not None:
        (tmp_path / "fivr_easy_duplicates.txt").write_text(easy_duplicates)
    return str(tmp_path)


def fivr5k_query(b):
    """A FIVR-5K query with two ND/DS videos in the 5K database, and two unannotated database videos."""
    q = b.queries[0]
    near = sorted({v for label in ("ND", "DS") for v in b.annotation[q].get(label, ())} & set(b.database))
    annotated = {v for vs in b.annotation[q].values() for v in vs}
    negatives = sorted(set(b.database) - annotated)[:2]
    return q, near, negatives


def test_fivr_hard_drops_exactly_the_listed_videos(tmp_path, annotation_dir):
    b = FIVR("5k", annotation_dir)
    q, (d1, d2, *_), (n1, n2) = fivr5k_query(b)
    columns = [d1, n1, d2, n2]
    sims = np.array([[0.9, 0.8, 0.7, 0.6]])
    listed = FIVR("5k", fivr_dir(tmp_path, annotation_dir, f"{d1}\n{n1}\n\nnot_in_fivr\n"))
    m = listed.evaluate([q], columns, sims, log=Log())
    # normal: d1 (hit), n1, d2 (hit), n2 over the DSVR videos that have results {d1, d2}
    assert m["DSVR"] == pytest.approx((1 + 2 / 3) / 2)
    # hard: d1 and n1 leave the ranking and the relevant set: d2 (hit), n2
    assert m["DSVR_hard"] == pytest.approx(1.0)
    assert m["DSVD_hard"] == pytest.approx(1.0)  # one query: µAP = AP
    assert m["DSVD"] == pytest.approx(m["DSVR"])
    # the real list: 595 of its videos are in the FIVR-5K database, none a query
    assert len(b.easy_duplicates) == 4873 and len(b.easy_duplicates & set(b.database)) == 595


def test_fivr_without_easy_duplicates_file_has_no_hard_keys(tmp_path, annotation_dir):
    b = FIVR("5k", fivr_dir(tmp_path, annotation_dir))
    q, (d1, *_), (n1, _) = fivr5k_query(b)
    m = b.evaluate([q], [n1, d1], np.array([[0.9, 0.8]]), log=Log())
    assert set(m) == {"DSVR", "CSVR", "ISVR", "DSVD", "CSVD", "ISVD"}
    assert "hard: not computed, no " in b.table(m) and "datasets/download.py" in b.table(m)


@pytest.mark.parametrize("text, where", [("abc def\n", "line 1"), ("ok_id\n\xe9t\xe9\n", "UnicodeDecodeError"),
                                         ("\n\n", "no video ids")])
def test_malformed_easy_duplicates_file(tmp_path, annotation_dir, text, where):
    (tmp_path / "fivr_easy_duplicates.txt").write_bytes(text.encode("latin-1"))
    os.symlink(os.path.join(annotation_dir, "fivr.pickle"), tmp_path / "fivr.pickle")
    with pytest.raises(UserError, match="fivr_easy_duplicates.txt") as error:
        FIVR("5k", str(tmp_path))
    assert where in str(error.value) and "\n" not in str(error.value)


def test_fivr_full_protocol_counts_relevant_videos_without_results_as_misses(annotation_dir):
    b = FIVR("5k", annotation_dir)
    q, (d1, d2, *_), (n1, n2) = fivr5k_query(b)
    columns = [d1, n1, d2, n2]
    sims = np.array([[0.9, 0.8, 0.7, 0.6]])
    available = b.evaluate([q], columns, sims, log=Log())
    full = b.evaluate([q], columns, sims, log=Log(), protocol="full")
    universe = set(b.database) | set(b.queries)
    for task, labels in FIVR.TASKS.items():
        relevant = {v for label in labels for v in b.annotation[q].get(label, ())}
        found = relevant & set(columns)
        # the same hits, over every relevant video of the 5K version instead of those with results
        assert full[task] == pytest.approx(available[task] * len(found) / len(relevant & universe))
        hard = relevant & universe - b.easy_duplicates
        assert full[f"{task}_hard"] == pytest.approx(available[f"{task}_hard"] * len(found - b.easy_duplicates)
                                                     / len(hard))
    assert full["DSVD"] == pytest.approx(full["DSVR"])  # one query


def test_full_protocol_is_fivr_only(annotation_dir):
    b = EVVE(annotation_dir)
    with pytest.raises(UserError, match="--protocol full: EVVE has the available protocol only"):
        b.evaluate([b.queries[0]], [b.database[0]], np.zeros((1, 1)), log=Log(), protocol="full")


def test_evve_and_vcdb_micro_average_precision(annotation_dir):
    b = EVVE(annotation_dir)
    event = sorted(b.events)[0]
    qa, qb = sorted(b.events[event][0])[:2]
    a1, a2 = sorted(b.events[event][1])[:2]
    n1 = sorted(set(b.database) - b.events[event][1])[0]
    m = b.evaluate([qa, qb], [a1, n1, a2], np.array([[0.9, 0.8, 0.7], [0.85, 0.95, 0.1]]), log=Log())
    # pool: qb n1 .95, qa a1 .9 (hit), qb a1 .85 (hit), qa n1 .8, qa a2 .7 (hit), qb a2 .1 (hit);
    # N = 2 + 2 relevant videos with results; the plain precision sum, no trapezoids
    assert m["uAP"] == pytest.approx((1 / 2 + 2 / 3 + 3 / 5 + 4 / 6) / 4)
    v = VCDB(annotation_dir)
    q = v.queries[0]
    gt1, gt2 = sorted(v.ground_truth[q])[:2]
    m = v.evaluate([q], [q, gt1, v.database[600], gt2], np.array([[1.0, 0.9, 0.8, 0.7]]), log=Log())
    assert m["uAP"] == pytest.approx(m["mAP"]) and m["uAP"] == pytest.approx((1 + 2 / 3) / 2)


def test_annotation_files_ship_in_datasets_with_their_recorded_hashes():
    """A fresh clone needs nothing beside it: the six files are in datasets/, the scripts' default, and
    their bytes are the ones SHA256SUMS (which download.py checks against) and datasets/README.md list."""
    import hashlib
    import importlib.util
    spec = importlib.util.spec_from_file_location("download", os.path.join(data.DATASETS_DIR, "download.py"))
    download = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(download)
    readme = open(os.path.join(data.DATASETS_DIR, "README.md")).read()
    assert len(download.FILES) == 6
    for name, (url, sha256) in download.FILES.items():
        path = os.path.join(data.DATASETS_DIR, download.file_name(name))
        assert hashlib.sha256(open(path, "rb").read()).hexdigest() == sha256, path
        assert f"`{sha256}`" in readme
    assert data.load_benchmark("FIVR-5K").name  # the default folder, from any working directory
