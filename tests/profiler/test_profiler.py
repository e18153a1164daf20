"""The Profiler end to end with the real sampler thread and scripted GPUs."""

import csv
import random
import time

import pytest

from mmprof.profiler import Measurement, Profiler

from .fakes import ScriptedGpu


def _square_wave(gpu, seconds, high, low, half_s=0.04):
    t_end = time.monotonic() + seconds
    level = True
    while time.monotonic() < t_end:
        gpu.set_power_w(high if level else low)
        level = not level
        time.sleep(half_s)


def test_square_wave_counter_integral_and_idle():
    rng = random.Random()
    idle_w, high, low = rng.uniform(40, 90), rng.uniform(400, 650), rng.uniform(100, 200)
    gpu = ScriptedGpu(0, power_w=idle_w)
    with Profiler(device="cpu", sample_hz=200, idle_s=0.3, gpu_source=gpu, min_window_s=1.0) as prof:
        with prof.window("load") as w:
            _square_wave(gpu, 1.2, high, low)
        gpu.set_power_w(idle_w)
    m = w.measurement
    assert isinstance(m, Measurement)
    assert prof.idle_power_w == pytest.approx(idle_w, rel=0.02)
    assert m.energy_j == pytest.approx((high + low) / 2 * m.duration_s, rel=0.1)
    assert m.energy_integral_j == pytest.approx(m.energy_j, rel=0.03)
    assert m.energy_above_idle_j == pytest.approx(m.energy_j - prof.idle_power_w * m.duration_s)
    assert m.power_peak_w == pytest.approx(high)
    assert m.n_samples > 150 and m.n_power_updates >= 20
    assert not m.low_confidence
    assert prof.power_sources == {0: "instant"}


@pytest.mark.parametrize("instant", [True, False], ids=["instant-field", "power-usage-only"])
def test_idle_power_source(instant):
    """Instant power where it answers (the counter moves in coarse steps), else the counter."""
    gpu = ScriptedGpu(0, power_w=100.0, reading_scale=0.9, instant=instant)  # the sensor reads 10% low
    with Profiler(sample_hz=200, idle_s=0.3, gpu_source=gpu) as prof:
        with prof.window("w") as w:
            time.sleep(0.2)
    assert prof.idle_power_w == pytest.approx(90.0 if instant else 100.0, rel=0.01)
    assert w.measurement.power_avg_w == pytest.approx(90.0, rel=0.01)
    assert w.measurement.energy_j == pytest.approx(100.0 * w.measurement.duration_s, rel=0.01)


def test_counter_is_read_at_edges_and_every_fifth_tick():
    gpu = ScriptedGpu(0)
    with Profiler(sample_hz=500, idle_s=0.1, gpu_source=gpu) as prof:
        with prof.window("a") as w:
            time.sleep(0.2)
        ticks = len(prof._sampler.traces[0].t_s)
    # idle start/end and window start/end, plus the sampler's reads (one tick in five) to count updates
    assert gpu.energy_reads == 4 + (ticks + 4) // 5
    assert w.measurement.n_counter_updates >= 15   # ~20 reads in 0.2 s, every one a new value here


def test_average_power_fallback_and_reset_mid_window():
    gpu = ScriptedGpu(0, power_w=300.0, instant=False)
    with Profiler(sample_hz=200, idle_s=0, gpu_source=gpu) as prof:
        with prof.window("w") as w:
            time.sleep(0.15)
            gpu.reset()
            time.sleep(0.15)
    m = w.measurement
    assert prof.power_sources == {0: "average"}
    assert "nvmlDeviceGetPowerUsage" in m.note()
    assert m.energy_j == pytest.approx(m.energy_integral_j)
    assert m.energy_j == pytest.approx(300.0 * m.duration_s, rel=0.05)
    assert m.low_confidence  # short, and the power never changed
    assert m.energy_above_idle_j is None and "idle_s=0" in m.unavailable["energy_above_idle_j"]


def test_permission_denied_on_the_counter_keeps_everything_else():
    gpu = ScriptedGpu(0, power_w=200.0, deny=("energy",))
    with Profiler(sample_hz=200, idle_s=0.1, gpu_source=gpu) as prof:
        with prof.window("w") as w:
            time.sleep(0.2)
    m = w.measurement
    assert m.energy_j is None and "permission denied" in m.unavailable["energy_j"]
    assert m.energy_integral_j == pytest.approx(200.0 * m.duration_s, rel=0.05)
    assert prof.idle_power_w == pytest.approx(200.0)  # from the sampled power instead


def test_two_gpus_sum():
    gpus = [ScriptedGpu(0, power_w=100.0), ScriptedGpu(1, power_w=250.0)]
    with Profiler(sample_hz=200, idle_s=0, gpu_source=gpus) as prof:
        m, n = prof.repeat_until(lambda: time.sleep(0.01), min_s=0.3)
    assert set(m.energy_j_by_gpu) == {0, 1}
    assert m.energy_j == pytest.approx(350.0 * m.duration_s, rel=0.01)
    assert m.power_avg_w == pytest.approx(350.0, rel=0.02)
    assert m.duration_s >= 0.3 and n >= 10


def test_repeat_until_stops_at_max_repeats():
    calls = []
    with Profiler(sample_hz=100, idle_s=0, gpu_source=[]) as prof:
        m, n = prof.repeat_until(lambda: calls.append(1), min_s=10.0, max_repeats=37)
    assert n == 37 == len(calls)
    assert m.duration_s < 10.0


def test_windows_nest_and_misuse_is_refused():
    with Profiler(sample_hz=100, idle_s=0, gpu_source=ScriptedGpu(0)) as prof:
        prof.begin("outer")
        with prof.window("inner"):
            time.sleep(0.05)
        with pytest.raises(ValueError):
            prof.begin("outer")
        outer = prof.end("outer")
        with pytest.raises(ValueError):
            prof.end("outer")
    inner = prof.measurements[0]
    assert inner.name == "inner" and outer.name == "outer"
    assert outer.duration_s > inner.duration_s
    with pytest.raises(RuntimeError):
        Profiler().begin("x")


def test_window_body_error_still_closes_the_window():
    with Profiler(sample_hz=100, idle_s=0, gpu_source=ScriptedGpu(0)) as prof:
        with pytest.raises(KeyError):
            with prof.window("bad") as w:
                raise KeyError("boom")
        with prof.window("bad"):  # the name is free again
            pass
    assert w.measurement is not None and w.measurement.name == "bad"


def test_trace_and_phases_are_written(tmp_path):
    gpu = ScriptedGpu(0, power_w=123.0)
    path = tmp_path / "run" / "power_trace.csv"
    with Profiler(sample_hz=200, idle_s=0.1, trace_path=path, gpu_source=gpu) as prof:
        prof.mark("prefill")
        time.sleep(0.05)
        prof.mark("decode")
        with prof.window("decode-window"):
            time.sleep(0.1)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["t_s", "gpu", "power_w", "mem_used_gib", "gpu_util_pct", "mem_util_pct",
                             "sm_clock_mhz", "temp_c"]
    assert len(rows) > 30
    times = [float(r["t_s"]) for r in rows]
    assert times == sorted(times) and times[0] >= 0
    assert {float(r["power_w"]) for r in rows} == {123.0}
    assert float(rows[0]["mem_used_gib"]) == pytest.approx(3.0)
    with open(path.parent / "phases.csv") as f:
        phases = list(csv.DictReader(f))
    labels = [p["label"] for p in phases]
    assert labels == ["idle", "prefill", "decode", "decode-window"]
    for p in phases:
        assert float(p["t_end_s"]) >= float(p["t_start_s"])
    decode = phases[2]
    assert float(decode["t_end_s"]) >= float(phases[3]["t_end_s"])  # closed at exit


def test_cpu_device_without_gpu_still_measures_host():
    t0 = time.monotonic()
    with Profiler(device="cpu", idle_s=2.0) as prof:
        with prof.window("busy") as w:
            # long enough for the process CPU-time counter (10 ms ticks) to move
            end = time.process_time() + 0.15
            while time.process_time() < end:
                pass
    m = w.measurement
    assert time.monotonic() - t0 < 1.5  # no idle baseline is taken without a GPU
    assert m.energy_j is None and "no GPU selected" in m.unavailable["energy_j"]
    assert m.host_rss_peak_gib > 0 and m.cpu_util_pct > 0
    assert "peak_alloc_gib" in m.unavailable


def test_continuous_window_calls_back_to_back_and_reads_the_counter_twice():
    gpu = ScriptedGpu(0, power_w=120.0)
    calls = []
    with Profiler(sample_hz=0, idle_s=0, gpu_source=gpu, min_window_s=0.2) as prof:
        m, n = prof.continuous_window("w", lambda: calls.append(time.monotonic()), min_s=0.2)
        capped, k = prof.continuous_window("capped", lambda: None, min_s=10.0, max_calls=7)
    assert n == len(calls) > 100 and m.duration_s >= 0.2
    assert max(b - a for a, b in zip(calls, calls[1:])) < 0.05     # no gaps between calls
    assert gpu.energy_reads == 4                                   # two windows, two edges each
    assert m.energy_j == pytest.approx(120.0 * m.duration_s, rel=0.01)
    assert k == 7 and capped.low_confidence and "< 0.2 s" in capped.confidence_reasons[0]
