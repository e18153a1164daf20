"""`train-memory --shard fsdp` under torchrun: FSDP2, one process per GPU, rows per rank and per job.

Per configuration every rank builds the model on meta, wraps each block for activation checkpointing
when asked, applies `fully_shard` to each block and then to the root, materialises its own shards
on its device and initialises them. The shards are the fp32 master weights (AdamW runs on them); on
CUDA, bf16-autocast is FSDP2's MixedPrecisionPolicy (bf16 parameters in forward and backward, fp32
gradient reduction) with no autocast on top. `batch` is per rank.

Each rank meters only its own GPU with its own Profiler. The energy window opens and closes at a
barrier, so every GPU measures the same interval. Steps run without a host synchronisation; every
phase ends in `Job.phase`'s agreement (see runners/distributed.py), so an out-of-memory error on
one rank turns the configuration into one `oom` row for the whole job. Rank rows go to rank 0
through the rendezvous store; rank 0 writes them and a summary row.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterable

import torch

from mmprof.errors import UserError
from mmprof.profiler import GIB, Profiler, Timer, TimingStats
from mmprof.runners import train_memory as tm
from mmprof.runners.distributed import Job, Outcome
from mmprof.runners.fsdp_sizes import allocator_bytes
from mmprof.runners.job_summary import summarize
from mmprof.runners.sweep import gpu_peak_tflops, guarded, pending, release_memory
from mmprof.workloads import TrainSpec, build_model, get_config, init_weights, model_flops_per_token
from mmprof.workloads.checkpointing import apply_checkpointing
from mmprof.workloads.precision import forward_context, param_dtype
from mmprof.workloads.train import RandomTokens



def uses_mixed_policy(device, precision: str) -> bool:
    """bf16 autocast on CUDA becomes FSDP2's MixedPrecisionPolicy (bf16 parameters, fp32 reduction)."""
    return torch.device(device).type == "cuda" and precision == "bf16-autocast"

class ShardedTrainer:
    """The model sharded with FSDP2 on this rank, AdamW, random tokens; `step()` never syncs the host."""

    def __init__(self, tspec: TrainSpec, checkpointing: str, job: Job):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        device = torch.device(job.device)
        cfg = get_config(tspec.size)
        if cfg.tie_word_embeddings:
            raise UserError("--shard fsdp does not support tied embeddings")
        model = build_model(tspec.arch, cfg, bitlinear=tspec.bitlinear, device="meta",
                            dtype=param_dtype(tspec.precision))
        apply_checkpointing(model, checkpointing)
        self.mixed = uses_mixed_policy(device, tspec.precision)
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                   cast_forward_inputs=False) if self.mixed else MixedPrecisionPolicy())
        for block in model.model.layers:
            fully_shard(block, mesh=job.mesh, mp_policy=mp)
        fully_shard(model, mesh=job.mesh, mp_policy=mp)
        model.to_empty(device=device)
        init_weights(model, tspec.seed)
        self.model = model.train()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=tspec.lr,
                                           **({"fused": True} if device.type == "cuda" else {}))
        self.tokens = RandomTokens(cfg.vocab_size, tspec.batch, tspec.seq, tspec.seed, device)
        self.precision, self.device = tspec.precision, device

    def step(self) -> None:
        ids = self.tokens.next()
        with contextlib.nullcontext() if self.mixed else forward_context(self.precision, self.device):
            loss = self.model(ids, labels=ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_bytes(self) -> dict[str, int]:
        """Bytes of this rank's parameter shards and optimizer state on its device (512-byte blocks)."""
        def local(t):
            t = t.to_local() if hasattr(t, "to_local") else t
            return allocator_bytes(t.untyped_storage().nbytes()) if t.device == self.device else 0

        params = sum(local(p) for p in self.model.parameters())
        optim = sum(local(v) for st in self.optimizer.state.values() for v in st.values()
                    if isinstance(v, torch.Tensor))
        return {"params": params, "optim": optim}


def _run_steps(trainer: ShardedTrainer, n: int, job: Job) -> Timer:
    """n steps with a mark after each (profiler.Timer). The host never blocks on the GPU: it queues
    at most one step ahead, waiting by polling, and stops queueing (PeerFailed) as soon as another
    rank has failed, so it never runs into a collective that rank will not join."""
    timer = Timer(trainer.device)
    timer.mark()
    for k in range(n):
        trainer.step()
        timer.mark()
        if k + 1 < n and timer.cuda is not None:
            job.wait_event(timer.marks[-2])
        elif k + 1 < n:
            job.check_peers()
    return timer


def _seconds(timer: Timer) -> list[float]:
    """Step times from the marks, once the GPU has finished (the phase waited for it)."""
    return timer.intervals_s()


class Runner:
    """The sweep of `train_memory` (same configurations and key columns) across the ranks of `job`."""

    KEY_COLUMNS = tm.KEY_COLUMNS

    def __init__(self, job: Job):
        self.job = job

    def configs(self, spec: tm.TrainMemorySpec) -> list[tm.Config]:
        return tm.configs(spec)

    def run(self, spec: tm.TrainMemorySpec, emit: Callable[[dict], None], *, skip: Iterable[tuple] = (),
            key: Callable[[dict], tuple] | None = None, trace_path=None,
            on_start: Callable[[tm.Config], None] | None = None) -> list[dict]:
        job = self.job
        skip, key = job.skip_and_key(skip, key, self.KEY_COLUMNS)
        summary_spec = dataclasses.replace(spec, device=job.device_type)
        written, stopped = [], set()
        with job.metered(spec.sample_hz, spec.idle_s, trace_path) as prof:
            for cfg, row in pending(tm.configs(spec), lambda c: c.spec_row(summary_spec), key=key, skip=skip,
                                    on_start=on_start if job.rank == 0 else None):
                if cfg.impl in stopped:
                    continue
                rows = self._configuration(cfg, spec, row, prof)
                if job.rank == 0:
                    for r in rows:
                        emit(r)
                written += rows
                if rows[-1]["status"] == "oom":
                    stopped.add(cfg.impl)
                if job.poisoned:
                    break
        return written

    def _configuration(self, cfg: tm.Config, spec: tm.TrainMemorySpec, summary_row: dict, prof: Profiler):
        job, cuda = self.job, self.job.device.startswith("cuda")
        tspec = TrainSpec(arch=cfg.arch, size=spec.size, bitlinear=cfg.bitlinear or "fused", batch=cfg.batch,
                          seq=spec.seq, precision=spec.precision, seed=job.rank)

        def failed(out: Outcome, stage: str) -> list[dict]:
            return [job.failure_row(out, stage, summary_row)]

        built = job.phase(lambda: ShardedTrainer(tspec, cfg.checkpointing, job), "build")
        if not built.ok:
            return failed(built, "build")
        trainer, built = built.value, None
        warm = job.phase(lambda: _run_steps(trainer, spec.warmup, job), "warmup")
        if not warm.ok:
            trainer = None                               # freed before the next configuration
            return self._after(failed(warm, "warm-up"), warm)
        # one step timed after the warm-up sizes the window, as in the single-GPU runner
        probe = job.phase(lambda: _run_steps(trainer, 1, job), "probe")
        if not probe.ok:
            trainer = None
            return self._after(failed(probe, "probe step"), probe)
        want = tm.window_steps(_seconds(probe.value)[0], spec.steps, spec.min_window_s)
        steps = max(job.exchange(want, "steps"))
        before = torch.cuda.memory_allocated(job.device) if cuda else None
        job.barrier()
        prof.begin(cfg.label)
        timed = job.phase(lambda: _run_steps(trainer, steps, job), "timed")
        if not timed.ok:
            if not timed.poisoned:
                prof.end(cfg.label)
            trainer = None
            return self._after(failed(timed, "timed steps"), timed)
        job.barrier()
        m = prof.end(cfg.label)
        row = self._rank_row(cfg, spec, summary_row, m, TimingStats.of(_seconds(timed.value)), before,
                             trainer.state_bytes())
        trainer = None
        release_memory(job.device)
        rank_rows = job.exchange(row, "rows")
        summary = summarize(rank_rows, summary_row, cfg.batch * spec.seq, self._flops_per_token(cfg, spec))
        rows = [*rank_rows, summary]
        if spec.estimate and job.rank == 0:
            self._add_estimate(rows, cfg, spec)
        return rows

    def _after(self, rows: list[dict], out: Outcome) -> list[dict]:
        if not out.poisoned:
            release_memory(self.job.device)
        return rows

    def _rank_row(self, cfg, spec, summary_row, m, timing, before, state) -> dict:
        job, cuda = self.job, self.job.device.startswith("cuda")
        tokens = cfg.batch * spec.seq
        row = {**summary_row, **job.rank_columns(), **m.row()}
        row.update(param_gib=state["params"] / GIB, grad_gib=state["params"] / GIB, optim_gib=state["optim"] / GIB,
                   step_time_s=timing.median_s, step_time_iqr_s=timing.iqr_s, n_steps=timing.n,
                   tokens_per_s=tokens / timing.median_s)
        if cuda:
            row["act_mem_gib"] = m.peak_alloc_gib - before / GIB
        flops, peak = self._flops_per_token(cfg, spec)
        if peak:
            row["mfu"] = flops * row["tokens_per_s"] / (peak * 1e12)
        energy = tm.energy_columns(m, timing.n, tokens, spec.min_window_s)
        notes = [energy.pop("note"), m.note(), f"FSDP2 rank {job.rank} of {job.world_size}",
                 "grad_gib is the gradient shards' size (as param_gib), not a measurement"]
        if uses_mixed_policy(self.job.device, spec.precision):
            notes.append("bf16 parameters in forward/backward, fp32 gradient reduction (MixedPrecisionPolicy)")
        if not cuda:
            notes.append("no CUDA allocator: peak_alloc_gib not measured on cpu (host_rss_peak_gib is)")
        row.update(energy)
        row["note"] = "; ".join(dict.fromkeys(n for n in notes if n))
        return row

    def _flops_per_token(self, cfg, spec) -> tuple[float, float | None]:
        cuda = self.job.device.startswith("cuda")
        name = torch.cuda.get_device_name(self.job.device) if cuda else None
        peak = gpu_peak_tflops(name, spec.peak_tflops) if cuda else spec.peak_tflops
        return model_flops_per_token(get_config(spec.size), cfg.arch, spec.seq), peak

    def _add_estimate(self, rows: list[dict], cfg, spec) -> None:
        est_spec = dataclasses.replace(spec, device="meta", shard="fsdp", world_size=self.job.world_size)
        est = guarded(lambda: tm.estimate(cfg, est_spec), "cpu")
        if est["status"] != "ok":
            return
        for r in rows:
            r["est_peak_alloc_gib"] = est["peak_alloc_gib"]
            if r.get("peak_alloc_gib"):
                r["est_error_pct"] = (est["peak_alloc_gib"] / r["peak_alloc_gib"] - 1) * 100
