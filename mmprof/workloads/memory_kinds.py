"""What kind of module a tensor is made or saved in, for the training-memory breakdown."""

from __future__ import annotations

import torch.nn as nn

from mmprof.kernels.bitlinear import BitLinear
from mmprof.workloads.layers import RMSNorm
from mmprof.workloads.mmfree import GLU, MLGRU, MMFreeBlock
from mmprof.workloads.transformer import Attention, SwiGLU, TransformerBlock

KINDS = ("bitlinear_inputs", "linear_inputs", "mlgru", "attention", "glu", "norms", "embedding", "residual", "logits_loss")
KIND_LABELS = {
    "bitlinear_inputs": "BitLinear inputs", "linear_inputs": "Linear inputs", "mlgru": "MLGRU state",
    "attention": "attention", "glu": "GLU", "norms": "norms", "embedding": "embedding",
    "residual": "residual stream", "logits_loss": "logits/loss", "other": "other",
}


def module_kind(name: str, module: nn.Module) -> str | None:
    """The kind a module's own tensors count as; None: its parent's kind (the innermost kind wins).

    lm_head and the model's top level (final norm, loss) count as logits/loss."""
    if name == "" or name.rsplit(".", 1)[-1] == "lm_head":
        return "logits_loss"
    if isinstance(module, BitLinear):
        return "bitlinear_inputs"
    if isinstance(module, nn.Linear):
        return "linear_inputs"
    if isinstance(module, MLGRU):
        return "mlgru"
    if isinstance(module, Attention):
        return "attention"
    if isinstance(module, (GLU, SwiGLU)):
        return "glu"
    if isinstance(module, RMSNorm):
        return "norms"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (MMFreeBlock, TransformerBlock)):
        return "residual"
    return None
