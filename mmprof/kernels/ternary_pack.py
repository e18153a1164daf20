"""Ternary weights in 2 bits: 16 per int32 word, one fp32 scale per tensor.

A weight t in {-1, 0, +1} is stored as the code t + 1 in {0, 1, 2}. Row n of an [N, K] matrix takes
ceil(K / 16) words; weight k lives in word k // 16 at bit offset

    8 * (p % 4) + 2 * (p // 4),    p = k % 16

so that `(word >> 2*s) & 0x03030303` holds the codes of weights 4s .. 4s+3 of the word, one per byte,
in the same order as four consecutive int8 activations read as one int32. A kernel can then take the
dot product of 4 activations with 4 codes in one integer instruction and correct for the +1 offset
with the activations' sum: sum(x * t) = sum(x * code) - sum(x). Columns past K are padded with code 1
(weight 0), which adds nothing.

The scale is BitLinear's: s = 1 / max(mean|W|, 1e-5), t = round(W * s).clamp(-1, 1), computed in the
weight's dtype as the training path computes them, so t is the fake-quant model's ternary matrix;
w_scale = 1 / s is stored in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmprof.kernels.ternary import SCALE_FLOOR

WEIGHTS_PER_WORD = 16
CODE_MASK = 0x03030303
# bit offset of weight p (0..15) inside its word
_SHIFTS = [8 * (p % 4) + 2 * (p // 4) for p in range(WEIGHTS_PER_WORD)]


def packed_words(features: int) -> int:
    """int32 words per packed row of `features` weights."""
    return -(-features // WEIGHTS_PER_WORD)


def ternary_quantize(weight: Tensor) -> tuple[Tensor, Tensor]:
    """W [N, K] (any float dtype) -> (t int8 [N, K] in {-1, 0, 1}, w_scale fp32 scalar tensor).

    The arithmetic of `weight_quant` of the training path, in the weight's own dtype, so t is the
    ternary matrix the fake-quant model uses; w_scale is its 1 / scale, kept in fp32."""
    scale = 1.0 / weight.abs().mean().clamp(min=SCALE_FLOOR)
    t = (weight * scale).round().clamp(-1, 1).to(torch.int8)
    return t, (1.0 / scale.float()).reshape(())


def pack_ternary(t: Tensor) -> Tensor:
    """int8 [N, K] with values in {-1, 0, 1} -> int32 [N, ceil(K / 16)] (layout: module docstring)."""
    if t.dim() != 2:
        raise ValueError(f"pack_ternary expects a 2-d [N, K] tensor, got shape {tuple(t.shape)}")
    if t.numel() and (t.min() < -1 or t.max() > 1):
        raise ValueError("pack_ternary expects values in {-1, 0, 1}")
    n, k = t.shape
    words = packed_words(k)
    codes = torch.ones(n, words * WEIGHTS_PER_WORD, dtype=torch.int64, device=t.device)
    codes[:, :k] = t.to(torch.int64) + 1
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=t.device)
    packed = (codes.view(n, words, WEIGHTS_PER_WORD) << shifts).sum(-1)   # disjoint bits: sum == or
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)          # as a signed 32-bit word
    return packed.to(torch.int32)


def unpack_ternary(packed: Tensor, features: int) -> Tensor:
    """int32 [N, W] -> int8 [N, features] in {-1, 0, 1}; the exact inverse of `pack_ternary`."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"unpack_ternary expects an int32 [N, W] tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed_words(features) != packed.shape[1]:
        raise ValueError(f"{packed.shape[1]} words per row do not hold {features} weights")
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=packed.device)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    codes = (words[:, :, None] >> shifts) & 3
    return (codes.flatten(1)[:, :features] - 1).to(torch.int8)


def pack_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """A float weight [N, K] -> (packed int32 [N, ceil(K/16)], w_scale fp32 scalar)."""
    t, scale = ternary_quantize(weight)
    return pack_ternary(t), scale
