"""Pure arithmetic on power samples: integrals, averages, update counts. No I/O, no clocks."""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence


def _clean(t_s: Sequence[float], power_w: Sequence[float]) -> tuple[list[float], list[float]]:
    pairs = [(t, p) for t, p in zip(t_s, power_w) if not math.isnan(p)]
    return [t for t, _ in pairs], [p for _, p in pairs]


def _at(ts: list[float], ps: list[float], t: float) -> float:
    if t <= ts[0]:
        return ps[0]
    if t >= ts[-1]:
        return ps[-1]
    k = bisect_right(ts, t)
    t0, t1, p0, p1 = ts[k - 1], ts[k], ps[k - 1], ps[k]
    return p0 if t1 == t0 else p0 + (p1 - p0) * (t - t0) / (t1 - t0)


def integrate_power_j(t_s: Sequence[float], power_w: Sequence[float],
                      start_s: float, end_s: float) -> float | None:
    """Energy over [start_s, end_s] of the piecewise-linear curve through the samples, J.

    Samples are (time, power) pairs in increasing time; NaN powers are skipped; the curve is held
    flat before the first and after the last sample. None when there is no sample at all.
    """
    ts, ps = _clean(t_s, power_w)
    if not ts:
        return None
    if end_s <= start_s:
        return 0.0
    inner = [(t, p) for t, p in zip(ts, ps) if start_s < t < end_s]
    points = [(start_s, _at(ts, ps, start_s)), *inner, (end_s, _at(ts, ps, end_s))]
    return sum((b[0] - a[0]) * (a[1] + b[1]) / 2.0 for a, b in zip(points, points[1:]))


def counter_update_time(t_s: Sequence[float], counter: Sequence[float], edge_t_s: float, edge_value: float,
                        max_gap_s: float, horizon_s: float = 0.3) -> float | None:
    """When a stepwise counter took the value an edge read at edge_t_s, from sampled reads of it:
    midway between the last sampled read before the edge that was lower and the first read after
    that one (sampled, or the edge's own) that was not. None when those two reads are more than
    max_gap_s apart (too sparse to place the update) or the lower one is older than horizon_s."""
    lower = [t for t, c in zip(t_s, counter) if c == c and t < edge_t_s and c < edge_value]
    if not lower or edge_t_s - max(lower) > horizon_s:
        return None
    t_lo = max(lower)
    t_hi = min([t for t, c in zip(t_s, counter) if c == c and t_lo < t < edge_t_s and c >= edge_value] + [edge_t_s])
    return (t_lo + t_hi) / 2.0 if t_hi - t_lo <= max_gap_s else None


def count_updates(values: Sequence[float]) -> int:
    """How many distinct readings a stepwise signal showed: runs of equal consecutive values."""
    runs, last = 0, None
    for v in values:
        if math.isnan(v):
            continue
        if last is None or v != last:
            runs += 1
        last = v
    return runs


def sum_by_index(series: Sequence[Sequence[float]]) -> list[float]:
    """Element-wise sum of equally long series (one per GPU); NaN where any is NaN."""
    if not series:
        return []
    return [math.fsum(col) if not any(math.isnan(v) for v in col) else math.nan for col in zip(*series)]
