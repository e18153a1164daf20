"""The energy rules, in one place: the confidence rule, energy above idle, J per unit, and a row's
figures from its windows (median and spread over repeats, idle before and after the row).

NVML's energy counter and its power readings both update about every 100 ms on an H200, and NVML
samples power only part of each period (Yang et al., 2024: about 25% on A100/H100), so a window's
counter energy is trusted only when the window is long (`min_window_s`, 5 s by default), spans at
least `MIN_COUNTER_UPDATES` counter updates, and the integral of sampled power over the same window
agrees with it within `MAX_COUNTER_INTEGRAL_DIFF`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

MIN_WINDOW_S = 5.0
MIN_COUNTER_UPDATES = 20
MAX_COUNTER_INTEGRAL_DIFF = 0.05  # |integral - counter| / counter


def counter_integral_diff_pct(energy_j: float | None, integral_j: float | None) -> float | None:
    """(integral - counter) / counter, %; None unless both exist and the counter moved."""
    if energy_j is None or integral_j is None or energy_j <= 0:
        return None
    return 100.0 * (integral_j - energy_j) / energy_j


def confidence_reasons(duration_s: float, energy_j: float | None, integral_j: float | None,
                       counter_updates: int | None, min_window_s: float = MIN_WINDOW_S) -> list[str]:
    """Why a window's energy is not to be trusted (empty: it is). Only what was measured is judged."""
    reasons = []
    if duration_s < min_window_s:
        reasons.append(f"window {duration_s:.2f} s < {min_window_s:g} s")
    if energy_j is not None:
        if counter_updates is None:
            reasons.append("counter updates not sampled")
        elif counter_updates < MIN_COUNTER_UPDATES:
            reasons.append(f"{counter_updates} counter updates < {MIN_COUNTER_UPDATES}")
    diff = counter_integral_diff_pct(energy_j, integral_j)
    if diff is not None and abs(diff) > 100.0 * MAX_COUNTER_INTEGRAL_DIFF:
        reasons.append(f"counter and power integral differ by {diff:+.1f}% (> {100 * MAX_COUNTER_INTEGRAL_DIFF:g}%)")
    return reasons


def above_idle_j(energy_j: float | None, idle_power_w: float | None, duration_s: float) -> float | None:
    if energy_j is None or idle_power_w is None:
        return None
    return energy_j - idle_power_w * duration_s


@dataclass
class IdleReading:
    """Idle power of one idle window (None with the reason when it could not be had)."""

    power_w: float | None
    reason: str | None = None


@dataclass
class RowIdle:
    """The idle power of a row: measured before and after it; the row uses their mean."""

    before: IdleReading
    after: IdleReading

    @property
    def power_w(self) -> float | None:
        known = [r.power_w for r in (self.before, self.after) if r.power_w is not None]
        return sum(known) / len(known) if known else None

    @property
    def drift_w(self) -> float | None:
        if self.before.power_w is None or self.after.power_w is None:
            return None
        return self.after.power_w - self.before.power_w

    @property
    def reason(self) -> str | None:
        return None if self.power_w is not None else (self.before.reason or self.after.reason or "no idle baseline")


# per-unit column names: (gross, above idle); the first unit also gets the spread over windows
UNIT_COLUMNS = {"token": ("j_per_token", "j_per_token_above_idle"),
                "step": ("energy_per_step_j", "energy_above_idle_per_step_j")}


def _spread(values: list[float]) -> tuple[float | None, float | None, float | None]:
    if not values:
        return None, None, None
    return statistics.median(values), min(values), max(values)


def _total(values: Sequence[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else math.fsum(values)


def row_energy(windows: Sequence, units: dict[str, Sequence[int]], idle: RowIdle | None,
               min_window_s: float = MIN_WINDOW_S) -> dict:
    """The energy, power and host columns of a row measured as `windows` (Measurements).

    units maps a unit name of UNIT_COLUMNS to how many of them each window held. Energies, window
    lengths, samples and CPU energy are totals over the windows; per-unit energy and average power are
    the median over windows with their min and max; energy above idle uses the row's own idle power
    (`idle`), or the session's idle power held by the windows when `idle` is None. The row is low
    confidence when any window is, and its note says which and why.
    """
    if not windows:
        raise ValueError("a row needs at least one window")
    idle_w = idle.power_w if idle is not None else windows[0].idle_power_w
    out: dict = {
        "energy_j": _total([m.energy_j for m in windows]),
        "energy_integral_j": _total([m.energy_integral_j for m in windows]),
        "energy_window_s": math.fsum(m.duration_s for m in windows),
        "energy_window_min_s": min(m.duration_s for m in windows),
        "idle_power_w": idle_w,
        "idle_drift_w": idle.drift_w if idle is not None else None,
        "n_power_samples": sum(m.n_samples for m in windows),
    }
    above = [above_idle_j(m.energy_j, idle_w, m.duration_s) for m in windows]
    out["energy_above_idle_j"] = _total(above)
    for k, (unit, counts) in enumerate(units.items()):
        gross_col, above_col = UNIT_COLUMNS[unit]
        gross = [m.energy_j / n for m, n in zip(windows, counts) if m.energy_j is not None and n]
        net = [a / n for a, n in zip(above, counts) if a is not None and n]
        full = len(gross) == len(windows)
        out[gross_col], lo, hi = _spread(gross) if full else (None, None, None)
        out[above_col] = _spread(net)[0] if len(net) == len(windows) else None
        if k == 0:
            out[f"{gross_col}_min"], out[f"{gross_col}_max"] = lo, hi
    powers = [m.power_avg_w for m in windows]
    full = all(p is not None for p in powers)
    out["power_avg_w"], out["power_avg_min_w"], out["power_avg_max_w"] = _spread(powers) if full else (None,) * 3
    peaks = [m.power_peak_w for m in windows if m.power_peak_w is not None]
    out["power_peak_w"] = max(peaks) if peaks else None
    updates = [m.n_counter_updates for m in windows]
    out["n_counter_updates"] = min(updates) if all(u is not None for u in updates) else None
    diffs = [counter_integral_diff_pct(m.energy_j, m.energy_integral_j) for m in windows]
    diffs = [d for d in diffs if d is not None]
    out["counter_integral_diff_pct"] = max(diffs, key=abs) if diffs else None
    for key in ("nvml_mem_used_gib", "host_rss_peak_gib"):
        vals = [getattr(m, key) for m in windows if getattr(m, key) is not None]
        out[key] = max(vals) if vals else None
    dur = out["energy_window_s"]
    cpu = [m.cpu_util_pct for m in windows]
    out["cpu_util_pct"] = (math.fsum(c * m.duration_s for c, m in zip(cpu, windows)) / dur
                           if dur and all(c is not None for c in cpu) else None)
    out["cpu_energy_j"] = _total([m.cpu_energy_j for m in windows])
    flagged = []
    for k, m in enumerate(windows):
        reasons = confidence_reasons(m.duration_s, m.energy_j, m.energy_integral_j, m.n_counter_updates,
                                     min_window_s)
        if reasons:
            flagged.append((f"window {k + 1}: " if len(windows) > 1 else "") + ", ".join(reasons))
    out["low_confidence"] = int(bool(flagged))
    notes = [f"low confidence ({'; '.join(flagged)})"] if flagged else []
    if idle is not None and idle_w is None:
        notes.append(f"idle_power_w empty: {idle.reason}")
    elif idle is not None and idle.drift_w is None:
        notes.append(f"idle_drift_w empty: {idle.before.reason or idle.after.reason}")
    notes += [m.note() for m in windows if m.note()]
    out["note"] = "; ".join(dict.fromkeys(notes))   # distinct, in order
    return out
