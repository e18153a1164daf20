"""The Profiler: a sampling session with an idle baseline, named energy windows and phase marks.

    with Profiler(device="cuda:0", trace_path=run_dir / "power_trace.csv") as prof:
        prof.mark("prefill")
        with prof.window("decode") as w:
            ...
    print(w.measurement.energy_j)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .device import cuda_device, cuda_index, synchronize
from .gpu import GpuSource, NvmlUnavailable
from .host import HostSource
from .measurement import GIB, Measurement
from .nvml import NvmlGpu, open_gpus
from .row_energy import MIN_WINDOW_S, IdleReading
from .sampler import Sampler
from .sampler_process import ProcessSampler, SamplerDidNotStart
from .trace import Phase, write_phases, write_power_trace
from .window import Edge, GpuContext, build, read_edge



@dataclass
class WindowHandle:
    """What `with prof.window(name) as w` yields; `w.measurement` is set when the block ends."""

    name: str
    measurement: Measurement | None = None


@dataclass
class _Open:
    start: Edge
    peak_alloc_bytes: int = 0
    peak_reserved_bytes: int = 0


class Profiler:
    def __init__(self, device: str = "cpu", gpus: list[int] | None = None, sample_hz: float = 100.0,
                 idle_s: float = 2.0, trace_path: Path | str | None = None,
                 gpu_source: GpuSource | list[GpuSource] | None = None, host_source: HostSource | None = None,
                 clock: Callable[[], float] = time.monotonic, min_window_s: float = MIN_WINDOW_S,
                 sampler: str = "auto"):
        """sampler: "process" samples real NVML GPUs from a process of its own (sampler_process.py),
        "thread" from a thread of this one; "auto" is the process for NVML GPUs on the monotonic
        clock (the thread when that process cannot start), the thread otherwise."""
        if sample_hz < 0 or idle_s < 0 or min_window_s < 0:
            raise ValueError("sample_hz, idle_s and min_window_s must not be negative")
        if sampler not in ("auto", "process", "thread"):
            raise ValueError(f"sampler is auto | process | thread, not {sampler!r}")
        self.min_window_s = min_window_s
        self.sampler_mode = sampler
        self.sampler_note: str | None = None
        self.device = str(device)
        self.sample_hz = sample_hz
        self.idle_s = idle_s
        self.trace_path = Path(trace_path) if trace_path is not None else None
        self.clock = clock
        self.phases: list[Phase] = []
        self.measurements: list[Measurement] = []
        self._cuda = cuda_device(self.device)
        self._gpu_indices = gpus
        self._gpu_source = gpu_source
        self._host = host_source
        self._sampler: Sampler | ProcessSampler | None = None
        self._open: dict[str, _Open] = {}
        self._mark: tuple[str, float] | None = None
        self._ctx: GpuContext | None = None
        self._t0 = 0.0

    # ----- session -----
    def __enter__(self) -> Profiler:
        self._t0 = self.clock()
        gpus, reason = self._open_gpus()
        if self._host is None:
            self._host = HostSource()
        if self.sample_hz > 0:
            self._sampler = self._start_sampler(gpus)
        self._ctx = GpuContext(gpus, self._sampler, reason, None, "idle baseline skipped (idle_s=0)",
                               self.min_window_s)
        if not gpus:
            self._ctx.idle_reason = reason
        elif self.idle_s > 0:
            idle = self.measure_idle("idle")
            self._ctx.idle_power_w, self._ctx.idle_reason = idle.power_w, idle.reason
        return self

    def _start_sampler(self, gpus: list[GpuSource]) -> Sampler | ProcessSampler:
        real = bool(gpus) and all(isinstance(g, NvmlGpu) for g in gpus) and self.clock is time.monotonic
        if self.sampler_mode == "process" or (self.sampler_mode == "auto" and real):
            if self.clock is not time.monotonic or not gpus:
                raise ValueError("the sampling process needs GPUs and the monotonic clock")
            sampler = ProcessSampler(gpus, self._host, self.sample_hz)
            try:
                sampler.start()
                return sampler
            except SamplerDidNotStart as exc:
                if self.sampler_mode == "process":
                    raise
                self.sampler_note = f"sampled from a thread of this process: {exc}"
        sampler = Sampler(gpus, self._host, self.sample_hz, clock=self.clock)
        sampler.start()
        return sampler

    def __exit__(self, *exc) -> None:
        self.mark(None)
        if self._sampler is not None:
            self._sampler.stop()
        if self.trace_path is not None:
            path = self.trace_path if self.trace_path.suffix == ".csv" else self.trace_path / "power_trace.csv"
            write_power_trace(path, self._sampler.traces if self._sampler else [], self._t0)
            name = path.name.replace("power_trace", "phases") if "power_trace" in path.name else "phases.csv"
            write_phases(path.with_name(name), self.phases)

    def _open_gpus(self) -> tuple[list[GpuSource], str | None]:
        if self._gpu_source is not None:
            src = self._gpu_source
            return ([src] if isinstance(src, GpuSource) else list(src)), None
        indices = self._gpu_indices
        if indices is None:
            idx = cuda_index(self.device)
            indices = [] if idx is None else [idx]
        if not indices:
            return [], f"no GPU selected (device {self.device})"
        try:
            return open_gpus(indices), None
        except NvmlUnavailable as exc:
            return [], exc.reason

    def measure_idle(self, label: str = "idle", seconds: float | None = None) -> IdleReading:
        """Idle power over `seconds` (default idle_s) of waiting with the device synchronised.

        The session's baseline is the one taken on entering; runners take one before and after each
        row (row_energy.RowIdle). The counter moves in ~100 ms steps, +-5% of a 2 s idle window; the
        instant-power mean does not, so it is preferred; the counter next; a 1 s-average power last."""
        if self._ctx is None:
            raise RuntimeError("use the Profiler as a context manager before measuring idle power")
        if not self._ctx.gpus:
            return IdleReading(None, self._ctx.gpu_reason or "no GPU")
        seconds = self.idle_s if seconds is None else seconds
        if seconds <= 0:
            return IdleReading(None, f"idle baseline skipped (idle_s={seconds:g})")
        synchronize(self.device)
        start = read_edge(self._ctx.gpus, None, self.clock)
        while self.clock() - start.t_s < seconds:   # on the profiler's clock, which tests script
            time.sleep(min(0.05, max(1e-3, seconds - (self.clock() - start.t_s))))
        end = read_edge(self._ctx.gpus, None, self.clock)
        self._wait_for_samples(end.t_s)
        m = build(label, start, end, self._ctx, self._t0)
        self.phases.append(Phase(label, m.t_start_s, m.t_end_s))
        instant = self._sampler is not None and all(
            tr.power_source == "instant" for tr in self._sampler.traces)
        if instant and m.power_avg_w is not None:
            return IdleReading(m.power_avg_w)
        if m.energy_j is not None and m.duration_s > 0:
            return IdleReading(m.energy_j / m.duration_s)
        if m.power_avg_w is not None:
            return IdleReading(m.power_avg_w)
        return IdleReading(None, f"idle power unknown: {m.unavailable.get('energy_j', 'no GPU')}")

    # ----- facts about the session -----
    @property
    def idle_power_w(self) -> float | None:
        return self._ctx.idle_power_w if self._ctx else None

    @property
    def gpu_unavailable(self) -> str | None:
        """Why no GPU is measured (None when at least one is)."""
        return self._ctx.gpu_reason if self._ctx else None

    @property
    def sampler_kind(self) -> str | None:
        """"process" (sampler_process.py), "thread" (sampler.py) or None (not sampling)."""
        if self._sampler is None:
            return None
        return "process" if isinstance(self._sampler, ProcessSampler) else "thread"

    @property
    def sampler(self) -> Sampler | ProcessSampler | None:
        """The running sampler (scripts/profiler_check.py pauses the sampling process with it)."""
        return self._sampler

    @property
    def power_sources(self) -> dict[int, str | None]:
        """GPU index -> "instant" | "average" | None (not sampled)."""
        return {tr.gpu: tr.power_source for tr in self._sampler.traces} if self._sampler else {}

    # ----- phases -----
    def mark(self, label: str | None) -> None:
        """End the current marked phase (if any) and start one called `label` (None: start none)."""
        now = self.clock() - self._t0
        if self._mark is not None:
            self.phases.append(Phase(self._mark[0], self._mark[1], now))
        self._mark = (label, now) if label is not None else None

    # ----- windows -----
    def begin(self, name: str) -> None:
        if self._ctx is None:
            raise RuntimeError("use the Profiler as a context manager before opening windows")
        if name in self._open:
            raise ValueError(f"window {name!r} is already open")
        synchronize(self.device)
        self._fold_cuda_peaks()
        if self._cuda is not None:
            torch.cuda.reset_peak_memory_stats(self._cuda)
        self._open[name] = _Open(read_edge(self._ctx.gpus, self._host, self.clock))

    def end(self, name: str) -> Measurement:
        if name not in self._open:
            raise ValueError(f"window {name!r} is not open")
        synchronize(self.device)
        end = read_edge(self._ctx.gpus, self._host, self.clock)
        self._fold_cuda_peaks()
        state = self._open.pop(name)
        self._wait_for_samples(end.t_s)
        m = build(name, state.start, end, self._ctx, self._t0)
        if self.sampler_note:
            m.notes.append(self.sampler_note)
        if self._cuda is not None:
            m.peak_alloc_gib = state.peak_alloc_bytes / GIB
            m.peak_reserved_gib = state.peak_reserved_bytes / GIB
        else:
            reason = f"no CUDA allocator on device {self.device}"
            m.unavailable.update(peak_alloc_gib=reason, peak_reserved_gib=reason)
        self.phases.append(Phase(name, m.t_start_s, m.t_end_s))
        self.measurements.append(m)
        return m

    @contextmanager
    def window(self, name: str) -> Iterator[WindowHandle]:
        handle = WindowHandle(name)
        self.begin(name)
        try:
            yield handle
        except BaseException:
            try:
                handle.measurement = self.end(name)
            except Exception:  # noqa: BLE001 - the body's error is the one to report
                self._open.pop(name, None)
            raise
        handle.measurement = self.end(name)

    def continuous_window(self, name: str, fn: Callable[[], object], min_s: float,
                          max_calls: int | None = None, lead_in_s: float = 0.0) -> tuple[Measurement, int]:
        """One window of fn called back to back until the host clock says min_s has passed (or
        max_calls were made): no synchronisation and no counter read between calls, so on a GPU the
        queue never drains and the window is the steady state; its end edge waits for the device, so
        the window lasts at least min_s. Returns the window and the number of calls.

        lead_in_s: fn is first called (device synchronised after each call) for that long outside
        the window, so the window opens on a device already at its working power, not on the idle
        or the gap before it (the power reading and the counter both lag a change of load by up to
        one ~100 ms update)."""
        if max_calls is not None and max_calls < 1:
            raise ValueError("max_calls must be at least 1")
        t_lead = self.clock()
        while lead_in_s > 0 and self.clock() - t_lead < lead_in_s:
            fn()
            synchronize(self.device)
        n = 0
        with self.window(name) as w:
            t_start = self.clock()
            while True:
                fn()
                n += 1
                if self.clock() - t_start >= min_s or (max_calls is not None and n >= max_calls):
                    break
        return w.measurement, n

    def repeat_until(self, fn: Callable[[], object], min_s: float = 1.0, max_repeats: int = 1000,
                     name: str = "repeat") -> tuple[Measurement, int]:
        """Call fn repeatedly inside one window until the window lasts at least min_s."""
        with self.window(name) as w:
            t_start, n, batch = self.clock(), 0, 1
            while True:
                for _ in range(batch):
                    fn()
                n += batch
                synchronize(self.device)
                elapsed = self.clock() - t_start
                if elapsed >= min_s or n >= max_repeats:
                    break
                per_call = max(elapsed / n, 1e-9)
                batch = min(max_repeats - n, max(1, math.ceil(1.05 * (min_s - elapsed) / per_call)))
        return w.measurement, n

    # ----- internals -----
    def _fold_cuda_peaks(self) -> None:
        """Fold the allocator's peak into every open window before anything resets it."""
        if self._cuda is None or not self._open:
            return
        alloc = torch.cuda.max_memory_allocated(self._cuda)
        reserved = torch.cuda.max_memory_reserved(self._cuda)
        for st in self._open.values():
            st.peak_alloc_bytes = max(st.peak_alloc_bytes, alloc)
            st.peak_reserved_bytes = max(st.peak_reserved_bytes, reserved)

    def _wait_for_samples(self, t_s: float) -> None:
        """Let the sampler take one tick past the window's end, so the integral has both edges."""
        if self._sampler is not None and self._sampler.running and self._ctx.gpus:
            self._sampler.wait_past(t_s, timeout_s=3 * self._sampler.period_s + 0.05)
