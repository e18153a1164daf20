"""What the ternary quantisation makes of each BitLinear's weights: the fraction of zeros and the
scale (mean |W|, the value a +-1 stands for), and the bytes of the 2-bit packed model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from mmprof.kernels.bitlinear import BitLinear
from mmprof.kernels.ternary_pack import ternary_quantize, unpack_ternary
from mmprof.workloads.packed import PackedLinear


@dataclass(frozen=True)
class TernaryStats:
    name: str          # the BitLinear's module name (reference checkpoint names)
    out_features: int
    in_features: int
    zero_frac: float   # fraction of weights quantised to 0
    scale: float       # mean |W|: the dequantised magnitude of a +-1 weight


@torch.no_grad()
def ternary_stats(model: nn.Module) -> list[TernaryStats]:
    """One row per BitLinear of an MMFreeLM (from its float weights) or per packed part of a
    PackedMMFreeLM (from its 2-bit codes); empty for a model with no ternary weights."""
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, BitLinear):
            t, scale = ternary_quantize(module.weight.detach())
            rows.append(TernaryStats(name, t.shape[0], t.shape[1], (t == 0).float().mean().item(), scale.item()))
        elif isinstance(module, PackedLinear):
            parts = module.w_scale.numel()
            t = unpack_ternary(module.packed, module.in_features).view(parts, -1, module.in_features)
            for p in range(parts):
                label = f"{name}[{p}]" if parts > 1 else name
                rows.append(TernaryStats(label, t.shape[1], t.shape[2], (t[p] == 0).float().mean().item(),
                                         module.w_scale[p].item()))
    return rows


def zero_fraction(stats: list[TernaryStats]) -> float | None:
    """The fraction of zeros over all the BitLinear weights (None if there are none)."""
    weights = sum(s.out_features * s.in_features for s in stats)
    return sum(s.zero_frac * s.out_features * s.in_features for s in stats) / weights if weights else None


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def inspect_checkpoint(ref: str) -> tuple[dict, list[dict]]:
    """(summary, one dict per BitLinear) of a checkpoint folder or cached Hub repo id: arch, shape,
    parameter count, the bytes its weights take as stored and packed to 2 bits (MatMul-free), and
    each BitLinear's shape, zero fraction and scale."""
    from mmprof.workloads.checkpoint import load_checkpoint
    from mmprof.workloads.packed import PackedMMFreeLM
    from mmprof.workloads.weight_bytes import weight_bytes

    model = load_checkpoint(ref, "cpu")
    cfg = model.config
    gib = 1024**3
    summary = {
        "arch": model.arch, "layers": cfg.num_layers, "hidden": cfg.hidden_size,
        "intermediate": cfg.intermediate_size, "vocab": cfg.vocab_size, "params": model.num_params(),
        "stored_gib": _sig(weight_bytes(model) / gib),
    }  # fmt: skip
    if model.arch == "transformer":
        summary.update(heads=cfg.num_heads, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim)
    stats = ternary_stats(model)
    if stats:
        packed = model if isinstance(model, PackedMMFreeLM) else PackedMMFreeLM.from_model(model)
        summary["packed_gib"] = _sig(weight_bytes(packed) / gib)
        summary["zero_frac"] = _sig(zero_fraction(stats))
    rows = [{"bitlinear": s.name, "out": s.out_features, "in": s.in_features,
             "params": s.out_features * s.in_features, "zero_frac": _sig(s.zero_frac), "scale": _sig(s.scale)}
            for s in stats]  # fmt: skip
    return summary, rows
