"""The sampling process: NVML sampled by a process of its own, so the workload's interpreter never waits.

A sampling thread in the measured process takes the interpreter lock at every reading, and a
launch-bound workload (batch-1 decoding, a Python loop of tiny kernels) waits for it each time
(2.9% slower at 100 Hz on an H200). `ProcessSampler` starts `sampler_child.py` as a separate Python
process pinned to one CPU (the last one this process may use); it opens its own NVML handles by the
NVML indices of the GPUs and appends binary records to a file that this process reads only when a
window asks for its samples (no thread of ours wakes at the sampling rate). Host RSS and the RAPL
poll, which need no high rate, stay on a 1 Hz thread here. The interface is Sampler's.
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
from .sampler import COUNTER_EVERY, GPU_FIELDS, GpuTrace, Sampler, TraceReader, probe_power
from .sampler_child import FIELDS, RECORD

assert FIELDS == GPU_FIELDS
_CHILD = Path(__file__).with_name("sampler_child.py")
_RUN_CHILD = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"


class SamplerDidNotStart(RuntimeError):
    pass


def _last_cpu() -> int | None:
    try:
        return max(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


class ProcessSampler(TraceReader):
    def __init__(self, gpus: list[GpuSource], host: HostSource | None, hz: float, slow_every: int = 10,
                 counter_every: int | None = None):
        # the counter every tick for up to 2 GPUs (its ~4 ms read is the child's time, not the
        # workload's): windows place the counter's ~100 ms updates that finely and integrate power
        # over the span it covers; more GPUs would not fit a 10 ms tick, and read it every 5th
        if counter_every is None:
            counter_every = 1 if len(gpus) <= 2 else COUNTER_EVERY
        if hz <= 0:
            raise ValueError("sample rate must be positive")
        self.gpus = gpus
        self.period_s = 1.0 / hz
        self.clock = time.monotonic
        self.traces = [GpuTrace(g.index) for g in gpus]
        self.error: BaseException | None = None
        self.cpu = _last_cpu()
        self._config = {"hz": hz, "slow_every": max(1, slow_every), "counter_every": max(1, counter_every),
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
        self._config.update(power_sources=sources, path=str(self._path))
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
        self._dir.cleanup()   # every record is in the traces now
        if self._host is not None:
            self._host.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def pause(self) -> None:
        """Stop the sampling process where it is (SIGSTOP; no samples until resume): lets a check
        time the same workload with and without sampling, interleaved, in one session."""
        if self.running:
            os.kill(self._proc.pid, signal.SIGSTOP)

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
