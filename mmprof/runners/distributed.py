"""A torchrun job: process group, host-side agreement between ranks, barriers, and a clean end.

Every rank runs the same sweep; what the ranks must agree on travels through the rendezvous store
(a TCP key-value store, host only), never through NCCL, so it still works when a GPU is stuck:

- `phase(fn)` runs one step of a configuration (build, warm-up, timed steps) on every rank. An
  exception is caught on the rank that raised it and announced at once under the phase's `fail` key.
  A CUDA GPU is then waited for by polling an event, never by a blocking synchronize: a rank whose
  GPU waits in a collective that a failed peer will never join sees the `fail` key and stops
  waiting after `GRACE_S`. All ranks then exchange {status, note, drained} and take one decision.
- A failed phase whose GPUs all drained leaves the communicators in step: the configuration
  becomes an `oom` (or `error`) row and the sweep continues. If some GPU did not drain (or a gloo
  collective timed out), a collective was left half-done: the job writes the row and ends
  (`poisoned`); every process exits 0 through `os._exit`, which also ends the stuck GPU work.
- The process group timeout (MMPROF_DIST_TIMEOUT_S, default 300 s) is the last resort: a host
  blocked inside a collective (gloo on CPU) raises after it, and NCCL's watchdog ends a process
  whose collective never completes, so no rank hangs for ever.
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
    try:
        return float(os.environ.get("MMPROF_DIST_TIMEOUT_S", "300"))
    except ValueError:
        raise UserError("MMPROF_DIST_TIMEOUT_S must be a number of seconds") from None


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
        key = self._key(what)
        status, note, value = "ok", "", None
        try:
            value = fn()
            drained = self._wait_gpu(key)
            if not drained:
                status, note = "peer", "its GPU was still waiting when the grace period ended"
        except Exception as exc:  # noqa: BLE001 - every failure is agreed on, then becomes a row
            peer_failed = self._failed_elsewhere(key)
            status = "oom" if is_oom(exc) else ("peer" if peer_failed else "error")
            note = one_line(exc)
            if status != "peer":
                self.store.set(f"{key}/fail", str(self.rank))
            drained = status != "peer" and self._wait_gpu(key)
        reports = self.exchange({"status": status, "note": note, "drained": drained}, f"{what}-report")
        return decide(reports, value)

    def _failed_elsewhere(self, key: str) -> bool:
        return self.store.check([f"{key}/fail"])

    def _wait_gpu(self, key: str) -> bool:
        """Wait for this rank's queued GPU work without blocking the host: True once it finished,
        False when a peer failed and the GPU still had not finished GRACE_S later."""
        if not self.device.startswith("cuda"):
            return True
        event = torch.cuda.Event()
        event.record()
        failed_at = None
        start = time.monotonic()
        while not event.query():
            now = time.monotonic()
            if failed_at is None and self._failed_elsewhere(key):
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
    note = "; ".join(f"rank {k}: " + (f"left waiting for a failed rank ({r['note']})" if r["status"] == "peer"
                                      else r["note"]) for k, r in enumerate(reports) if r["status"] != "ok")
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


@dataclass(frozen=True)
class Plan:
    """How a command runs: `distributed` (under torchrun, one process per device) or one process."""

    shard: str
    world_size: int
    distributed: bool
    device: str          # the resolved device of one process; 'cuda' or 'cpu' (the kind) when distributed


def plan(shard: str, world_size: int | None, device: str, gpus: str | None, *, sharded: str = "fsdp",
         estimate_ok: bool = True) -> Plan:
    """Check --shard/--world-size/--device/--gpus against the torchrun environment (UserError if they clash).

    `sharded` is the command's multi-process mode (fsdp for training, replicate for decoding);
    `estimate_ok`: whether `--device meta --world-size N` (an estimate in one process) exists."""
    from mmprof.runners.sweep import resolve_device

    env = torchrun_env()
    if shard == "none":
        if world_size not in (None, 1):
            raise UserError(f"--world-size applies to --shard {sharded}")
        if env is not None and env[1] > 1:
            raise UserError(f"torchrun started {env[1]} processes: add --shard {sharded}")
        return Plan("none", 1, False, resolve_device(device, gpus))
    if device == "meta":
        if not estimate_ok:
            raise UserError(f"--shard {sharded} does not run on meta")
        if env is not None:
            raise UserError("the sharded estimate (--device meta) runs in one process: start it without torchrun")
        if world_size is None:
            raise UserError(f"--shard {sharded} --device meta needs --world-size N (the processes to estimate for)")
        return Plan(shard, world_size, False, "meta")
    if env is None:
        hint = " (or --device meta --world-size N to estimate without GPUs)" if estimate_ok else ""
        raise UserError(f"--shard {sharded} runs under torchrun: torchrun --nproc-per-node N -m mmprof ...{hint}")
    if world_size is not None and world_size != env[1]:
        raise UserError(f"--world-size {world_size} does not match torchrun's {env[1]} processes")
    if gpus is not None:
        raise UserError("--gpus does not apply under torchrun: rank r uses cuda:LOCAL_RANK "
                        "(choose GPUs with CUDA_VISIBLE_DEVICES)")
    cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    if device == "cuda" and not cuda:
        raise UserError("--device cuda: no CUDA device is visible")
    if device not in ("cuda", "cpu"):
        raise UserError(f"--device: unknown device {device!r}; choose auto, cuda, cpu or meta")
    return Plan(shard, env[1], True, device)
