"""What one FSDP2 rank holds and computes in: shared by the whole-model per-rank estimate
(fsdp_estimate) and the fast path that composes it from traced blocks (train_estimate)."""

from __future__ import annotations

import math

import torch

BLOCK = 512


def allocator_bytes(nbytes: int) -> int:
    """nbytes rounded up to the CUDA caching allocator's 512-byte blocks."""
    return -(-nbytes // BLOCK) * BLOCK


def shard_bytes(p: torch.Tensor, world: int, itemsize: int) -> int:
    """Bytes one rank holds of parameter p: ceil(dim0 / N) rows (FSDP2 pads dim 0), in 512-byte blocks."""
    if p.dim() == 0:
        return allocator_bytes(itemsize)
    rows = math.ceil(p.shape[0] / world)
    return allocator_bytes(rows * (p.numel() // p.shape[0]) * itemsize)


def compute_dtype(precision: str) -> torch.dtype:
    """What FSDP2 computes in: bf16 unless the run is fp32 throughout."""
    return torch.float32 if precision == "fp32" else torch.bfloat16
