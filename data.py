"""Benchmarks and their retrieval protocols: FIVR-5K / FIVR-200K, CC_WEB_VIDEO,
EVVE and VCDB.

Each benchmark class reads its annotation pickle (with the restricted
unpickler of utils.py) and turns a query x database similarity matrix into the
measures the papers report, following the evaluators of ViSiL
(MKLab-ITI/visil), DnS (mever-team/distill-and-select), TCA
(xwen99/temporal_context_aggregation) and, for µAP and FIVR "hard", S2VS
(gkordo/s2vs). Every measure comes from metrics.py: one sort per query ranks
the database for mAP, µAP, the precision-recall curve and the hard versions.

The common protocol ("available", DnS's and S2VS's):
  - rank the database by decreasing similarity; equal scores as metrics.py
    says (column order, as Python's stable `sorted(..., reverse=True)`
    upstream);
  - only the videos that have results count: a relevant video absent from the
    results is not counted in the denominator (except on CC_WEB_VIDEO, as
    upstream, and in FIVR's `full` protocol), a database id unknown to the
    benchmark is counted, reported and ignored;
  - a benchmark query missing from the results is reported and ignored; a
    query whose relevant set is empty is reported and skipped;
  - NaN similarities mean "not computed" and are never ranked.
Per-benchmark details (and where we depart from upstream) are in each class.

At the end of the file: VCDBPairDataset and collate_pairs, the VCDB training
pairs that train.py reads.
"""
import collections
import functools
import itertools
import os
import re

import numpy as np

from metrics import rank_hits
from utils import UserError, check_finite, load_pickle, open_features, pad_sequences

# the annotation files ship in the repository's datasets/ (datasets/README.md); the scripts default to it
# wherever they are run from
DATASETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "datasets")
DOWNLOAD_HINT = "the repository ships them in datasets/; python datasets/download.py re-fetches them (or pass --annotation_dir)"
EASY_DUPLICATES = "fivr_easy_duplicates.txt"
# every file a benchmark reads from its annotation directory (inputs no output may replace)
ANNOTATION_FILES = ("fivr.pickle", "cc_web_video.pickle", "cc_web_video_tca.pickle", "evve.pickle", "vcdb.pickle",
                    EASY_DUPLICATES)

# The result of a run: `metrics` as --json_out writes them, the queries
# evaluated, how many database videos had results, and for each mAP key the Task that the per-query rows and the
# precision-recall curve come from.
Evaluation = collections.namedtuple("Evaluation", "metrics queries num_database tasks")
# relevance set `index` of `hits` (metrics.Hits), with its (K, Q) denominators (None: the default)
Task = collections.namedtuple("Task", "hits index num_relevant trapezoid")


def annotation_path(annotation_dir, filename):
    path = os.path.join(annotation_dir, filename)
    if not os.path.isfile(path):
        raise UserError(f"{path}: annotation file not found; {DOWNLOAD_HINT}")
    return path


class Benchmark:
    """Base class. Subclasses set `name`, `queries` and `database` (video id
    lists, deterministic order), `metric_names`, and implement `_evaluate`."""
    name = ""
    metric_names = ()  # as printed in the table
    metric_keys = ()   # as written by --json_out
    protocols = ("available",)

    def canonical(self, video_id):
        """The id under which the annotation knows `video_id`."""
        return video_id

    def canonical_ids(self, ids):
        return list(map(str, ids)) if type(self).canonical is Benchmark.canonical \
            else [self.canonical(str(v)) for v in ids]

    def feature_keys(self, video_id):
        """Keys under which a feature file may store `video_id`."""
        return [video_id]

    def check_protocol(self, protocol):
        if protocol not in self.protocols:
            raise UserError(f"--protocol {protocol}: {self.name} has the {' and '.join(self.protocols)} protocol "
                            "only (full is the official FIVR-200K evaluator's, for FIVR-5K and FIVR-200K)")

    def evaluate(self, query_ids, database_ids, similarities, log=print, protocol="available"):
        """query_ids (Q,), database_ids (D,), similarities (Q, D) -> metrics dict.
        Reports missing queries and unknown ids through `log`."""
        return self.evaluate_with_details(query_ids, database_ids, similarities, log, protocol).metrics

    def evaluate_with_details(self, query_ids, database_ids, similarities, log=print, protocol="available"):
        """As `evaluate`, but returns an Evaluation (metrics, queries, num_database, tasks)."""
        self.check_protocol(protocol)
        similarities = np.asarray(similarities)
        if similarities.ndim != 2 or similarities.shape != (len(query_ids), len(database_ids)):
            raise UserError(f"similarities of shape {similarities.shape} do not match "
                            f"{len(query_ids)} queries x {len(database_ids)} database videos")
        query_ids, database_ids = self.canonical_ids(query_ids), self.canonical_ids(database_ids)
        row_of = {q: i for i, q in enumerate(query_ids)}
        column_of = {v: j for j, v in enumerate(database_ids)}  # the known ones, below
        for kind, ids, index in (("query", query_ids, row_of), ("database", database_ids, column_of)):
            if len(index) != len(ids):
                raise UserError(f"the results list some {kind} ids twice (after id normalisation)")

        queries = [q for q in self.queries if q in row_of]
        known = list(map(self._database_set.__contains__, database_ids))  # (D,) python loop, but a fast one
        in_database = np.fromiter(known, dtype=bool, count=len(known))
        # NaN = not computed (a similarity file may leave pairs out): say how many of the evaluated pairs
        missing = sum(np.count_nonzero(np.isnan(similarities[row_of[q]][in_database])) for q in queries)
        log(f"{self.name}: {len(queries)} of {len(self.queries)} queries, "
            f"{np.count_nonzero(in_database)} of {len(self._database_set)} database videos"
            + (f", {missing} of {len(queries) * np.count_nonzero(in_database)} pairs not computed" if missing else ""))
        if len(queries) < len(self.queries):
            log(f"warning: {len(self.queries) - len(queries)} queries are missing from the results and are ignored")
        known_queries = set(self.queries)
        unknown = sum(q not in known_queries for q in query_ids)
        if unknown:
            log(f"warning: {unknown} query ids are not {self.name} queries and are ignored")
        if not in_database.all():
            log(f"warning: {np.count_nonzero(~in_database)} database ids are not in the "
                f"{self.name} database and are ignored")
        if not queries:
            raise UserError(f"none of the {self.name} queries is in the results")
        if not in_database.all():
            column_of = dict(zip(itertools.compress(database_ids, known), itertools.compress(itertools.count(), known)))
        rows = [row_of[q] for q in queries]
        scores = similarities if rows == list(range(len(query_ids))) else similarities[rows]  # (Q', D)
        metrics, tasks = self._evaluate(queries, column_of, in_database, scores, log, protocol)
        return Evaluation(metrics, queries, int(np.count_nonzero(in_database)), tasks)

    @staticmethod
    def _relevance(queries, column_of, num_columns, relevant_ids):
        """(Q, D) bool mask of relevant_ids(query) restricted to the available columns."""
        relevant = np.zeros((len(queries), num_columns), dtype=bool)
        for i, q in enumerate(queries):
            relevant[i, [column_of[v] for v in relevant_ids(q) if v in column_of]] = True
        return relevant

    @staticmethod
    def _skip_self(queries, column_of, in_database, shape):
        """(Q, D) the database videos ranked for each query, the query itself not."""
        ranked = np.broadcast_to(in_database, shape).copy()
        for i, q in enumerate(queries):
            if q in column_of:
                ranked[i, column_of[q]] = False
        return ranked

    @staticmethod
    def _mean(ap, queries, what, log):
        """Mean AP over the queries with a relevant set; the others are reported."""
        empty = [q for q, a in zip(queries, ap) if np.isnan(a)]
        if empty:
            log(f"warning: {what}: {len(empty)} queries have no relevant video among the results "
                f"and are skipped ({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''})")
        return float(np.nanmean(ap)) if len(empty) < len(ap) else float("nan")

    def table_groups(self, metrics):
        """The table's blocks: [(printed names, keys)], each a header over value lines."""
        return [(self.metric_names, self.metric_keys)]

    def table(self, metrics):
        """The metrics as the paper's table: for each block a header line and a value line."""
        return self.table_rows({"": metrics})

    def table_rows(self, rows, title="metric"):
        """rows {label: metrics} as one table: for each block a header line,
        then one value line per row, its label first ("-": a key the row lacks)."""
        width = max(len(label) for label in rows)
        first = "" if not width else f"{title:<{width}} "
        lines = []
        for names, keys in self.table_groups(next(iter(rows.values()))):
            lines.append(first + " ".join(f"{n:>10}" for n in names))
            for label, metrics in rows.items():
                values = " ".join(f"{metrics[k]:>10.4f}" if k in metrics else f"{'-':>10}" for k in keys)
                lines.append((f"{label:<{width}} " if width else "") + values)
        return "\n".join(lines)


def load_easy_duplicates(annotation_dir):
    """S2VS's FIVR easy duplicates (`fivr_easy_duplicates.txt`, one video id a
    line) from annotation_dir, or None when the file is not there."""
    path = os.path.join(annotation_dir, EASY_DUPLICATES)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="ascii") as f:
            lines = f.read().splitlines()
    except (UnicodeDecodeError, OSError) as e:
        raise UserError(f"{path}: not a list of video ids ({type(e).__name__}); {DOWNLOAD_HINT}") from None
    ids = set()
    for number, line in enumerate(lines, 1):
        if line.strip() and not re.fullmatch(r"[\w\-./]+", line.strip()):
            raise UserError(f"{path}, line {number}: {line[:40]!r} is not a video id (expected one id a line); "
                            f"{DOWNLOAD_HINT}")
        ids.add(line.strip())
    ids.discard("")
    if not ids:
        raise UserError(f"{path}: no video ids; {DOWNLOAD_HINT}")
    return ids


class FIVR(Benchmark):
    """FIVR-5K / FIVR-200K (Kordopatis-Zilos et al. 2019), DnS's `fivr.pickle`.

    Three retrieval tasks, each a set of relevant labels: DSVR = {ND, DS},
    CSVR = {ND, DS, CS}, ISVR = {ND, DS, CS, IS}, scored by mAP; DSVD, CSVD,
    ISVD are the same label sets scored by µAP (S2VS's "detection" tasks).
    The query is never ranked. As upstream, a query annotated as relevant to
    itself stays in its relevant set (one FIVR query, eCrhXArKE24, is labelled
    IS to itself); S2VS drops it.

    Protocols: `available` (DnS, S2VS) counts only the relevant videos that
    have results; `full` (the official MKLab-ITI/FIVR-200K evaluator) counts
    every relevant video of the version's database and queries, one without
    a result as a miss. The rankings are the same (the official evaluator also
    ranks the query itself when it has a result; we never do); the
    denominators differ.

    "Hard" (S2VS): the easy duplicates of `fivr_easy_duplicates.txt`, when the
    annotation folder has it, are dropped from the database, so from the
    rankings and the relevant sets; every key again with the suffix `_hard`.
    """
    TASKS = {"DSVR": ("ND", "DS"), "CSVR": ("ND", "DS", "CS"), "ISVR": ("ND", "DS", "CS", "IS")}
    DETECTION = ("DSVD", "CSVD", "ISVD")
    metric_names = metric_keys = ("DSVR", "CSVR", "ISVR")
    protocols = ("available", "full")

    def __init__(self, version="200k", annotation_dir=DATASETS_DIR):
        path = annotation_path(annotation_dir, "fivr.pickle")
        data = load_pickle(path)
        try:
            self.annotation = data["annotation"]
            self.queries = [str(q) for q in data[version]["queries"]]
            self._database_set = set(map(str, data[version]["database"]))
        except (KeyError, TypeError):
            raise UserError(f"{path}: not a FIVR annotation file (expected keys 'annotation' and "
                            f"'{version}' with 'queries' and 'database'); {DOWNLOAD_HINT}") from None
        self.name = f"FIVR-{version.upper()}"
        self.easy_duplicates = load_easy_duplicates(annotation_dir)  # None: no hard keys
        self.easy_duplicates_path = os.path.join(annotation_dir, EASY_DUPLICATES)

    @functools.cached_property
    def database(self):
        # a set in the pickle: sort it, so the column order (and tie order) is reproducible; on
        # first use, as evaluating a similarity file never needs the order (0.2 s for FIVR-200K)
        return sorted(self._database_set)

    def _evaluate(self, queries, column_of, in_database, scores, log, protocol):
        ranked = self._skip_self(queries, column_of, in_database, scores.shape)  # (Q, D)
        relevant = np.zeros((len(self.TASKS),) + scores.shape, dtype=bool)  # (3, Q, D)
        num_full = np.zeros((2,) + relevant.shape[:2], dtype=np.int64)  # `full`: (normal/hard, 3, Q)
        if protocol == "full":
            universe = self._database_set | set(self.queries)  # the version's videos
            easy = self.easy_duplicates or set()
        for i, q in enumerate(queries):
            labels = self.annotation.get(q, {})
            for k, task_labels in enumerate(self.TASKS.values()):
                videos = {v for label in task_labels for v in labels.get(label, ())}
                relevant[k, i, [column_of[v] for v in videos if v in column_of]] = True
                if protocol == "full":
                    num_full[0, k, i] = len(videos & universe)
                    num_full[1, k, i] = len(videos & universe - easy)
        if self.easy_duplicates is None:
            results = [("", rank_hits(scores, relevant, ranked))]
        else:
            exclude = np.zeros(scores.shape[1], dtype=bool)
            exclude[[column_of[v] for v in self.easy_duplicates if v in column_of]] = True
            results = list(zip(("", "_hard"), rank_hits(scores, relevant, ranked, exclude)))  # one sort for both
        metrics, tasks = {}, {}
        for (suffix, hits), num_relevant in zip(results, num_full if protocol == "full" else (None, None)):
            ap = hits.average_precision(num_relevant)  # (3, Q)
            uap = hits.micro_average_precision(num_relevant)  # (3,)
            for k, task in enumerate(self.TASKS):
                metrics[task + suffix] = self._mean(ap[k], queries, task + suffix, log)
                tasks[task + suffix] = Task(hits, k, num_relevant, False)
            metrics.update({task + suffix: float(u) for task, u in zip(self.DETECTION, uap)})
        return metrics, tasks

    def table_groups(self, metrics):
        groups = [(self.metric_names, self.metric_keys), (self.DETECTION, self.DETECTION)]
        if "DSVR_hard" in metrics:
            groups += [(tuple(f"{k}_hard" for k in keys),) * 2 for _, keys in groups]
        return groups

    def table_rows(self, rows, title="metric"):
        table = super().table_rows(rows, title)
        if self.easy_duplicates is None:
            table += (f"\nhard: not computed, no {self.easy_duplicates_path} (S2VS's list of the real "
                      "FIVR-200K's easy duplicates: python datasets/download.py fivr_easy_duplicates)")
        return table


class CC_WEB_VIDEO(Benchmark):
    """CC_WEB_VIDEO (Wu et al. 2007): 24 queries, 13,129 videos.

    Reads ViSiL's `cc_web_video.pickle` (ids '1/1_1_Y') or, if absent, TCA's
    `cc_web_video_tca.pickle` (ids '1_1_Y'); results may use either id style.
    Positives are the labels E, S, L, M, V of the query's set; as upstream,
    every annotated positive counts in the denominator, with or without a
    result (one positive of query set 4 has no id in the annotation's index,
    so even complete results cannot reach AP 1 on it). Four variants:
      cc_web      ranks only the videos annotated for the query's set;
      cc_web_star ranks the whole collection (CC_WEB*);
      *_c         "clean": each query's `excluded` videos are neither ranked
                  nor counted as positives.
    As upstream, the query itself is ranked (it is labelled E in its own set).
    """
    POSITIVE_LABELS = frozenset("ESLMV")
    metric_names = ("cc_web", "cc_web*", "cc_web_c", "cc_web*_c")
    metric_keys = ("cc_web", "cc_web_star", "cc_web_c", "cc_web_star_c")
    name = "CC_WEB_VIDEO"

    def __init__(self, annotation_dir=DATASETS_DIR):
        path = os.path.join(annotation_dir, "cc_web_video.pickle")
        if not os.path.isfile(path) and os.path.isfile(os.path.join(annotation_dir, "cc_web_video_tca.pickle")):
            path = os.path.join(annotation_dir, "cc_web_video_tca.pickle")
        data = load_pickle(annotation_path(*os.path.split(path)))
        try:
            # ViSiL: 'index' maps '1/1_1_Y' -> number; TCA: 'vid2index' maps '1_1_Y' -> number
            index = data["vid2index"] if "vid2index" in data else data["index"]
            self.number = {self.canonical(str(k)): int(n) for k, n in index.items()}
            self.queries = [str(q) for q in data["queries"]]
            self.ground_truth = [dict(g) for g in data["ground_truth"]]  # per query set: number -> label
            self.excluded = [set(e) for e in data["excluded"]]           # per query set: numbers
            self.database = sorted(index, key=lambda k: index[k])
        except (KeyError, TypeError, AttributeError, ValueError):
            raise UserError(f"{path}: not a CC_WEB_VIDEO annotation file; {DOWNLOAD_HINT}") from None
        if not (len(self.queries) == len(self.ground_truth) == len(self.excluded)):
            raise UserError(f"{path}: queries, ground_truth and excluded differ in length")
        self.queries = [self.canonical(q) for q in self.queries]
        self.database = [self.canonical(str(v)) for v in self.database]
        self._database_set = set(self.database)
        self._query_set = {q: i for i, q in enumerate(self.queries)}

    def canonical(self, video_id):
        return video_id.rsplit("/", 1)[-1]  # '1/1_1_Y' -> '1_1_Y'

    def feature_keys(self, video_id):
        video_id = self.canonical(video_id)
        return [video_id, f"{video_id.split('_', 1)[0]}/{video_id}"]

    def _evaluate(self, queries, column_of, in_database, scores, log, protocol):
        number = np.full(scores.shape[1], -1, dtype=np.int64)  # (D,) annotation number of each column
        for v, j in column_of.items():
            number[j] = self.number[v]
        size = max(self.number.values()) + 2  # lookup tables indexed by number; -1 -> last slot (never set)
        annotated = np.zeros((len(queries), scores.shape[1]), dtype=bool)
        positive, excluded = annotated.copy(), annotated.copy()
        num_positives, num_clean_positives = np.zeros((1, len(queries))), np.zeros((1, len(queries)))
        for i, q in enumerate(queries):
            query_set = self._query_set[q]
            is_annotated, is_positive, is_excluded = (np.zeros(size, dtype=bool) for _ in range(3))
            labels, excluded_numbers = self.ground_truth[query_set], self.excluded[query_set]
            positives = [n for n, label in labels.items() if label in self.POSITIVE_LABELS]
            is_annotated[list(labels)] = True
            is_positive[positives] = True
            is_excluded[list(excluded_numbers)] = True
            annotated[i], positive[i], excluded[i] = is_annotated[number], is_positive[number], is_excluded[number]
            num_positives[0, i] = len(positives)
            num_clean_positives[0, i] = sum(n not in excluded_numbers for n in positives)
        metrics, tasks = {}, {}
        for key, whole_collection, clean in (("cc_web", False, False), ("cc_web_star", True, False),
                                             ("cc_web_c", False, True), ("cc_web_star_c", True, True)):
            ranked = in_database & (True if whole_collection else annotated)
            relevant = positive & in_database
            if clean:
                ranked, relevant = ranked & ~excluded, relevant & ~excluded
            num_relevant = num_clean_positives if clean else num_positives
            hits = rank_hits(scores, relevant, ranked, pooled=False)
            metrics[key] = self._mean(hits.average_precision(num_relevant)[0], queries, key, log)
            tasks[key] = Task(hits, 0, num_relevant, False)
        return metrics, tasks


class EVVE(Benchmark):
    """EVVE (Revaud et al. 2013): 620 queries of 13 events, 2,373 database videos.

    AP is the official trapezoid AP of the EVVE evaluation code. Reported:
    `mAP` (mean over queries, "overall mAP" upstream), `avg_mAP` (mean of the
    13 per-event mAPs, DnS's "avg mAP"), `uAP` (µAP of all queries' pairs,
    the plain precision sum as S2VS, no trapezoids) and `events` (event ->
    mAP). Queries are not database videos; query ids among the database
    columns are ignored (S2VS ranks them). A missing query is ignored in its
    event's mAP too (upstream's per-event mAP divides by all the event's
    queries, counting it as AP 0).
    """
    metric_names = metric_keys = ("mAP", "avg_mAP", "uAP")
    name = "EVVE"

    def __init__(self, annotation_dir=DATASETS_DIR):
        path = annotation_path(annotation_dir, "evve.pickle")
        data = load_pickle(path)
        try:
            self.events = {str(e): (set(qs), set(pos)) for e, (qs, pos, _null) in data["annotation"].items()}
            self.queries = [str(q) for q in data["queries"]]
            self.database = [str(v) for v in data["database"]]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: not an EVVE annotation file; {DOWNLOAD_HINT}") from None
        self.event_of = {q: e for e, (qs, _) in self.events.items() for q in qs}
        self._database_set = set(self.database)

    def _evaluate(self, queries, column_of, in_database, scores, log, protocol):
        relevant = self._relevance(queries, column_of, scores.shape[1],
                                   lambda q: self.events[self.event_of[q]][1] if q in self.event_of else ())
        hits = rank_hits(scores, relevant, in_database)
        ap = hits.average_precision(trapezoid=True)[0]
        events = {}
        for event in sorted(self.events):
            members = [i for i, q in enumerate(queries) if self.event_of.get(q) == event]
            if members:
                events[event] = self._mean(ap[members], [queries[i] for i in members], event, lambda _: None)
        metrics = {"mAP": self._mean(ap, queries, "EVVE", log), "avg_mAP": float(np.nanmean(list(events.values()))),
                   "events": events, "uAP": float(hits.micro_average_precision()[0])}
        return metrics, {"mAP": Task(hits, 0, None, True)}

    def table_rows(self, rows, title="metric"):
        measured = {label: m for label, m in rows.items() if "events" in m}
        events = next(iter(measured.values()))["events"]
        if len(measured) == 1:
            lines = [f"{event:<40} {value:.4f}" for event, value in events.items()]
        else:  # one column per measured row
            lines = [f"{'event':<40} " + " ".join(f"{label:>10}" for label in measured)]
            lines += [f"{event:<40} " + " ".join(f"{m['events'][event]:>10.4f}" for m in measured.values())
                      for event in events]
        return "\n".join(lines + ["-" * 47, super().table_rows(rows, title)])


class VCDB(Benchmark):
    """VCDB (Jiang et al. 2014), TCA's `vcdb.pickle`: the 528 core videos are
    the queries; the database is the core plus the background videos.

    A query's relevant videos are the core videos it shares a copied segment
    with (`video_pairs`, both directions). Upstream also puts each query into
    its own relevant set while skipping it in the ranking, which caps every AP
    below 1; we do not. `uAP` is the µAP of all queries' pairs (S2VS).
    """
    metric_names = metric_keys = ("mAP", "uAP")
    name = "VCDB"

    def __init__(self, annotation_dir=DATASETS_DIR):
        path = annotation_path(annotation_dir, "vcdb.pickle")
        data = load_pickle(path)
        try:
            index = [str(v) for v in data["index"]]
            pairs = [tuple(p["videos"]) for p in data["video_pairs"]]
        except (KeyError, TypeError):
            raise UserError(f"{path}: not a VCDB annotation file; {DOWNLOAD_HINT}") from None
        self.queries = index[:528]
        self.database = list(dict.fromkeys(index))  # the index lists 4 background ids twice
        self.ground_truth = {q: set() for q in self.queries}
        for a, b in pairs:
            if a != b:
                self.ground_truth.setdefault(a, set()).add(b)
                self.ground_truth.setdefault(b, set()).add(a)
        self._database_set = set(self.database)

    def _evaluate(self, queries, column_of, in_database, scores, log, protocol):
        ranked = self._skip_self(queries, column_of, in_database, scores.shape)
        relevant = self._relevance(queries, column_of, scores.shape[1], lambda q: self.ground_truth[q])
        hits = rank_hits(scores, relevant, ranked)
        metrics = {"mAP": self._mean(hits.average_precision()[0], queries, "VCDB", log),
                   "uAP": float(hits.micro_average_precision()[0])}
        return metrics, {"mAP": Task(hits, 0, None, False)}


DATASETS = ("FIVR-5K", "FIVR-200K", "CC_WEB_VIDEO", "EVVE", "VCDB")


def load_benchmark(name, annotation_dir=DATASETS_DIR):
    """Benchmark by its command-line name (case-insensitive)."""
    key = name.upper()
    if key in ("FIVR-5K", "FIVR-200K"):
        return FIVR(version=key.split("-")[1].lower(), annotation_dir=annotation_dir)
    if key == "CC_WEB_VIDEO":
        return CC_WEB_VIDEO(annotation_dir)
    if key == "EVVE":
        return EVVE(annotation_dir)
    if key == "VCDB":
        return VCDB(annotation_dir)
    raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


# --------------------------------------------------------------------------
# VCDB training pairs (used by train.py)

class VCDBPairDataset:
    """VCDB copy pairs for supervised contrastive training: a map-style dataset
    for torch's DataLoader (which needs only __len__ and __getitem__; not
    subclassing torch's Dataset keeps data.py free of torch).

    Item `index` is (anchor (Ta, C), positive (Tp, C), negatives [neg_num x (Tn, C)]):
    the two videos of `video_pairs[index]` of vcdb.pickle and `neg_num` videos drawn
    from its background list `negs`, as float32 arrays of at most `padding_size`
    frames; `collate_pairs` pads a batch of them.

    Pairs with a video that has no features (missing from the HDF5 file, or zero
    frames) are dropped, and so are such negatives; `num_dropped_pairs` and
    `num_dropped_negatives` count them. Raises UserError on a feature size other than
    `feature_size`, on no usable pair, or on fewer usable negatives than `neg_num`.

    Videos longer than `padding_size` are cropped to a random window of
    `padding_size` frames (as upstream), or with `random_sampling` to
    `padding_size` random frames kept in temporal order (upstream samples them
    with replacement, unordered).

    Randomness (negatives, crops) is drawn from a generator seeded by
    (seed, epoch, index): an item is the same whatever the number of DataLoader
    workers or ranks, and a resumed run sees the same items. Call `set_epoch`
    before each epoch.
    """

    def __init__(self, annotation_path, feature_path, padding_size=300, random_sampling=False,
                 neg_num=1, feature_size=None, seed=0):
        self.feature_path = os.fspath(feature_path)
        self.padding_size = padding_size
        self.random_sampling = random_sampling
        self.neg_num = neg_num
        self.seed = seed
        self.epoch = 0
        annotation = load_pickle(annotation_path)
        if not isinstance(annotation, dict) or "video_pairs" not in annotation or "negs" not in annotation:
            raise UserError(f"{annotation_path}: not a VCDB training annotation "
                            "(expected a dict with 'video_pairs' and 'negs')")
        pairs = [tuple(pair["videos"][:2]) for pair in annotation["video_pairs"]]
        negatives = list(dict.fromkeys(annotation["negs"]))  # unique, in file order

        # Keep only videos with features; check the feature size (metadata only, no data read).
        with open_features(self.feature_path) as features:
            def usable(video):
                if video not in features:
                    return False
                shape = features[video].shape
                if len(shape) != 2:
                    raise UserError(f"{self.feature_path}: video {video} has features of shape "
                                    f"{shape}, expected (frames, {feature_size or 'C'})")
                if feature_size is not None and shape[1] != feature_size:
                    raise UserError(f"{self.feature_path}: video {video} has {shape[1]}-dimensional "
                                    f"features but --pca_components is {feature_size}")
                return shape[0] > 0
            has_features = {}
            for video in {v for pair in pairs for v in pair} | set(negatives):
                has_features[video] = usable(video)
        self.pairs = [pair for pair in pairs if has_features[pair[0]] and has_features[pair[1]]]
        self.negatives = [video for video in negatives if has_features[video]]
        self.num_dropped_pairs = len(pairs) - len(self.pairs)
        self.num_dropped_negatives = len(negatives) - len(self.negatives)
        if not self.pairs:
            raise UserError(f"no usable training pairs: none of the {len(pairs)} pairs of "
                            f"{annotation_path} has features for both videos in {self.feature_path}")
        if len(self.negatives) < neg_num:
            raise UserError(f"only {len(self.negatives)} of the {len(negatives)} background videos of "
                            f"{annotation_path} have features in {self.feature_path}, "
                            f"fewer than --neg_num {neg_num}")
        self._features, self._features_pid = None, None

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.pairs)

    def _read(self, video, rng):
        # h5py handles must not cross a fork: open the file once per process.
        if self._features is None or self._features_pid != os.getpid():
            self._features, self._features_pid = open_features(self.feature_path), os.getpid()
        dataset = self._features[video]
        num_frames = dataset.shape[0]
        if num_frames <= self.padding_size:
            rows = np.arange(num_frames)
        elif self.random_sampling:
            rows = np.sort(rng.choice(num_frames, self.padding_size, replace=False))
        else:
            start = int(rng.integers(num_frames - self.padding_size + 1))
            rows = np.arange(start, start + self.padding_size)
        frames = dataset[rows[0]:rows[-1] + 1][rows - rows[0]] if len(rows) else dataset[:0]
        # a NaN frame would make the loss NaN with no video to blame: name it where it enters
        return check_finite(np.asarray(frames, dtype=np.float32), self.feature_path, video, rows)  # (T, C)

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        anchor, positive = self.pairs[index]
        negatives = rng.choice(len(self.negatives), self.neg_num, replace=False)
        return (self._read(anchor, rng), self._read(positive, rng),
                [self._read(self.negatives[i], rng) for i in negatives])


def collate_pairs(batch):
    """Pad a list of VCDBPairDataset items, each group to its longest video.

    Returns anchors (B, T, C), anchor_frames (B,), positives (B, T, C),
    positive_frames (B,), negatives (B * neg_num, T, C), negative_frames (B * neg_num,);
    the negatives of item b are rows b * neg_num ... (b + 1) * neg_num - 1.
    """
    anchors, anchor_frames = pad_sequences([item[0] for item in batch])
    positives, positive_frames = pad_sequences([item[1] for item in batch])
    negatives, negative_frames = pad_sequences([n for item in batch for n in item[2]])
    return anchors, anchor_frames, positives, positive_frames, negatives, negative_frames
