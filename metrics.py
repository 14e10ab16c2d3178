"""Retrieval measures of a query x database similarity matrix: mAP, µAP and
the interpolated precision-recall curve, all from one sort per query.

`rank_hits` ranks each query's database videos once and records where the
relevant ones land ("hits"): their rank in the query's own ranking (for AP,
the first relevant rank, the PR curve) and in the pool of every query's
(query, video) pairs (for µAP). The measures are reductions of those ranks,
vectorised over numpy arrays instead of sorting a Python dict per query and
per label set as the upstream evaluators do (bench/NOTES.md).

Ties, the one rule of every measure: equal scores rank in column order within
a query, which is upstream's stable `sorted(..., reverse=True)`; in the pool
they rank in query order, then column order, i.e. a stable sort of the
queries' rows laid end to end. (S2VS ranks its pool with an unstable
`np.argsort`, so its order of equal scores is arbitrary.) One consequence: the
µAP of a single query is its AP.
"""
import numpy as np

# The official FIVR-200K evaluator's recall levels, computed as it does (i * 0.05)
# so that a recall that lands on a level compares the same way.
RECALL_LEVELS = np.array([i * 0.05 for i in range(21)])


def rank_hits(similarities, relevant, ranked, exclude=None, pooled=True):
    """Rank each query's videos and find its relevant ones in the ranking.

    similarities: (Q, D) scores, higher = more similar; NaN = not computed,
        never ranked.
    relevant: (Q, D) bool, or (K, Q, D) for K relevance sets ranked the same
        way (FIVR's tasks), which costs one sort per query for all K. A
        relevant video that is not ranked counts as never retrieved.
    ranked: (Q, D) or (D,) bool, the videos ranked for each query.
    exclude: None, or (D,) bool: videos to drop from the rankings and the
        relevant sets for a second result (FIVR "hard"). Both come from the
        same sorts: a rank without them is the rank with them less the
        excluded videos ranked ahead.
    pooled: also rank the hits in the pool of all queries' pairs (µAP).
    Returns Hits, or (Hits, Hits without the excluded videos).
    """
    similarities = np.asarray(similarities)
    relevant = np.asarray(relevant, dtype=bool)
    relevant = np.broadcast_to(relevant, relevant.shape[:-2] + similarities.shape).reshape(-1, *similarities.shape)
    ranked = np.broadcast_to(np.asarray(ranked, dtype=bool), similarities.shape)
    exclude = None if exclude is None else np.asarray(exclude, dtype=bool)
    num_queries = similarities.shape[0]
    keep = ranked & ~np.isnan(similarities)  # (Q, D)
    rows, columns = np.nonzero(relevant.any(0) & keep)  # the hits, by query then column
    values = similarities[rows, columns]
    starts = np.searchsorted(rows, np.arange(num_queries + 1))  # hits of query i: starts[i]:starts[i + 1]
    # The excluded and the other videos of a row are sorted apart, so that a rank
    # with them is the sum of two counts and a rank without them the first.
    parts = (None,) if exclude is None else (False, True)  # None: every ranked video; else: excluded or not
    row_before = np.zeros((len(parts), len(values)), dtype=np.int64)  # ranked ahead in the hit's query
    pool_before = np.zeros_like(row_before)  # ranked ahead in the pool, in `order` (value order)
    order = np.argsort(values, kind="stable")
    needles, needle_rows = values[order], rows[order]  # sorted needles: searchsorted walks the row once
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    for i in range(num_queries):
        own = slice(starts[i], starts[i + 1])
        if not pooled and own.start == own.stop:
            continue
        for p, part in enumerate(parts):
            mask = keep[i] if part is None else keep[i] & (exclude == part)
            scores = similarities[i][mask]  # (n,) in column order
            sorted_scores = np.sort(scores)  # an unstable value sort is ~20x faster than a stable argsort
            targets = needles if pooled else values[own]
            above = np.searchsorted(sorted_scores, targets, side="right")
            greater = len(scores) - above
            equal = np.zeros_like(above)
            if len(scores):
                some = np.flatnonzero(sorted_scores[np.maximum(above - 1, 0)] == targets)  # need a 2nd search
                some = some[above[some] > 0]
                equal[some] = above[some] - np.searchsorted(sorted_scores, targets[some], side="left")
            if pooled:
                # every query's higher scores; earlier queries' equal scores too
                pool_before[p] += greater + equal * (needle_rows > i)
                greater, equal = greater[position[own]], equal[position[own]]
            ties = np.zeros(len(greater), dtype=np.int64)
            tied = np.flatnonzero(equal > mask[columns[own]])  # an equal score other than the hit itself
            if len(tied):
                ties[tied] = _equal_before(scores, mask, values[own][tied], columns[own][tied])
            row_before[p, own] = greater + ties
            if pooled:
                pool_before[p, position[own]] += ties
    pool_rank = np.empty_like(pool_before)
    pool_rank[:, order] = pool_before
    member = relevant[:, rows, columns]  # (K, H)
    hits = Hits(rows, row_before.sum(0), pool_rank.sum(0) if pooled else None, member, relevant.sum(2))
    if exclude is None:
        return hits
    kept = ~exclude[columns]
    num_relevant = relevant.sum(2) - relevant[:, :, exclude].sum(2)
    return hits, Hits(rows[kept], row_before[0, kept], pool_rank[0, kept] if pooled else None, member[:, kept],
                      num_relevant)


def _equal_before(scores, mask, values, before):
    """For each (value, column) point: how many of `scores` (one row's ranked
    videos, the columns where `mask` is set, in column order) equal the value
    at a smaller column."""
    if len(values) <= 32:
        bounds = [np.count_nonzero(mask[:c]) for c in before]  # elements at a smaller column: scores[:bound]
        return np.array([np.count_nonzero(scores[:b] == v) for b, v in zip(bounds, values)], dtype=np.int64)
    # many ties (e.g. quantised scores): one stable sort, then each point is a
    # search for (its value's group, its bound) among (group, element index) keys
    bound = np.searchsorted(np.flatnonzero(mask), before)
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    group = np.searchsorted(sorted_scores, sorted_scores, side="left")
    keys = group * len(scores) + order  # ascending: groups in value order, indices ascending within one
    start = np.searchsorted(sorted_scores, values, side="left")
    return np.searchsorted(keys, start * len(scores) + bound) - start


class Hits:
    """Where the relevant videos of Q queries land: for each retrieved relevant
    (query, video) pair, its query, its 0-based rank in that query's ranking,
    its 0-based rank in the pool of all queries' pairs (None unless pooled),
    and the K relevance sets it belongs to. `num_relevant` (K, Q) are the
    relevant set sizes, retrieved or not: the default denominators."""

    def __init__(self, query, rank, pooled_rank, member, num_relevant):
        order = np.lexsort((rank, query))
        self.query, self.rank = query[order], rank[order]  # (H,), by query then rank
        self.pooled_rank = None if pooled_rank is None else pooled_rank[order]
        self.member = member[:, order]  # (K, H) bool
        self.num_relevant = np.asarray(num_relevant)  # (K, Q)

    def _denominators(self, num_relevant):
        return self.num_relevant if num_relevant is None else np.reshape(num_relevant, self.num_relevant.shape)

    def _of_set(self, k):
        """query, 0-based rank and 1-based count within the query of set k's hits."""
        query, rank = self.query[self.member[k]], self.rank[self.member[k]]
        return query, rank, np.arange(1, len(query) + 1) - np.searchsorted(query, query, side="left")

    def average_precision(self, num_relevant=None, trapezoid=False):
        """(K, Q) AP, NaN where a query has no relevant video. trapezoid: EVVE's
        official AP (trapezoid rule on the precision-recall curve,
        `score_ap_from_ranks_1` upstream) instead of the usual
        non-interpolated AP (mean of the precision at each relevant video).
        num_relevant: other (K, Q) or (Q,) denominators."""
        num_relevant = self._denominators(num_relevant)
        ap = np.full(num_relevant.shape, np.nan)
        for k in range(len(ap)):
            query, rank, hits = self._of_set(k)
            precision = hits / (rank + 1)
            if trapezoid:
                # precision just before each hit; 1 at rank 0 as in the EVVE code
                precision_before = np.where(rank == 0, 1.0, (hits - 1) / np.maximum(rank, 1))
                precision = (precision + precision_before) / 2
            total = np.bincount(query, weights=precision, minlength=ap.shape[1])
            has_relevant = num_relevant[k] > 0
            ap[k, has_relevant] = total[has_relevant] / num_relevant[k, has_relevant]
        return ap

    def micro_average_precision(self, num_relevant=None):
        """(K,) µAP (S2VS's "detection" measure): the AP of the pooled ranking
        of every query's pairs, sum of precision@k x rel_k / N with N the sum
        of the queries' relevant set sizes; NaN where N is 0."""
        total = self._denominators(num_relevant).sum(1)
        uap = np.full(len(total), np.nan)
        for k in np.flatnonzero(total):
            ranks = np.sort(self.pooled_rank[self.member[k]])
            uap[k] = (np.arange(1, len(ranks) + 1) / (ranks + 1)).sum() / total[k]
        return uap

    def first_rank(self):
        """(K, Q) 1-based rank of each query's first retrieved relevant video, NaN if none."""
        first = np.full(self.num_relevant.shape, np.nan)
        for k in range(len(first)):
            query, rank, hits = self._of_set(k)
            first[k, query[hits == 1]] = rank[hits == 1] + 1
        return first

    def interpolated_precision(self, num_relevant=None):
        """(K, Q, 21) the official FIVR-200K evaluator's interpolated precision at
        recall 0, 0.05, ..., 1: the highest precision at any recall at least
        that level; 1 at recall 0 (sklearn's precision_recall_curve starts at
        (0, 1)); NaN rows where a query has no relevant video. Where a
        relevant video is never retrieved the recall stops short of 1 and the
        levels beyond get 0; upstream appends such videos at score 0, behind
        every video of the dataset, for a precision of about
        (relevant videos) / (dataset size) there."""
        num_relevant = self._denominators(num_relevant)
        curves = np.full(num_relevant.shape + (len(RECALL_LEVELS),), np.nan)
        for k in range(len(curves)):
            query, rank, hits = self._of_set(k)
            starts = np.searchsorted(query, np.arange(curves.shape[1] + 1))
            for q in np.flatnonzero(num_relevant[k]):
                found = slice(starts[q], starts[q + 1])
                precision = hits[found] / (rank[found] + 1)
                best_from = np.maximum.accumulate(precision[::-1])[::-1]  # best precision from each hit on
                first = np.searchsorted(hits[found] / num_relevant[k, q], RECALL_LEVELS, side="left")
                curve = np.zeros(len(RECALL_LEVELS))
                reached = first < len(precision)
                curve[reached] = best_from[first[reached]]
                curve[0] = 1.0
                curves[k, q] = curve
        return curves


def average_precision(similarities, relevant, ranked, trapezoid=False, num_relevant=None):
    """AP of each query: `rank_hits` then `Hits.average_precision`.
    relevant (Q, D) gives (Q,), relevant (K, Q, D) gives (K, Q)."""
    ap = rank_hits(similarities, relevant, ranked, pooled=False).average_precision(num_relevant, trapezoid)
    return ap[0] if np.ndim(relevant) == 2 else ap


def micro_average_precision(similarities, relevant, ranked, num_relevant=None):
    """µAP of the queries' pooled pairs: `rank_hits` then
    `Hits.micro_average_precision`. relevant (Q, D) gives a float,
    relevant (K, Q, D) gives (K,)."""
    uap = rank_hits(similarities, relevant, ranked).micro_average_precision(num_relevant)
    return float(uap[0]) if np.ndim(relevant) == 2 else uap
