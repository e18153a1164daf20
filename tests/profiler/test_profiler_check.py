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


def test_a_block_is_one_span_of_a_fixed_number_of_calls():
    calls = []
    b = check.time_block(lambda: (calls.append(1), time.sleep(0.01)), 3, "cpu")
    assert len(calls) == 3 and 0.009 < b.per_call_s < 0.05
    assert b.host_per_call_s == pytest.approx(b.per_call_s, rel=0.2)   # the CPU: no device to wait for


def test_ab_rounds_see_a_rare_stall_that_a_median_of_calls_would_drop():
    """A cost that lands in one call of four (like the sampler's 100 ms slow readings) still counts."""
    state = {"on": False, "calls": 0}

    def work():
        state["calls"] += 1
        stall = state["on"] and state["calls"] % 4 == 0
        time.sleep(0.002 + (0.004 if stall else 0.0))

    blocks = []
    ratios = check._ab_rounds(work, "cpu", 4, lambda: state.update(on=False), lambda: state.update(on=True), 4,
                              blocks)
    assert len(blocks) == 16 and {s for _, s, _ in blocks} == {False, True}
    assert 20.0 < check.statistics.fmean(ratios) < 80.0   # +50% on average


def test_steady_host_pins_off_the_sampler_and_turns_gc_off_then_back():
    import gc
    import os

    before = os.sched_getaffinity(0)
    sampler_at = max(before)
    with check.steady_host(sampler_at) as cpu:
        assert not gc.isenabled()
        if len(before) > 1:
            assert os.sched_getaffinity(0) == {cpu} and cpu != sampler_at
    assert gc.isenabled() and os.sched_getaffinity(0) == before


def test_child_call_summary():
    text = check._child_calls({"ticks": 100, "calls": {"power_w": [100, 0.05], "energy_mj": [50, 0.2]}})
    assert "power_w 0.50 ms x 100" in text and "energy_mj 4.00 ms x 50" in text and "NVML 25% of the time" in text
    assert "not reported" in check._child_calls(None)


def test_sampling_slowdown_end_to_end_with_a_scripted_gpu(monkeypatch):
    """The whole check (b) on the CPU: the sampling process reads the scripted pynvml; tiny workloads."""
    import os

    import mmprof.profiler
    from mmprof.profiler import Profiler

    from .fakes import ScriptedGpu

    fake = Path(__file__).with_name("fake_pynvml")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]))
    def scripted(device, sample_hz, idle_s, sampler):
        return Profiler(sample_hz=sample_hz, idle_s=idle_s, gpu_source=ScriptedGpu(0), sampler=sampler)

    monkeypatch.setattr(mmprof.profiler, "Profiler", scripted)
    monkeypatch.setattr(check, "_workloads", lambda device: {"launch-bound": lambda: time.sleep(0.003)})
    (row,) = check.sampling_slowdown("cpu", 6, ("process",), 1, warmup_s=0.05, log_blocks=True)
    assert row["check"] == "sampling-slowdown-launch-bound-process" and row["passed"] in (0, 1)
    assert "at 100 Hz; 6 interleaved A/B rounds" in row["note"]
    assert "NVML calls (mean time x count): power_w" in row["note"]
    assert "host enqueue time / block time 1.0" in row["note"]
