"""Scripted sources for tests: a GPU whose power the test sets, with an exact energy counter."""

from __future__ import annotations

import threading
import time

from mmprof.profiler import GpuSource, NvmlUnavailable


class ScriptedGpu(GpuSource):
    """Power is whatever the test last set; the counter integrates it exactly (mJ, since creation).

    instant=False makes the instant field unsupported (the sampler must fall back to power usage);
    counter=False makes the energy counter unsupported; reset() restarts the counter from 0 like a
    driver reload; deny names readings that raise 'permission denied'; reading_scale makes the power
    readings differ from the true power the counter integrates (a sensor that reads low or high).
    """

    def __init__(self, index: int = 0, power_w: float = 100.0, *, instant: bool = True, counter: bool = True,
                 offset_mj: int = 5_000_000, mem_used_bytes: int = 3 * 2**30, deny: tuple[str, ...] = (),
                 reading_scale: float = 1.0, clock=time.monotonic):
        self.index = index
        self.nvml_index = index
        self.clock = clock
        self.instant = instant
        self.counter = counter
        self.deny = deny
        self.mem_used = mem_used_bytes
        self.reading_scale = reading_scale
        self._lock = threading.Lock()
        self._power = power_w
        self._t = clock()
        self._energy_j = offset_mj / 1000.0
        self.energy_reads = 0

    def set_power_w(self, watts: float) -> None:
        with self._lock:
            self._advance()
            self._power = watts

    def reset(self) -> None:
        with self._lock:
            self._advance()
            self._energy_j = 0.0

    def _advance(self) -> None:
        now = self.clock()
        self._energy_j += self._power * (now - self._t)
        self._t = now

    def _check(self, what: str) -> None:
        if what in self.deny:
            raise NvmlUnavailable(f"GPU {self.index} {what}: permission denied")

    def name(self) -> str:
        return "Scripted GPU"

    def uuid(self) -> str:
        return f"GPU-0000000{self.index}-aaaa-bbbb-cccc-dddddddddddd"

    def driver_version(self) -> str:
        return "999.1"

    def power_instant_w(self) -> float:
        self._check("power")
        if not self.instant:
            raise NvmlUnavailable(f"GPU {self.index} instant power field: not supported on this GPU or driver")
        return self._power * self.reading_scale

    def power_usage_w(self) -> float:
        self._check("power")
        return self._power * self.reading_scale

    def energy_mj(self) -> int:
        self._check("energy")
        if not self.counter:
            raise NvmlUnavailable(f"GPU {self.index} energy counter: not supported on this GPU or driver")
        with self._lock:
            self._advance()
            self.energy_reads += 1
            return int(round(self._energy_j * 1000.0))

    def memory_used_bytes(self) -> int:
        self._check("memory")
        return self.mem_used

    def memory_total_bytes(self) -> int:
        return 80 * 2**30

    def utilization_pct(self) -> tuple[float, float]:
        return 50.0, 20.0

    def sm_clock_mhz(self) -> float:
        return 1980.0

    def temperature_c(self) -> float:
        return 45.0

    def power_limit_w(self) -> float:
        return 700.0


class SteppedGpu(ScriptedGpu):
    """NVML as an H200 shows it: the energy counter and the power reading change only every
    `update_s` (100 ms). At each update the counter adds the exact energy of the period just ended,
    and the power reading becomes the mean power of only the last `sampled_fraction` of that period
    (NVML samples power part of the time: Yang et al., 2024, about 25% on A100/H100). The true power
    is `power_at(t)` on the given clock; `updates` counts the updates so far.
    """

    def __init__(self, power_at, clock, *, update_s: float = 0.1, sampled_fraction: float = 0.25,
                 index: int = 0, offset_mj: int = 5_000_000):
        super().__init__(index=index, power_w=power_at(clock()), offset_mj=offset_mj, clock=clock)
        self.power_at = power_at
        self.update_s = update_s
        self.sampled_fraction = sampled_fraction
        self._next = clock() + update_s
        self._reading = power_at(clock())
        self.updates = 0

    def _integral_j(self, a: float, b: float, step_s: float = 1e-3) -> float:
        n = max(1, round((b - a) / step_s))
        h = (b - a) / n
        return sum(self.power_at(a + (k + 0.5) * h) for k in range(n)) * h

    def _advance(self) -> None:
        now = self.clock()
        while self._next <= now:
            end = self._next
            self._energy_j += self._integral_j(end - self.update_s, end)
            seen_s = self.sampled_fraction * self.update_s
            self._reading = self._integral_j(end - seen_s, end) / seen_s
            self._next += self.update_s
            self.updates += 1

    def set_power_w(self, watts: float) -> None:
        raise TypeError("a SteppedGpu's power is its power_at(t)")

    def power_instant_w(self) -> float:
        with self._lock:
            self._advance()
            return self._reading

    def power_usage_w(self) -> float:
        return self.power_instant_w()


class ScriptedClock:
    """A clock the test moves: `clock()` reads it, `advance(s)` moves it on."""

    def __init__(self, t_s: float = 1000.0):
        self.t_s = t_s

    def __call__(self) -> float:
        return self.t_s

    def advance(self, seconds: float) -> None:
        self.t_s += seconds
