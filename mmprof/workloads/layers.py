"""Building blocks shared by both models: RMSNorm, the norm-SiLU output gate, rotary embeddings,
the language-model loss and the output record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mmprof.kernels.ternary import rms_norm

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: Tensor | None  # None when the loss was computed without them (the fused MatMul-free LM)
    loss: Tensor | None = None
    state: Any = None  # per-layer MLGRU states (MatMul-free) or the KV cache (Transformer++)


class RMSNorm(nn.Module):
    def __init__(self, features: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(features))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rotary_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [T, head_dim] for integer positions [T] (half-split layout, as Hugging Face Llama)."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, H, T, D] by cos/sin [T, D]: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def next_token_targets(labels: Tensor) -> Tensor:
    """labels [B, T] shifted left by one, IGNORE_INDEX at the end: position t predicts token t+1."""
    return torch.cat((labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)), dim=1)


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy: logits at t predict labels at t+1; computed in fp32.

    The labels are shifted (not the logits), so the big logits tensor is never copied by slicing.
    """
    targets = next_token_targets(labels)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
