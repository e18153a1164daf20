"""The in-process sampler: GPU power, memory, utilisation, clock, temperature and the energy counter.

A thread of the measured process. It is what the tests script (GpuSource objects live in this process)
and what the Profiler falls back to when the sampling process (sampler_process.py) cannot start; on
a real GPU the Profiler samples from that separate process, which never takes this interpreter's lock.

Each GPU reading is stamped on the host's monotonic clock. Power and memory used are read every tick;
the energy counter (one read costs ~4 ms on an H200) every `counter_every` ticks, only to count its
updates inside a window (windows read it at their edges for the energy itself); utilisation, SM clock
and temperature, which NVML updates far more slowly, every `slow_every` ticks (NaN in the other rows).
Host RSS is read every `host_every` ticks and RAPL is polled about once a second so its wrap-around is
never missed.
"""

from __future__ import annotations

import math
import threading
import time
from array import array
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field

from .gpu import GpuSource, Unavailable
from .host import HostSource

GPU_FIELDS = ("power_w", "mem_used_bytes", "gpu_util_pct", "mem_util_pct", "sm_clock_mhz", "temp_c", "energy_mj")
SLOW_FIELDS = {"gpu_util_pct", "mem_util_pct", "sm_clock_mhz", "temp_c"}
COUNTER_EVERY = 5  # ticks between counter reads: 20 Hz at 100 Hz, twice per ~100 ms counter update


@dataclass
class _Reader:
    names: tuple[str, ...]  # the fields one NVML call answers
    read: object  # () -> tuple of values; None once it failed for good
    every: int  # read every this many ticks
    missing: tuple[float, ...]  # NaN per field, for the ticks it is not read


@dataclass
class GpuTrace:
    """Samples of one GPU; every array has one entry per tick (NaN where the reading failed)."""

    gpu: int
    power_source: str | None = None  # "instant" | "average" | None
    reasons: dict[str, str] = field(default_factory=dict)  # field -> why it is not sampled
    t_s: array = field(default_factory=lambda: array("d"))
    values: dict[str, array] = field(default_factory=lambda: {f: array("d") for f in GPU_FIELDS})

    def rows(self, lo: int, hi: int) -> tuple[list[float], dict[str, list[float]]]:
        lo, hi = max(0, lo), min(len(self.t_s), hi)
        return list(self.t_s[lo:hi]), {f: list(v[lo:hi]) for f, v in self.values.items()}


def probe_power(gpu: GpuSource) -> tuple[str | None, str | None]:
    """Which power reading answers: ("instant" | "average" | None, reason when None or degraded)."""
    try:
        if gpu.power_instant_w() > 0:
            return "instant", None
        instant_reason = "instant power field reads 0 W"
    except Unavailable as exc:
        instant_reason = exc.reason
    try:
        gpu.power_usage_w()
    except Unavailable as exc:
        return None, f"{instant_reason}; {exc.reason}"
    return "average", f"{instant_reason}; using nvmlDeviceGetPowerUsage (may be a 1 s average)"


class TraceReader:
    """Reading stored ticks, shared by both samplers: `traces` (one GpuTrace per GPU) under `_lock`;
    `_refresh` first takes in what a sampler has not stored yet (nothing, for the thread)."""

    traces: list[GpuTrace]
    _lock: threading.Lock

    def _refresh(self) -> None:
        return None

    def tick_range(self, start_s: float, end_s: float) -> tuple[int, int]:
        """Ticks [lo, hi) whose first GPU reading lies in [start_s, end_s]; ticks align across GPUs."""
        self._refresh()
        with self._lock:
            if not self.traces:
                return 0, 0
            t = self.traces[0].t_s
            return bisect_left(t, start_s), bisect_right(t, end_s)

    def gpu_rows(self, pos: int, lo: int, hi: int) -> tuple[list[float], dict[str, list[float]]]:
        with self._lock:
            return self.traces[pos].rows(lo, hi)


class Sampler(TraceReader):
    def __init__(self, gpus: list[GpuSource], host: HostSource | None, hz: float,
                 clock=time.monotonic, host_every: int = 10, slow_every: int = 10,
                 counter_every: int = COUNTER_EVERY):
        if hz <= 0:
            raise ValueError("sample rate must be positive")
        self.host = host
        self.period_s = 1.0 / hz
        self.clock = clock
        self.host_every = host_every
        self.slow_every = max(1, slow_every)
        self.counter_every = max(1, counter_every)
        self.traces = [GpuTrace(g.index) for g in gpus]
        self.host_t_s: array = array("d")
        self.host_rss_bytes: array = array("d")
        self.rapl_poll_failures: list[tuple[float, str]] = []  # (time, reason) of RAPL polls that failed
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._tick = threading.Condition()
        self._last_t = -math.inf
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._readers = [self._make_readers(g, tr) for g, tr in zip(gpus, self.traces)]

    def _make_readers(self, gpu: GpuSource, trace: GpuTrace):
        source, reason = probe_power(gpu)
        trace.power_source = source
        if reason:
            trace.reasons["power_w"] = reason
        power = {"instant": gpu.power_instant_w, "average": gpu.power_usage_w}.get(source)
        reads = {
            ("power_w",): (lambda: (power(),)) if power else None,
            ("mem_used_bytes",): lambda: (gpu.memory_used_bytes(),),
            ("gpu_util_pct", "mem_util_pct"): gpu.utilization_pct,
            ("sm_clock_mhz",): lambda: (gpu.sm_clock_mhz(),),
            ("temp_c",): lambda: (gpu.temperature_c(),),
            ("energy_mj",): lambda: (gpu.energy_mj(),),
        }
        every = {"energy_mj": self.counter_every, **{f: self.slow_every for f in SLOW_FIELDS}}
        return [_Reader(names, read, every.get(names[0], 1), (math.nan,) * len(names))
                for names, read in reads.items()]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mmprof-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_past(self, t_s: float, timeout_s: float) -> bool:
        """Block until a tick stamped after t_s has been stored (True) or timeout_s passes."""
        with self._tick:
            self._tick.wait_for(lambda: self._last_t > t_s or not self.running, timeout_s)
            return self._last_t > t_s

    def host_rss_max_bytes(self, start_s: float, end_s: float) -> float | None:
        with self._lock:
            lo, hi = bisect_left(self.host_t_s, start_s), bisect_right(self.host_t_s, end_s)
            return max(self.host_rss_bytes[lo:hi]) if hi > lo else None

    def _run(self) -> None:
        try:
            n = 0
            next_t = self.clock()
            last_rapl = -math.inf
            while not self._stop.is_set():
                self._sample_gpus(n)
                if self.host is not None and n % self.host_every == 0:
                    last_rapl = self._sample_host(last_rapl)
                n += 1
                next_t += self.period_s
                delay = next_t - self.clock()
                if delay < 0:  # fell behind (a slow read or a descheduled thread): do not burst
                    next_t, delay = self.clock(), 0.0
                self._stop.wait(delay)
        except BaseException as exc:  # noqa: BLE001 - reported through Measurement notes
            self.error = exc
        finally:
            with self._tick:
                self._tick.notify_all()

    def tick(self, n: int) -> None:
        """Take the GPU readings of tick n now, as the thread does (tests drive it on a scripted clock)."""
        self._sample_gpus(n)

    def _sample_gpus(self, n: int) -> None:
        t_last = self._last_t
        for readers, trace in zip(self._readers, self.traces):
            t = self.clock()
            row: dict[str, float] = {}
            for r in readers:
                values = r.missing
                if r.read is not None and n % r.every == 0:
                    try:
                        values = r.read()
                    except Unavailable as exc:
                        if exc.permanent:
                            r.read = None
                            for name in r.names:
                                trace.reasons.setdefault(name, exc.reason)
                row.update(zip(r.names, (float(v) for v in values)))
            with self._lock:
                trace.t_s.append(t)
                for name in GPU_FIELDS:
                    trace.values[name].append(row[name])
            t_last = t
        with self._tick:
            self._last_t = t_last if self.traces else self.clock()
            self._tick.notify_all()

    def _sample_host(self, last_rapl: float) -> float:
        t = self.clock()
        rss = float(self.host.rss_bytes())
        with self._lock:
            self.host_t_s.append(t)
            self.host_rss_bytes.append(rss)
        if t - last_rapl >= 1.0 and self.host.rapl_reason is None:
            try:
                self.host.rapl_energy_j()
            except Unavailable as exc:  # a missed poll can miss a counter wrap: windows say so
                with self._lock:
                    self.rapl_poll_failures.append((t, exc.reason))
            return t
        return last_rapl
