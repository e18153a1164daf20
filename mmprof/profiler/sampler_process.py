"""The sampling process: NVML sampled by a process of its own, so the workload's interpreter never waits.

A sampling thread in the measured process takes the interpreter lock at every reading, and a
launch-bound workload (batch-1 decoding, a Python loop of tiny kernels) waits for it each time
(2.9% slower at 100 Hz on an H200). `ProcessSampler` starts `sampler_child.py` as a separate Python
process at a lower priority, pinned to one CPU (`sampler_cpu`: the last one this process may use that
is not on the core the calling thread runs on); it opens its own NVML handles by the NVML indices of
the GPUs and appends binary records to a file that this process reads only when a window asks for its
samples (no thread of ours wakes at the sampling rate). Host RSS and the RAPL poll, which need no high
rate, stay on a 1 Hz thread here. The interface is Sampler's.

What each tick reads (`read_every`): NVML updates power and the energy counter about every 100 ms, so
reading faster buys only driver time. Power is read every tick; the energy counter (~4 ms a read on an
H200, the costliest call) every DENSE_COUNTER_S (20 ms: still within window.ALIGN_MAX_GAP_S, so windows
place the counter's updates and integrate power over the span it covers, and count every update);
memory used every 50 ms; utilisation, SM clock and temperature every 100 ms.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .gpu import GpuSource
from .host import HostSource
from .nvml import _REASONS, _unavailable
from .sampler import GPU_FIELDS, GpuTrace, Sampler, TraceReader, probe_power
from .sampler_child import FIELDS, RECORD

assert FIELDS == GPU_FIELDS
_CHILD = Path(__file__).with_name("sampler_child.py")
_RUN_CHILD = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"


DENSE_COUNTER_S = 0.02   # counter reads this far apart: within window.ALIGN_MAX_GAP_S (25 ms)
SPARSE_COUNTER_S = 0.05  # with more than 2 GPUs (their reads would not fit the ticks): updates counted only
MEMORY_S = 0.05
SLOW_S = 0.1
NICE = 10                # the sampling process yields to the workload where they share a CPU


class SamplerDidNotStart(RuntimeError):
    pass


def read_every(hz: float, n_gpus: int) -> dict[str, int]:
    """Ticks between reads of each field whose cadence is not every tick, at `hz` ticks a second."""
    def ticks(seconds: float) -> int:
        return max(1, int(round(seconds * hz)))

    counter = ticks(DENSE_COUNTER_S if n_gpus <= 2 else SPARSE_COUNTER_S)
    slow = dict.fromkeys(("gpu_util_pct", "mem_util_pct", "sm_clock_mhz", "temp_c"), ticks(SLOW_S))
    return {"energy_mj": counter, "mem_used_bytes": ticks(MEMORY_S), **slow}


def core_of(cpu: int) -> set[int]:
    """The logical CPUs that share cpu's physical core (SMT siblings), cpu itself included."""
    path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
    try:
        return _cpu_list(path.read_text()) | {cpu}
    except (OSError, ValueError):
        return {cpu}


def _cpu_list(text: str) -> set[int]:
    """'0-3,8,10-11' -> {0, 1, 2, 3, 8, 10, 11}"""
    out: set[int] = set()
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def current_cpu() -> int | None:
    """The CPU the calling thread is running on now (field 39 of /proc/thread-self/stat)."""
    try:
        stat = Path("/proc/thread-self/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        return None


def sampler_cpu(allowed: set[int], busy: int | None, core=core_of) -> int | None:
    """The CPU for the sampling process: the highest of `allowed` off the physical core of `busy`
    (the workload's CPU), else the highest other than `busy`, else None (one CPU: do not pin)."""
    if len(allowed) < 2:
        return None
    away = core(busy) if busy is not None else set()
    return max(allowed - away) if allowed - away else max(allowed - {busy})


def workload_cpus(sampler_at: int | None, allowed: set[int] | None = None, core=core_of) -> set[int]:
    """The CPUs of `allowed` (default: the calling thread's) off the sampling process's core."""
    allowed = set(os.sched_getaffinity(0)) if allowed is None else allowed
    if sampler_at is None:
        return allowed
    return (allowed - core(sampler_at)) or (allowed - {sampler_at}) or allowed


def _state(pid: int) -> str | None:
    """The process's state letter from /proc (T: stopped); None where unreadable."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _choose_cpu() -> int | None:
    try:
        return sampler_cpu(set(os.sched_getaffinity(0)), current_cpu())
    except (AttributeError, OSError):
        return None


class ProcessSampler(TraceReader):
    def __init__(self, gpus: list[GpuSource], host: HostSource | None, hz: float,
                 every: dict[str, int] | None = None, nice: int = NICE):
        if hz <= 0:
            raise ValueError("sample rate must be positive")
        self.gpus = gpus
        self.period_s = 1.0 / hz
        self.clock = time.monotonic
        self.traces = [GpuTrace(g.index) for g in gpus]
        self.error: BaseException | None = None
        self.cpu = _choose_cpu()
        self.every = read_every(hz, len(gpus)) | (every or {})
        self.call_stats: dict | None = None   # the child's NVML calls and their time, once stopped
        self._config = {"hz": hz, "every": self.every, "nice": nice,
                        "nvml_indices": [g.nvml_index for g in gpus], "cpu": self.cpu,
                        "permanent_codes": [c for c, (_, lasting) in _REASONS.items() if lasting]}
        self._host = Sampler([], host, hz=1.0, host_every=1) if host is not None else None
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="mmprof-sampler-")
        self._path = Path(self._dir.name) / "samples.bin"
        self._stderr_path = Path(self._dir.name) / "stderr.txt"
        self._offset = 0
        self._stderr_lines = 0
        self._stopped = False

    # ----- life -----
    def start(self, timeout_s: float = 10.0) -> None:
        sources = []
        for g, tr in zip(self.gpus, self.traces):
            source, reason = probe_power(g)
            tr.power_source = source
            if reason:
                tr.reasons["power_w"] = reason
            sources.append(source or "none")
        self._config.update(power_sources=sources, path=str(self._path),
                            stats_path=str(Path(self._dir.name) / "stats.json"))
        self._path.touch()
        with open(self._stderr_path, "w") as err:
            # run by path through runpy: its folder is not put on sys.path (it holds a trace.py)
            self._proc = subprocess.Popen([sys.executable, "-c", _RUN_CHILD, str(_CHILD), json.dumps(self._config)],
                                          stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout_s
        while not self._refresh():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                why = self._stderr_tail() or "no sample within the timeout"
                self.stop()
                raise SamplerDidNotStart(f"the sampling process did not start: {why}")
            time.sleep(0.01)
        if self._host is not None:
            self._host.start()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self.resume()   # a paused process could not see its stdin close
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._refresh()
        self._stopped = True
        stats = Path(self._dir.name) / "stats.json"
        if stats.exists() and self.call_stats is None:
            try:
                self.call_stats = json.loads(stats.read_text())
            except ValueError:
                pass
        self._dir.cleanup()   # every record is in the traces now
        if self._host is not None:
            self._host.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def pause(self, timeout_s: float = 0.1) -> None:
        """Stop the sampling process where it is (SIGSTOP; no samples until resume): lets a check
        time the same workload with and without sampling, interleaved, in one session. Returns once
        the process shows as stopped (an NVML call in flight finishes first), or after timeout_s."""
        if self.running:
            os.kill(self._proc.pid, signal.SIGSTOP)
            deadline = time.monotonic() + timeout_s
            while _state(self._proc.pid) not in ("T", "t", None) and time.monotonic() < deadline:
                time.sleep(0.0005)

    def resume(self) -> None:
        if self.running:
            os.kill(self._proc.pid, signal.SIGCONT)

    # ----- reading -----
    def _refresh(self) -> int:
        """Append the records written since the last call to the traces; returns how many."""
        if self._stopped:
            return 0
        with self._lock:
            with open(self._path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
            whole = len(data) - len(data) % RECORD.size
            self._offset += whole
            for (t, pos, *values) in RECORD.iter_unpack(data[:whole]):
                trace = self.traces[int(pos)]
                trace.t_s.append(t)
                for name, v in zip(GPU_FIELDS, values):
                    trace.values[name].append(v)
            self._read_reasons()
            if self._proc is not None and self._proc.poll() not in (None, 0) and self.error is None:
                self.error = RuntimeError(f"sampling process exited {self._proc.returncode}: {self._stderr_tail()}")
            return whole // RECORD.size

    def _read_reasons(self) -> None:
        lines = self._stderr_path.read_text().splitlines() if self._stderr_path.exists() else []
        for line in lines[self._stderr_lines:]:
            parts = line.split("\t")
            if len(parts) == 3 and parts[0].isdigit() and parts[2].lstrip("-").isdigit():
                pos, name = int(parts[0]), parts[1]
                why = _unavailable(int(parts[2]), f"GPU {self.traces[pos].gpu} {name}").reason
                self.traces[pos].reasons.setdefault(name, why)
        self._stderr_lines = len(lines)

    def _stderr_tail(self) -> str:
        text = self._stderr_path.read_text().strip() if self._stderr_path.exists() else ""
        return text.splitlines()[-1] if text else ""

    def wait_past(self, t_s: float, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            self._refresh()
            last = min((tr.t_s[-1] for tr in self.traces if len(tr.t_s)), default=-math.inf)
            if last > t_s or not self.running or time.monotonic() > deadline:
                return last > t_s
            time.sleep(min(self.period_s, 0.005))

    # ----- host, from the 1 Hz thread -----
    @property
    def rapl_poll_failures(self) -> list[tuple[float, str]]:
        return self._host.rapl_poll_failures if self._host else []

    def host_rss_max_bytes(self, start_s: float, end_s: float) -> float | None:
        return self._host.host_rss_max_bytes(start_s, end_s) if self._host else None
