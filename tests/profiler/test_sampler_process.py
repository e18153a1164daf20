"""The sampling process end to end on the CPU, with a scripted pynvml on the child's PYTHONPATH."""

import os
import time
from pathlib import Path

import pytest

from mmprof.profiler.sampler_process import ProcessSampler, SamplerDidNotStart
from mmprof.profiler.window import GpuContext, build, read_edge

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
