"""scripts/profiler_check.py's slowdown arithmetic on the CPU: interleaved A/B rounds and the interval."""

import importlib.util
import time
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "profiler_check", Path(__file__).resolve().parents[2] / "scripts" / "profiler_check.py")
check = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(check)


def test_paired_interval_holds_the_mean():
    mean, lo, hi = check.paired_ci([0.2, -0.1, 0.4, 0.0, 0.1, 0.3, -0.2, 0.2])
    assert mean == pytest.approx(0.1125) and lo < mean < hi and hi - lo < 0.6
    assert check.paired_ci([0.5] * 6) == (0.5, 0.5, 0.5)


def test_ab_rounds_find_a_known_slowdown_and_cancel_a_drift():
    """A workload 10% slower while 'on', on a machine that slows down steadily through the run."""
    state = {"on": False, "calls": 0}

    def work():
        state["calls"] += 1
        time.sleep(0.002 * (1.10 if state["on"] else 1.0) * (1 + 0.002 * state["calls"]))

    ratios = check._ab_rounds(work, "cpu", 6, lambda: state.update(on=False), lambda: state.update(on=True), 2)
    mean, lo, hi = check.paired_ci(ratios)
    assert len(ratios) == 6 and 3.0 < mean < 20.0
