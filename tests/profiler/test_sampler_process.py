"""The sampling process end to end on the CPU, with a scripted pynvml on the child's PYTHONPATH."""

import importlib.util
import os
import time
from pathlib import Path

import pytest

from mmprof.profiler.sampler_process import (ProcessSampler, SamplerDidNotStart, _state, read_every, sampler_cpu,
                                             workload_cpus)
from mmprof.profiler.window import ALIGN_MAX_GAP_S, GpuContext, _counter_window, build, read_edge

from .fakes import ScriptedGpu

FAKE = Path(__file__).with_name("fake_pynvml")


@pytest.fixture
def child_sees_fake_nvml(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAKE), os.environ.get("PYTHONPATH", "")]))


def test_samples_come_back_from_another_process(child_sees_fake_nvml):
    gpus = [ScriptedGpu(0, power_w=250.0), ScriptedGpu(1, power_w=250.0)]
    sampler = ProcessSampler(gpus, None, hz=100)
    sampler.start()
    try:
        assert sampler.running and sampler._proc.pid != os.getpid()
        start = read_edge(gpus, None, time.monotonic)
        time.sleep(0.6)
        end = read_edge(gpus, None, time.monotonic)
        assert sampler.wait_past(end.t_s, timeout_s=1.0)
        m = build("w", start, end, GpuContext(gpus, sampler, None, None, "none", 0.5), 0.0)
    finally:
        sampler.stop()
    assert not sampler.running and sampler._proc.returncode == 0 and sampler.error is None
    assert 40 <= m.n_samples <= 65                                  # 100 Hz for 0.6 s
    assert m.power_avg_w == pytest.approx(500.0 + 0.001, rel=1e-3)  # two GPUs at 250 W
    assert 4 <= m.n_counter_updates <= 7                             # the counter steps every 100 ms
    assert m.nvml_mem_used_gib == pytest.approx(3.0)
    trace = sampler.traces[1]
    assert len(trace.t_s) == len(sampler.traces[0].t_s) or abs(len(trace.t_s) - len(sampler.traces[0].t_s)) == 1
    assert "not supported" in trace.reasons["temp_c"]                # written once by the child
    assert all(v != v for v in trace.values["temp_c"])
    assert sum(v == v for v in trace.values["sm_clock_mhz"]) < len(trace.t_s) / 5   # a slow field


def test_a_child_that_cannot_start_says_why(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(FAKE.parent / "no-such-folder"))
    monkeypatch.setattr("mmprof.profiler.sampler_process.sys.executable", "/bin/false")
    with pytest.raises(SamplerDidNotStart):
        ProcessSampler([ScriptedGpu(0)], None, hz=100).start(timeout_s=2.0)


def test_profiler_windows_from_the_sampling_process(child_sees_fake_nvml):
    from mmprof.profiler import Profiler

    gpu = ScriptedGpu(0, power_w=250.0)   # the parent's edges; the child reads the scripted pynvml at 250 W
    with Profiler(sample_hz=100, idle_s=0.3, gpu_source=gpu, sampler="process", min_window_s=0.5) as prof:
        assert prof.sampler_kind == "process"
        with prof.window("w") as w:
            time.sleep(0.6)
    m = w.measurement
    assert prof.idle_power_w == pytest.approx(250.0, rel=1e-3)
    assert m.energy_integral_j == pytest.approx(m.energy_j, rel=0.03)
    assert 4 <= m.n_counter_updates <= 8                         # 100 ms steps in a 0.6 s window
    assert m.confidence_reasons == [f"{m.n_counter_updates} counter updates < 20"]


def test_a_paused_sampling_process_takes_no_samples_and_still_stops(child_sees_fake_nvml):
    sampler = ProcessSampler([ScriptedGpu(0)], None, hz=100)
    sampler.start()
    try:
        sampler.pause()
        assert _state(sampler._proc.pid) in ("T", None)   # stopped when pause() returns
        time.sleep(0.05)
        sampler._refresh()
        n = len(sampler.traces[0].t_s)
        time.sleep(0.3)
        sampler._refresh()
        assert len(sampler.traces[0].t_s) == n       # stopped: nothing written for 0.3 s
        sampler.resume()
        assert sampler.wait_past(time.monotonic(), timeout_s=1.0)
        sampler.pause()                                # stop() resumes it before asking it to end
    finally:
        sampler.stop()
    assert sampler._proc.returncode == 0


def _fake_nvml():
    spec = importlib.util.spec_from_file_location("fake_pynvml_for_parent", FAKE / "pynvml.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ChildCounterGpu(ScriptedGpu):
    """The parent's edges read the same stepped counter as the child's scripted pynvml."""

    def energy_mj(self) -> int:
        return _fake_nvml().counter_mj(time.monotonic())


def test_read_cadence_keeps_what_the_windows_need():
    every = read_every(100, 1)
    assert every["energy_mj"] * 0.01 <= ALIGN_MAX_GAP_S   # counter updates placed between reads
    assert every["energy_mj"] * 0.01 <= 0.05              # >= 2 reads per 100 ms update: every update counted
    assert every["energy_mj"] >= 2                         # but not every 10 ms tick: its read costs ~4 ms
    assert every["mem_used_bytes"] == 5 and every["sm_clock_mhz"] == 10
    assert read_every(100, 4)["energy_mj"] == 5            # 4 GPUs' reads would not fit the ticks
    assert read_every(20, 1) == dict.fromkeys(every, 1) | {"sm_clock_mhz": 2, "gpu_util_pct": 2,
                                                           "mem_util_pct": 2, "temp_c": 2}


def test_the_sampling_cpu_is_off_the_workloads_core():
    pairs = {c: {c % 4, c % 4 + 4} for c in range(8)}.get   # 4 cores, 2 threads each: cpu c and c + 4
    assert sampler_cpu(set(range(8)), 7, core=pairs) == 6
    assert sampler_cpu(set(range(8)), 2, core=pairs) == 7
    assert sampler_cpu({2, 6}, 2, core=pairs) == 6            # only its sibling left: better than itself
    assert sampler_cpu({3}, 3, core=pairs) is None            # one CPU: not pinned
    assert workload_cpus(7, set(range(8)), core=pairs) == {0, 1, 2, 4, 5, 6}
    assert workload_cpus(6, {2, 6}, core=pairs) == {2}
    assert workload_cpus(None, {0, 1}) == {0, 1}


def test_the_child_reads_the_counter_every_20_ms_staggered_and_reports_its_calls(child_sees_fake_nvml):
    sampler = ProcessSampler([ScriptedGpu(0), ScriptedGpu(1)], None, hz=100)
    sampler.start()
    time.sleep(0.5)
    sampler.stop()
    t0, t1 = sampler.traces
    read0 = [k for k, v in enumerate(t0.values["energy_mj"]) if v == v]
    read1 = [k for k, v in enumerate(t1.values["energy_mj"]) if v == v]
    assert read0 and read1 and {k % 2 for k in read0} == {0} and {k % 2 for k in read1} == {1}
    assert sum(v == v for v in t0.values["mem_used_bytes"]) <= len(t0.t_s) / 5 + 1
    stats = sampler.call_stats
    assert stats["ticks"] >= 30
    assert stats["calls"]["energy_mj"][0] == len(read0) + len(read1)
    assert stats["calls"]["power_w"][0] == len(t0.t_s) + len(t1.t_s)
    assert all(seconds >= 0 for _, seconds in stats["calls"].values())


def test_windows_place_the_counters_100_ms_steps_from_its_20_ms_reads(child_sees_fake_nvml):
    """The stepped counter updates at multiples of 0.1 s: where the child's reads place an edge, the
    span the integral covers starts and ends within half a read gap of a true update."""
    gpu = ChildCounterGpu(0, power_w=250.0)
    sampler = ProcessSampler([gpu], None, hz=100)
    sampler.start()
    placed = []
    try:
        for _ in range(3):
            start = read_edge([gpu], None, time.monotonic)
            time.sleep(0.35)
            end = read_edge([gpu], None, time.monotonic)
            assert sampler.wait_past(end.t_s + 0.03, timeout_s=1.0)
            lo, hi = sampler.tick_range(start.t_s, end.t_s)
            a, b = _counter_window(sampler, 0, 0, lo, hi, start, end)
            placed += [t for t, edge in ((a, start.t_s), (b, end.t_s)) if t != edge]
    finally:
        sampler.stop()
    assert len(placed) >= 4                       # scheduling may spoil an edge or two on a busy machine
    assert all(abs(t - round(t / 0.1) * 0.1) <= 0.015 for t in placed), placed
