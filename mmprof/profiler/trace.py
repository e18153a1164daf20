"""Writing the sampled time series: power_trace.csv and phases.csv (times in s from profiler start)."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from .sampler import GpuTrace
from .measurement import GIB

TRACE_COLUMNS = ("t_s", "gpu", "power_w", "mem_used_gib", "gpu_util_pct", "mem_util_pct", "sm_clock_mhz", "temp_c")
PHASE_COLUMNS = ("label", "t_start_s", "t_end_s")


@dataclass
class Phase:
    label: str
    t_start_s: float
    t_end_s: float


def _cell(v: float, digits: int) -> str:
    return "" if math.isnan(v) else f"{v:.{digits}f}"


def write_power_trace(path: Path, traces: list[GpuTrace], t0_s: float) -> None:
    """One row per GPU sample, ordered by time; empty cells where a reading failed."""
    rows = []
    for tr in traces:
        v = tr.values
        for k, t in enumerate(tr.t_s):
            rows.append((t - t0_s, tr.gpu, v["power_w"][k], v["mem_used_bytes"][k] / GIB,
                         v["gpu_util_pct"][k], v["mem_util_pct"][k], v["sm_clock_mhz"][k], v["temp_c"][k]))
    rows.sort(key=lambda r: (r[0], r[1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TRACE_COLUMNS)
        for t, gpu, p, mem, gu, mu, clk, temp in rows:
            w.writerow([f"{t:.6f}", gpu, _cell(p, 3), _cell(mem, 4), _cell(gu, 0), _cell(mu, 0),
                        _cell(clk, 0), _cell(temp, 0)])


def write_phases(path: Path, phases: list[Phase]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PHASE_COLUMNS)
        for ph in sorted(phases, key=lambda p: p.t_start_s):
            w.writerow([ph.label, f"{ph.t_start_s:.6f}", f"{ph.t_end_s:.6f}"])
