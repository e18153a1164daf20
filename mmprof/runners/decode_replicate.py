"""`decode-power --shard replicate` under torchrun: data-parallel decoding, one full replica per GPU.

Sharding the weights makes no sense for batch-1 decoding (every token would wait for collectives);
what several GPUs do for a decoding service is serve independent requests. So every rank builds a
full replica and decodes its own prompts (seed + rank) with the single-GPU `decode_power.measure`,
metered by its own Profiler on its own GPU. Each configuration starts at a barrier, so the replicas
decode side by side; inside it each rank's steady-state windows are its own. Rows: one per rank and
a summary (tokens, tokens/s, energy, power and bandwidth summed over the GPUs; J/token of the job).
No collective runs inside a configuration, so an out-of-memory error on one rank never leaves
another waiting: the configuration becomes one `oom` row and the sweep goes on.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

from mmprof.profiler import copy_bandwidth_gbps
from mmprof.runners import decode_power as dp
from mmprof.runners.distributed import Job
from mmprof.runners.job_summary import summarize_decode
from mmprof.runners.sweep import pending, release_memory

SHARD_COLUMNS = ["shard", "world_size", "rank"]


class Runner:
    KEY_COLUMNS = [*dp.KEY_COLUMNS, *SHARD_COLUMNS]

    def __init__(self, job: Job):
        self.job = job

    def configs(self, spec: dp.DecodeSpec) -> list[dp.Config]:
        return dp.configs(spec)

    def summary_row(self, cfg: dp.Config, spec: dp.DecodeSpec) -> dict:
        return {**cfg.spec_row(spec), "device": self.job.device_type, "shard": "replicate",
                "world_size": self.job.world_size, "rank": "all", "local_gpu": None, "row_kind": "summary"}

    def run(self, spec: dp.DecodeSpec, emit: Callable[[dict], None], *, skip: Iterable[tuple] = (),
            key: Callable[[dict], tuple] | None = None, trace_path=None,
            on_start: Callable[[dp.Config], None] | None = None) -> list[dict]:
        job = self.job
        skip, key = job.skip_and_key(skip, key, self.KEY_COLUMNS)
        mine = dataclasses.replace(spec, device=job.device, seed=spec.seed + job.rank)
        written = []
        with job.metered(spec.sample_hz, spec.idle_s, trace_path) as prof:
            copy_gbps = copy_bandwidth_gbps(job.device) if job.device.startswith("cuda") else None
            for cfg, row in pending(dp.configs(spec), lambda c: self.summary_row(c, spec), key=key, skip=skip,
                                    on_start=on_start if job.rank == 0 else None):
                job.barrier()
                out = job.phase(lambda: dp.measure(cfg, mine, prof, copy_gbps), "decode")
                if out.ok:
                    rank_row = {**row, **out.value, **job.rank_columns()}
                    rank_row["note"] = "; ".join(p for p in (out.value.get("note"),
                                                             f"replica {job.rank} of {job.world_size}") if p)
                    rank_rows = job.exchange(rank_row, "rows")
                    rows = [*rank_rows, summarize_decode(rank_rows, row, copy_gbps)]
                else:
                    rows = [job.failure_row(out, "decode", row)]
                out = None
                if not job.poisoned:
                    release_memory(job.device)
                if job.rank == 0:
                    for r in rows:
                        emit(r)
                written += rows
                if job.poisoned:
                    break
        return written
