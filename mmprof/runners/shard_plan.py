"""Which way a command runs: one process, or one process per device under torchrun (--shard)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmprof.errors import UserError
from mmprof.runners.distributed import torchrun_env


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
