"""metrics.py: µAP, the tie rule, the ranks without excluded videos and the
interpolated precision-recall curve, against hand-worked cases and brute
force."""
import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve

from metrics import RECALL_LEVELS, average_precision, micro_average_precision, rank_hits


def test_micro_average_precision_hand_worked():
    sims = np.array([[0.9, 0.5, 0.3, 0.2],
                     [0.8, 0.6, 0.1, 0.7]])
    relevant = np.array([[True, False, True, True],
                         [False, True, False, False]])
    ranked = np.array([True, True, True, False])  # column 3 is not ranked: q0's third relevant video is a miss
    # pool: 0.9 q0c0 (hit), 0.8 q1c0, 0.6 q1c1 (hit), 0.5 q0c1, 0.3 q0c2 (hit), 0.1 q1c2
    # N = 3 + 1 relevant videos (the miss counts): (1/1 + 2/3 + 3/5) / 4
    assert micro_average_precision(sims, relevant, ranked) == pytest.approx((1 + 2 / 3 + 3 / 5) / 4)
    # K relevance sets at once, and other denominators
    both = micro_average_precision(sims, np.stack([relevant, ~relevant]), ranked, num_relevant=[[3, 1], [1, 1]])
    # set 1: hits q1c0 (pool rank 2), q0c1 (4), q1c2 (6); N = 2
    np.testing.assert_allclose(both, [(1 + 2 / 3 + 3 / 5) / 4, (1 / 2 + 2 / 4 + 3 / 6) / 2])
    assert np.isnan(micro_average_precision(sims, np.zeros_like(relevant), ranked))


def test_ties_rank_in_query_then_column_order():
    sims = np.full((2, 3), 0.5)
    relevant = np.array([[False, True, False],
                         [True, False, False]])
    # pool: q0c0, q0c1 (hit), q0c2, q1c0 (hit), q1c1, q1c2
    assert micro_average_precision(sims, relevant, np.ones(3, bool)) == pytest.approx((1 / 2 + 2 / 4) / 2)
    # within a query, column order (upstream's stable sort): q0's hit at rank 2, q1's at rank 1
    np.testing.assert_allclose(average_precision(sims, relevant, np.ones(3, bool)), [1 / 2, 1.0])


def test_micro_average_precision_of_one_query_is_its_average_precision():
    rng = np.random.default_rng(0)
    sims = rng.integers(0, 5, size=(1, 200)) / 5  # many ties
    relevant = rng.random((1, 200)) < 0.2
    assert micro_average_precision(sims, relevant, np.ones(200, bool)) == \
        pytest.approx(average_precision(sims, relevant, np.ones(200, bool))[0])


def _brute_force(sims, relevant, ranked):
    """(query, rank in the query, rank in the pool) of each retrieved relevant
    pair: stable sorts of each row and of the rows laid end to end."""
    pairs = [(i, j) for i in range(sims.shape[0]) for j in range(sims.shape[1])
             if ranked[i, j] and not np.isnan(sims[i, j])]
    in_row = {}
    for i in range(sims.shape[0]):
        row = sorted((p for p in pairs if p[0] == i), key=lambda p: -sims[p])
        in_row.update({p: r for r, p in enumerate(row)})
    in_pool = {p: r for r, p in enumerate(sorted(pairs, key=lambda p: -sims[p]))}
    return sorted((p[0], in_row[p], in_pool[p]) for p in pairs if relevant.any(0)[p])


@pytest.mark.parametrize("seed", range(6))
def test_ranks_with_and_without_excluded_videos_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    num_queries, num_videos = 4, 300
    sims = rng.integers(0, [2, 5, 1000][seed % 3], size=(num_queries, num_videos)).astype(float)
    sims[rng.random(sims.shape) < 0.05] = np.nan  # never ranked
    relevant = rng.random((3, num_queries, num_videos)) < 0.2
    ranked = rng.random((num_queries, num_videos)) < 0.9
    exclude = rng.random(num_videos) < 0.2
    hits, without = rank_hits(sims, relevant, ranked, exclude)
    ours = lambda h: sorted(zip(h.query.tolist(), h.rank.tolist(), h.pooled_rank.tolist()))
    assert ours(hits) == _brute_force(sims, relevant, ranked)
    # the second result is the same as ranking without the excluded videos from the start
    assert ours(without) == _brute_force(sims, relevant & ~exclude, ranked & ~exclude)
    np.testing.assert_array_equal(without.num_relevant, (relevant & ~exclude).sum(2))


def test_interpolated_precision_hand_worked():
    # ranking: R N R N N, a third relevant video never ranked (NaN)
    sims = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, np.nan]])
    relevant = np.array([[True, False, True, False, False, True]])
    curve = rank_hits(sims, relevant, np.ones(6, bool)).interpolated_precision()[0, 0]
    # hits: precision 1 at recall 1/3, 2/3 at recall 2/3; recall never reaches 1
    expected = np.where(RECALL_LEVELS <= 1 / 3, 1.0, np.where(RECALL_LEVELS <= 2 / 3, 2 / 3, 0.0))
    np.testing.assert_allclose(curve, expected)
    assert curve[7] == pytest.approx(2 / 3) and curve[13] == pytest.approx(2 / 3)  # 0.35 and 0.65
    assert rank_hits(sims, relevant, np.ones(6, bool)).first_rank()[0, 0] == 1


def test_interpolated_precision_equals_the_official_evaluators():
    """The official FIVR-200K evaluator (sklearn's precision_recall_curve, then
    the highest precision at recall >= i * 0.05), on rankings without ties."""
    rng = np.random.default_rng(3)
    sims = rng.random((5, 400))
    relevant = rng.random((5, 400)) < 0.1
    ours = rank_hits(sims, relevant, np.ones(400, bool)).interpolated_precision()[0]
    for row, rel, curve in zip(sims, relevant, ours):
        precision, recall, _ = precision_recall_curve(rel, row)
        official = [np.max(precision[recall >= i * 0.05]) for i in range(21)]
        np.testing.assert_allclose(curve, official)
