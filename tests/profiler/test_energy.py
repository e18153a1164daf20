"""The arithmetic behind the power integral, on fresh random traces with known integrals."""

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmprof.profiler.energy import count_updates, integrate_power_j, sum_by_index
from mmprof.profiler.host import unwrap_delta


def test_constant_power_integrates_to_power_times_time():
    rng = random.Random()
    watts = rng.uniform(50, 700)
    ts = sorted(rng.uniform(0, 10) for _ in range(50))
    a, b = rng.uniform(-1, 5), rng.uniform(5, 12)  # edges inside and beyond the samples
    assert integrate_power_j(ts, [watts] * len(ts), a, b) == pytest.approx(watts * (b - a), rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1e3), st.floats(0, 1e3)), min_size=2, max_size=30),
       st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_linear_interpolant_integral_matches_fine_riemann_sum(points, fa, fb):
    ts = sorted({round(t, 6) for t, _ in points})
    if len(ts) < 2:
        return
    ps = [p for _, p in points][: len(ts)]
    lo, hi = ts[0] - 1.0, ts[-1] + 1.0
    a = lo + (hi - lo) * min(fa, fb)
    b = lo + (hi - lo) * max(fa, fb)

    def curve(t):
        if t <= ts[0]:
            return ps[0]
        if t >= ts[-1]:
            return ps[-1]
        k = next(i for i in range(1, len(ts)) if ts[i] >= t)
        return ps[k - 1] + (ps[k] - ps[k - 1]) * (t - ts[k - 1]) / (ts[k] - ts[k - 1])

    # exact: trapezoid over the curve's own breakpoints
    knots = sorted({a, b, *[t for t in ts if a < t < b]})
    exact = sum((y - x) * (curve(x) + curve(y)) / 2 for x, y in zip(knots, knots[1:]))
    assert integrate_power_j(ts, ps, a, b) == pytest.approx(exact, rel=1e-9, abs=1e-6)


def test_sampled_square_wave_recovers_its_energy():
    rng = random.Random()
    period_s = 0.001  # 1 kHz samples of a stepwise signal, like NVML power read at high rate
    # half-periods a whole number of samples long: every step then falls at the same place between
    # two samples, and the trapezoid's errors at rising and falling steps cancel in pairs (at random
    # lengths they add up like a random walk and can pass the bound below with a correct integral)
    high, low, half = rng.uniform(300, 700), rng.uniform(50, 150), rng.randint(80, 200) * period_s
    ts = [k * period_s + 1e-4 for k in range(int(5.0 / period_s))]
    ps = [high if int(t / half) % 2 == 0 else low for t in ts]
    end = ts[-1]
    n_half, rest = int(end / half), end % half
    exact = sum(high if k % 2 == 0 else low for k in range(n_half)) * half
    exact += rest * (high if n_half % 2 == 0 else low)
    assert integrate_power_j(ts, ps, 0.0, end) == pytest.approx(exact, rel=2e-3)


def test_nan_samples_are_skipped_and_nothing_gives_none():
    assert integrate_power_j([0.0, 1.0, 2.0], [100.0, math.nan, 100.0], 0.0, 2.0) == pytest.approx(200.0)
    assert integrate_power_j([], [], 0.0, 1.0) is None
    assert integrate_power_j([0.0], [math.nan], 0.0, 1.0) is None
    assert integrate_power_j([0.0, 1.0], [5.0, 5.0], 1.0, 1.0) == 0.0


def test_count_updates_counts_runs_of_equal_readings():
    rng = random.Random()
    runs = [rng.uniform(50, 500) for _ in range(rng.randint(1, 30))]
    values = [v for v in runs for _ in range(rng.randint(1, 10))]
    distinct_runs = 1 + sum(1 for x, y in zip(runs, runs[1:]) if x != y)
    assert count_updates(values) == distinct_runs
    assert count_updates([1.0, math.nan, 1.0, 2.0]) == 2
    assert count_updates([]) == 0


def test_sum_by_index_adds_gpus_tick_by_tick():
    assert sum_by_index([[1.0, 2.0], [10.0, math.nan]])[0] == 11.0
    assert math.isnan(sum_by_index([[1.0, 2.0], [10.0, math.nan]])[1])
    assert sum_by_index([]) == []


def test_unwrap_delta_handles_one_wrap():
    rng = random.Random()
    max_range = rng.randint(10**9, 10**12)
    start = rng.randint(0, max_range - 1)
    step = rng.randint(1, max_range - 1)
    end = (start + step) % max_range
    assert unwrap_delta(start, end, max_range) == step
