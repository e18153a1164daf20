"""Measurements built from scripted edges and scripted power traces with known integrals."""

import math
import random

import pytest

from mmprof.profiler.sampler import GPU_FIELDS, Sampler
from mmprof.profiler.window import Edge, GpuContext, build

from .fakes import ScriptedGpu

TICK_S = 0.01


def _sampler(gpus, ts, powers):
    s = Sampler(gpus, None, hz=1 / TICK_S)
    for trace, ps in zip(s.traces, powers):
        for t, p in zip(ts, ps):
            trace.t_s.append(t)
            for f in GPU_FIELDS:
                trace.values[f].append(p if f == "power_w" else (2.0 * 2**30 if f == "mem_used_bytes" else
                                       math.nan if f == "energy_mj" else 1.0))   # counter not sampled
    return s


def _blocky_power(rng, n, block=10):
    """Power that changes every `block` samples, like NVML's ~100 ms updates read at 100 Hz."""
    levels = [rng.uniform(80, 650) for _ in range(n // block + 1)]
    return [levels[k // block] for k in range(n)]


def _trapezoid(ts, ps, a, b):
    pts = [(t, p) for t, p in zip(ts, ps) if a <= t <= b]
    return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(pts, pts[1:]))


def _ctx(gpus, sampler, idle=None):
    return GpuContext(gpus, sampler, None, idle, None if idle is not None else "skipped")


def test_window_integral_average_peak_and_counts_are_exact():
    rng = random.Random()
    gpus = [ScriptedGpu(0), ScriptedGpu(1)]
    ts = [k * TICK_S for k in range(400)]
    powers = [_blocky_power(rng, len(ts)), _blocky_power(rng, len(ts))]
    s = _sampler(gpus, ts, powers)
    a, b = ts[rng.randint(10, 50)], ts[rng.randint(300, 390)]
    start = Edge(a, energy_mj={0: 1000, 1: 2000})
    end = Edge(b, energy_mj={0: 1000 + 123_456, 1: 2000 + 654_321})
    m = build("w", start, end, _ctx(gpus, s), t0_s=0.0)
    want = [_trapezoid(ts, p, a, b) for p in powers]
    assert m.energy_integral_j == pytest.approx(sum(want), rel=1e-9)
    assert m.power_avg_w == pytest.approx(sum(want) / (b - a), rel=1e-9)
    inside = [k for k, t in enumerate(ts) if a <= t <= b]
    assert m.n_samples == len(inside)
    assert m.power_peak_w == pytest.approx(max(powers[0][k] + powers[1][k] for k in inside))
    runs = [len({powers[g][k] for k in inside}) for g in range(2)]  # levels are distinct random floats
    assert m.n_power_updates == min(runs)
    assert m.energy_j_by_gpu == {0: pytest.approx(123.456), 1: pytest.approx(654.321)}
    assert m.energy_j == pytest.approx(123.456 + 654.321)
    assert m.nvml_mem_used_gib == pytest.approx(2.0)
    assert m.duration_s == pytest.approx(b - a)


def test_window_edges_between_samples_interpolate():
    gpus = [ScriptedGpu(0)]
    ts = [0.0, 1.0, 2.0, 3.0]
    s = _sampler(gpus, ts, [[100.0, 200.0, 200.0, 100.0]])
    m = build("w", Edge(0.5, energy_mj={0: 0}), Edge(2.5, energy_mj={0: 1}), _ctx(gpus, s), 0.0)
    # 0.5..1: 150->200 (87.5 J), 1..2: 200 J, 2..2.5: 200->150 (87.5 J)
    assert m.energy_integral_j == pytest.approx(375.0)


def test_counter_reset_falls_back_to_the_power_integral():
    rng = random.Random()
    gpus = [ScriptedGpu(0), ScriptedGpu(1)]
    ts = [k * TICK_S for k in range(300)]
    powers = [[rng.uniform(100, 300)] * 300, [rng.uniform(100, 300)] * 300]
    s = _sampler(gpus, ts, powers)
    start = Edge(0.5, energy_mj={0: 10_000, 1: 9_000_000})
    end = Edge(2.5, energy_mj={0: 10_000 + 400_000, 1: 1_234})  # GPU 1 was reset in between
    m = build("w", start, end, _ctx(gpus, s), 0.0)
    assert m.energy_j_by_gpu[0] == pytest.approx(400.0)
    assert m.energy_j_by_gpu[1] == pytest.approx(powers[1][0] * 2.0)
    assert m.energy_j == pytest.approx(400.0 + powers[1][0] * 2.0)
    assert "went backwards" in m.note()


def test_counter_unsupported_leaves_energy_empty_with_reason():
    gpus = [ScriptedGpu(0)]
    s = _sampler(gpus, [k * TICK_S for k in range(300)], [[250.0] * 300])
    reason = "GPU 0 energy counter: not supported on this GPU or driver"
    m = build("w", Edge(0.2, energy_reason={0: reason}), Edge(2.2, energy_reason={0: reason}),
              _ctx(gpus, s, idle=50.0), 0.0)
    assert m.energy_j is None and m.energy_j_by_gpu == {}
    assert "not supported" in m.unavailable["energy_j"]
    assert m.energy_integral_j == pytest.approx(500.0)
    assert m.energy_above_idle_j == pytest.approx(500.0 - 50.0 * 2.0)


@pytest.mark.parametrize("duration_s, block, flagged", [
    (0.5, 10, True),     # short window
    (6.0, 10, False),    # 6 s of 100 ms counter updates: 60 updates
    (6.0, 1000, True),   # long, but the counter never updated inside it
])
def test_low_confidence_flag(duration_s, block, flagged):
    rng = random.Random()
    gpus = [ScriptedGpu(0)]
    ts = [k * TICK_S for k in range(int(duration_s / TICK_S) + 20)]
    power = _blocky_power(rng, len(ts), 10)
    s = _sampler(gpus, ts, [power])
    s.traces[0].values["energy_mj"] = type(s.traces[0].t_s)("d", [float(k // block) for k in range(len(ts))])
    a, b = 0.05, 0.05 + duration_s
    counter_mj = round(1000 * _trapezoid(ts, power, a, b))   # the counter agrees with the integral
    m = build("w", Edge(a, energy_mj={0: 0}), Edge(b, energy_mj={0: counter_mj}),
              GpuContext(gpus, s, None, None, "skipped", 5.0), 0.0)
    assert m.low_confidence is flagged, m.confidence_reasons
    assert m.row()["low_confidence"] == int(flagged)


def test_idle_power_is_subtracted():
    rng = random.Random()
    idle_w, dur = rng.uniform(40, 120), rng.uniform(1.0, 3.0)
    energy_mj = int(rng.uniform(300, 600) * dur * 1000)
    gpus = [ScriptedGpu(0)]
    s = _sampler(gpus, [k * TICK_S for k in range(400)], [[300.0] * 400])
    m = build("w", Edge(0.1, energy_mj={0: 7}), Edge(0.1 + dur, energy_mj={0: 7 + energy_mj}),
              _ctx(gpus, s, idle=idle_w), 0.0)
    assert m.idle_power_w == idle_w
    assert m.energy_above_idle_j == pytest.approx(energy_mj / 1000 - idle_w * dur)


def test_no_gpu_gives_empty_power_fields_with_the_reason():
    ctx = GpuContext([], None, "NVML init: the NVIDIA driver is not loaded", None, "no GPU")
    m = build("w", Edge(0.0), Edge(1.5), ctx, 0.0)
    for key in ("energy_j", "energy_integral_j", "power_avg_w", "power_peak_w", "nvml_mem_used_gib"):
        assert getattr(m, key) is None
        assert "driver is not loaded" in m.unavailable[key]
    row = m.row()
    assert row["power_avg_w"] is None and row["energy_window_s"] == pytest.approx(1.5)
    assert math.isfinite(row["energy_window_s"])


def test_row_keys_are_the_schema_columns():
    from mmprof.results import schema

    want = set(schema._POWER) | set(schema._MEMORY) | set(schema._HOST)
    assert set(build("w", Edge(0.0), Edge(1.0), GpuContext([], None, "x", None, "x"), 0.0).row()) == want
