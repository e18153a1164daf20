"""The one timer: marks on a CUDA stream (CUDA events) on a GPU, the host clock elsewhere.

`Timer(device)` records a mark per call of `mark()` and gives the intervals between consecutive
marks once the device has finished; `time_fn` times repeats of a function with it.
"""

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

    @property
    def min_s(self) -> float:
        """The fastest sample: a benchmark's best case (its floor under noise)."""
        return min(self.samples_s)

    @classmethod
    def of(cls, samples_s: list[float]) -> TimingStats:
        if not samples_s:
            raise ValueError("no timing samples")
        if len(samples_s) == 1:
            return cls(samples_s[0], 0.0, 1, list(samples_s))
        q1, _, q3 = statistics.quantiles(samples_s, n=4, method="inclusive")
        return cls(statistics.median(samples_s), q3 - q1, len(samples_s), list(samples_s))


class Timer:
    """Marks in the order of the work queued on `device`: a CUDA event recorded on the current
    stream of a CUDA device (no host wait), `time.perf_counter()` elsewhere (the caller synchronises).

    `mark()` returns the mark (an event can be waited on); `intervals_s()` waits for the device and
    returns the time between consecutive marks."""

    def __init__(self, device: str | torch.device):
        self.cuda = cuda_device(device)
        self.device = device
        self.marks: list = []

    def mark(self):
        if self.cuda is not None:
            mark = torch.cuda.Event(enable_timing=True)
            mark.record(torch.cuda.current_stream(self.cuda))
        else:
            mark = time.perf_counter()
        self.marks.append(mark)
        return mark

    def intervals_s(self) -> list[float]:
        if self.cuda is not None:
            torch.cuda.synchronize(self.cuda)
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]

    def total_s(self) -> float:
        """From the first mark to the last."""
        return sum(self.intervals_s())


def time_fn(fn: Callable[[], object], *, warmup: int, repeats: int, device: str) -> TimingStats:
    """Median and IQR of `repeats` calls of fn after `warmup` untimed calls."""
    if repeats < 1 or warmup < 0:
        raise ValueError("need repeats >= 1 and warmup >= 0")
    for _ in range(warmup):
        fn()
    timer = Timer(device)
    synchronize(device)
    if timer.cuda is not None:  # events on the current stream around each call; one wait at the end
        with torch.cuda.device(timer.cuda):
            pairs = []
            for _ in range(repeats):
                start = timer.mark()
                fn()
                pairs.append((start, timer.mark()))
            torch.cuda.synchronize(timer.cuda)
            return TimingStats.of([a.elapsed_time(b) / 1e3 for a, b in pairs])
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - t0)
    return TimingStats.of(samples)
