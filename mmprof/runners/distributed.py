"""A torchrun job: process group, host-side agreement between ranks, barriers, and a clean end.

Every rank runs the same sweep; what the ranks must agree on travels through the rendezvous store
(a TCP key-value store, host only), never through NCCL, so it still works when a GPU is stuck:

- `phase(fn)` runs one step of a configuration (build, warm-up, timed steps) on every rank. An
  exception is caught on the rank that raised it and announced at once under the phase's `fail` key.
  Inside a phase the host never blocks on the GPU: training queues at most one step ahead, waits
  by polling CUDA events (`wait_event`) and stops queueing (`PeerFailed`) as soon as another rank
  has failed, so it does not walk into collectives that rank will not join.
- At the end of a phase every rank waits for its GPU by polling an event; once a failure has been
  announced it waits at most GRACE_S. Then all ranks exchange {status, note, drained} and take one
  decision: a failed phase whose GPUs all drained leaves the communicators in step, so the
  configuration becomes an `oom` (or `error`) row and the sweep goes on. If some GPU did not drain,
  or a collective raised (a gloo timeout), a collective was left half-done: the job writes the row
  and ends (`poisoned`); every process exits 0 through `os._exit`, which also ends the GPU work.
- The process group timeout (MMPROF_DIST_TIMEOUT_S, default 300 s) is the last resort for a host
  blocked inside a collective: gloo raises after it (which the phase turns into a row), and NCCL's
  watchdog ends a process whose collective never completes (torchrun then stops the job), so no
  rank hangs for ever.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from mmprof.errors import UserError
from mmprof.runners.sweep import is_oom, one_line

GRACE_S = 30.0          # how long a GPU may take to drain once some rank has failed
POLL_S = 0.002


def timeout_s() -> float:
    from mmprof.settings import env_seconds

    return env_seconds("MMPROF_DIST_TIMEOUT_S", 300.0)


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when started by torchrun (or an equivalent launcher), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    return rank, world, local


class PeerFailed(RuntimeError):
    """Another rank failed in this phase: this one stops queueing work for a job that cannot finish it."""


@dataclass
class Outcome:
    """What every rank agreed about one phase."""

    status: str                  # ok | oom | error
    note: str = ""               # each failing rank's message
    poisoned: bool = False       # a collective was left half-done: the job must end
    value: Any = None            # this rank's return value of the phase (None where it failed)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Job:
    rank: int
    world_size: int
    local_rank: int
    device: str                  # cuda:LOCAL_RANK | cpu
    store: Any
    timeout_s: float
    mesh: Any = None
    poisoned: bool = False
    _seq: int = field(default=0)
    _phase_key: str | None = None

    @property
    def backend(self) -> str:
        return "nccl" if self.device.startswith("cuda") else "gloo"

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type

    def rank_columns(self) -> dict:
        """The columns that make a configuration's row this rank's."""
        cuda = self.device.startswith("cuda")
        return {"status": "ok", "device": self.device, "rank": self.rank,
                "local_gpu": self.local_rank if cuda else None, "row_kind": "rank"}

    def failure_row(self, out: Outcome, stage: str, summary_row: dict) -> dict:
        """The one row of a configuration that failed on some rank; marks the job poisoned if it is."""
        self.poisoned = self.poisoned or out.poisoned
        note = f"{stage}: {out.note}"
        if out.poisoned:
            note += "; a collective was left half-done, so the job ended here (--resume the run folder for the rest)"
        return {**summary_row, "status": out.status, "note": note}

    def skip_and_key(self, skip, key, key_columns: list[str]):
        """Rank 0's resume set on every rank, and a key function every rank has (the same configurations
        are skipped everywhere, or the collectives would not match)."""
        from mmprof.results import row_key

        shared = {tuple(k) for k in self.share(sorted(skip))}
        return shared, key or (lambda r: row_key(r, key_columns))

    @contextmanager
    def metered(self, sample_hz: float, idle_s: float, trace_path):
        """This rank's Profiler on its own GPU, entered after a barrier (idle baselines side by side);
        on leaving, rank 0 writes every rank's power trace to `trace_path`."""
        from mmprof.profiler import Profiler
        from mmprof.runners.job_summary import merge_traces

        with tempfile.TemporaryDirectory(prefix="mmprof-rank") as tmp:
            self.barrier()
            with Profiler(device=self.device, sample_hz=sample_hz, idle_s=idle_s,
                          trace_path=Path(tmp) / "power_trace.csv") as prof:
                yield prof
            files = [Path(tmp) / name for name in ("power_trace.csv", "phases.csv")]
            texts = self.exchange([f.read_text() if f.exists() else "" for f in files], "traces")
        if self.rank == 0 and trace_path is not None:
            merge_traces(Path(trace_path), texts)

    # ----- agreement through the store -----
    def _key(self, what: str) -> str:
        self._seq += 1
        return f"mmprof/{self._seq}/{what}"

    def exchange(self, value: Any, what: str = "x") -> list[Any]:
        """Every rank's `value` (JSON), in rank order, on every rank."""
        key = self._key(what)
        self.store.set(f"{key}/{self.rank}", json.dumps(value, default=str))
        keys = [f"{key}/{r}" for r in range(self.world_size)]
        self.store.wait(keys, timedelta(seconds=self.timeout_s + 60))
        return [json.loads(self.store.get(k)) for k in keys]

    def share(self, value: Any, what: str = "share") -> Any:
        """Rank 0's `value` on every rank."""
        return self.exchange(value if self.rank == 0 else None, what)[0]

    def share_call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on rank 0 only; a UserError there is raised on every rank (all exit 2 together)."""
        result, message = None, None
        if self.rank == 0:
            try:
                result = fn()
            except UserError as exc:
                message = str(exc)
        message = self.share(message, "share-call")
        if message is not None:
            raise UserError(message)
        return result

    # ----- phases -----
    def phase(self, fn: Callable[[], Any], what: str = "phase") -> Outcome:
        key = self._phase_key = self._key(what)
        status, note, value = "ok", "", None
        try:
            value = fn()
            drained = self._drain(key)
            if not drained:
                status, note = "peer", "its GPU still waited for a failed rank when the grace period ended"
        except Exception as exc:  # noqa: BLE001 - every failure is agreed on, then becomes a row
            stopped = isinstance(exc, PeerFailed)
            if is_oom(exc):
                status, note = "oom", one_line(exc)
            elif stopped:
                status, note = "peer", "stopped when another rank failed"
            elif self._failed(key):
                status, note = "peer", f"left waiting in a collective for a failed rank ({one_line(exc)})"
            else:
                status, note = "error", one_line(exc)
            if status != "peer":
                self.store.set(f"{key}/fail", str(self.rank))
            # an exception out of a collective (a timeout) leaves it half-done; a rank that stopped
            # itself between steps, or failed on its own, is in step once its GPU drains
            drained = (stopped or status != "peer") and self._drain(key)
        self._phase_key = None
        reports = self.exchange({"status": status, "note": note, "drained": drained}, f"{what}-report")
        return decide(reports, value)

    def check_peers(self) -> None:
        """Inside a phase: raise PeerFailed once another rank has failed (stop queueing work for it)."""
        if self._phase_key is not None and self._failed(self._phase_key):
            raise PeerFailed(f"another rank failed in {self._phase_key}")

    def wait_event(self, event) -> None:
        """Inside a phase: wait for a CUDA event without blocking the host; PeerFailed if a rank fails."""
        while not event.query():
            self.check_peers()
            time.sleep(POLL_S)

    def _failed(self, key: str) -> bool:
        return self.store.check([f"{key}/fail"])

    def _drain(self, key: str) -> bool:
        """Wait for this rank's queued GPU work without blocking the host: True once it finished,
        False when some rank failed and the GPU still had not finished GRACE_S later."""
        if not self.device.startswith("cuda"):
            return True
        event = torch.cuda.Event()
        event.record()
        failed_at = None
        start = time.monotonic()
        while not event.query():
            now = time.monotonic()
            if failed_at is None and self._failed(key):
                failed_at = now
            if (failed_at is not None and now - failed_at > GRACE_S) or now - start > self.timeout_s:
                return False
            time.sleep(POLL_S)
        return True

    # ----- collectives, used only when every rank is known to be in step -----
    def barrier(self) -> None:
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.local_rank])
            torch.cuda.synchronize(self.device)
        else:
            dist.barrier()

    def finish(self) -> None:
        """End the job: a clean teardown, or after a half-done collective an immediate exit (0)."""
        if self.poisoned:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        if dist.is_initialized():
            dist.destroy_process_group()


def decide(reports: list[dict], value: Any = None) -> Outcome:
    """One outcome from every rank's report: oom beats error; 'peer' (stopped waiting) is a consequence."""
    statuses = [r["status"] for r in reports]
    poisoned = not all(r["drained"] for r in reports)
    if all(s == "ok" for s in statuses):
        return Outcome("ok", poisoned=poisoned, value=value)
    status = "oom" if "oom" in statuses else "error"
    note = "; ".join(f"rank {k}: {r['note']}" for k, r in enumerate(reports) if r["status"] != "ok")
    return Outcome(status, note, poisoned, value)


def start(device_type: str) -> Job:
    """Join the torchrun job: rendezvous store, process group (nccl on cuda, gloo on cpu), device mesh."""
    env = torchrun_env()
    if env is None:
        raise UserError("not started by torchrun: RANK and WORLD_SIZE are not set")
    rank, world, local = env
    limit = timeout_s()
    if device_type == "cuda":
        n = torch.cuda.device_count()
        if local >= n:
            raise UserError(f"LOCAL_RANK {local} has no GPU ({n} visible); use --nproc-per-node {n} or fewer")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=timedelta(seconds=limit)))
    backend = "nccl" if device_type == "cuda" else "gloo"
    extra = {"device_id": torch.device(device)} if backend == "nccl" else {}
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=limit), **extra)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (world,))
    return Job(rank=rank, world_size=world, local_rank=local, device=device, store=store, timeout_s=limit, mesh=mesh)

