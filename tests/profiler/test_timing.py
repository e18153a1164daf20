"""time_fn and TimingStats on the host clock."""

import random
import statistics
import time

import pytest

from mmprof.profiler import TimingStats, time_fn


def test_stats_of_fresh_samples():
    rng = random.Random()
    samples = [rng.uniform(0.001, 1.0) for _ in range(rng.randint(5, 50))]
    s = TimingStats.of(samples)
    ordered = sorted(samples)

    def quantile(q):  # linear interpolation between order statistics
        pos = q * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    assert s.median_s == pytest.approx(statistics.median(samples))
    assert s.iqr_s == pytest.approx(quantile(0.75) - quantile(0.25))
    assert s.n == len(samples) and s.samples_s == samples
    assert TimingStats.of([0.5]).iqr_s == 0.0
    assert TimingStats.of([0.3, 0.1, 0.2]).min_s == 0.1
    with pytest.raises(ValueError):
        TimingStats.of([])


def test_time_fn_warms_up_then_times_each_repeat():
    calls = []
    delay = random.uniform(0.01, 0.02)

    def fn():
        calls.append(time.perf_counter())
        time.sleep(delay)

    s = time_fn(fn, warmup=2, repeats=5, device="cpu")
    assert len(calls) == 7 and s.n == 5
    assert delay <= s.median_s < delay + 0.02
    assert all(x >= delay for x in s.samples_s)
    with pytest.raises(ValueError):
        time_fn(fn, warmup=0, repeats=0, device="cpu")
