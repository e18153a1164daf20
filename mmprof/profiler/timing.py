"""Timing a function: warm-up, then repeats timed with CUDA events on GPU, the host clock elsewhere."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .device import cuda_device, synchronize


@dataclass
class TimingStats:
    median_s: float
    iqr_s: float
    n: int
    samples_s: list[float]

    @classmethod
    def of(cls, samples_s: list[float]) -> TimingStats:
        if not samples_s:
            raise ValueError("no timing samples")
        if len(samples_s) == 1:
            return cls(samples_s[0], 0.0, 1, list(samples_s))
        q1, _, q3 = statistics.quantiles(samples_s, n=4, method="inclusive")
        return cls(statistics.median(samples_s), q3 - q1, len(samples_s), list(samples_s))


def time_fn(fn: Callable[[], object], *, warmup: int, repeats: int, device: str) -> TimingStats:
    """Median and IQR of `repeats` calls of fn after `warmup` untimed calls."""
    if repeats < 1 or warmup < 0:
        raise ValueError("need repeats >= 1 and warmup >= 0")
    for _ in range(warmup):
        fn()
    cuda = cuda_device(device)
    if cuda is not None:
        return TimingStats.of(_time_cuda(fn, repeats, cuda))
    samples = []
    synchronize(device)
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - t0)
    return TimingStats.of(samples)


def _time_cuda(fn: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Events on the current stream around each call; one synchronise at the end."""
    with torch.cuda.device(device):
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1000.0 for start, end in events]
