"""What every section shares: interleaved timing, summaries, synthetic videos,
the FLOP count of a TCA layer, the report's number formats and targets."""
import functools
import operator
import time
from typing import NamedTuple

import numpy as np
import torch

from utils import l2_normalize


# --------------------------------------------------------------------------
# timing

def summary(values, unit=""):
    """Median, min and max of repeated measurements (unit "": a fraction)."""
    values = [float(v) for v in values]
    return {"median": float(np.median(values)), "min": min(values), "max": max(values), "n": len(values),
            "unit": unit}


def interleaved(contenders, repeats, warmup=1):
    """Time each callable of `contenders` (name -> fn) `repeats` times, in
    rounds that run every contender once, so that a ratio taken within a
    round compares them under the same load; returns name -> [seconds per round]."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    seconds = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def per_round(fn, *lists):
    """fn applied round by round to per-round lists (e.g. a ratio of two contenders' seconds)."""
    return [fn(*values) for values in zip(*lists)]


def peak_contender(n, matmuls):
    """A callable doing `matmuls` fp32 (n x n) @ (n x n) products, and its FLOPs:
    the yardstick every section re-measures within its own rounds."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=generator), torch.randn(n, n, generator=generator)

    def run():
        for _ in range(matmuls):
            torch.mm(a, b)
    return run, 2.0 * n ** 3 * matmuls


def gflops_summary(flops, seconds):
    """GFLOP/s of a job of `flops` timed at `seconds` per round."""
    return summary([flops / s / 1e9 for s in seconds], "GFLOP/s")


def rates_against_peak(seconds, flops, peak_seconds, peak_flops):
    """Per-round GFLOP/s of a contender that did `flops` in `seconds`, and
    their fraction of the matmul peak measured in the same rounds (peak_seconds)."""
    return gflops_summary(flops, seconds), summary(
        per_round(lambda s, p: flops / s / (peak_flops / p), seconds, peak_seconds))


# --------------------------------------------------------------------------
# synthetic inputs

def random_lengths(count, low, high, seed):
    return np.random.default_rng(seed).integers(low, high + 1, size=count)


def random_videos(lengths, channels, seed):
    """L2-normalised random frame features, like PCA-whitened iMAC: [(T_i, C)] float32."""
    generator = torch.Generator().manual_seed(seed)
    return [l2_normalize(torch.randn(int(t), channels, generator=generator)) for t in lengths]


def tca_flops(lengths, channels, feedforward):
    """FLOPs of a 1-layer TCA on videos of these valid lengths: per frame the
    q/k/v and output projections (8 C^2) and the feed-forward (4 C F), per
    video the attention scores and their weighted sum (4 T^2 C)."""
    lengths = np.asarray(lengths, dtype=np.float64)
    return float(np.sum(lengths * (8 * channels ** 2 + 4 * channels * feedforward) + 4 * lengths ** 2 * channels))


# --------------------------------------------------------------------------
# report

def fmt(s, digits=None):
    """'median [min–max] unit' of a summary."""
    def num(x):
        if digits is not None:
            return f"{x:.{digits}f}"
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    unit = f" {s['unit']}" if s.get("unit") else ""
    return f"{num(s['median'])} [{num(s['min'])}–{num(s['max'])}]{unit}"


def pct(s):
    """A summary of fractions as 'median% [min–max%]'."""
    return f"{100 * s['median']:.0f}% [{100 * s['min']:.0f}–{100 * s['max']:.0f}%]"


def table(columns, rows):
    """A markdown table: its header of `columns` and one line per row of cells."""
    def line(cells):
        return "|" + "".join(f" {cell} |" if cell != "" else " |" for cell in cells)
    return [line(columns), "|" + "---|" * len(columns)] + [line(row) for row in rows]


class Target(NamedTuple):
    """A figure a section is held to: the median of the summary at `path` in
    the section's results against `threshold`."""
    figure: str  # formatted with the section's results, e.g. "... ({config[database]:,} videos)"
    path: tuple  # keys from the section's results to a summary
    threshold: float
    text: str  # the target as the report writes it, e.g. "≥ 70%"
    higher_is_better: bool = True


def check_targets(targets, results):
    """One report row per target whose figure `results` holds: figure,
    measured, target, met and the shortfall when missed. A target whose
    path is absent (a mode this run left out) is skipped."""
    rows = []
    for target in targets:
        try:
            measured = functools.reduce(operator.getitem, target.path, results)
        except KeyError:
            continue
        value, threshold = measured["median"], target.threshold
        met = value >= threshold if target.higher_is_better else value <= threshold
        if met:
            shortfall = ""
        elif target.higher_is_better:
            shortfall = f"short by {100 * (1 - value / threshold):.0f}% ({value:.3g} vs {threshold:.3g})"
        else:
            shortfall = f"over by {100 * (value / threshold - 1):.0f}% ({value:.3g} vs {threshold:.3g})"
        rows.append({"figure": target.figure.format(**results),
                     "measured": fmt(measured) if measured.get("unit") else pct(measured),
                     "target": target.text, "met": met, "shortfall": shortfall})
    return rows
