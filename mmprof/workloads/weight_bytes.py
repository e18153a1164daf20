"""How many bytes a model's weights take, and how many one decoding step reads."""

from __future__ import annotations

import torch.nn as nn


def _unique(tensors) -> list:
    seen, out = set(), []
    for t in tensors:
        if t.device.type != "meta" and t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out.append(t)
    return out


def weight_bytes(model: nn.Module) -> int:
    """Bytes of what a checkpoint of the model holds (parameters and persistent buffers, packed
    weights included), shared tensors counted once."""
    return sum(t.numel() * t.element_size() for t in _unique(model.state_dict().values()))


def streamed_bytes(model: nn.Module, batch: int = 1) -> int:
    """Weight bytes one decoding step reads: every weight except the embedding tables, of which
    it reads one row per sequence. A table shared with the output layer is read whole."""
    head = getattr(model, "lm_head", None)
    head_weight = getattr(head, "weight", None)
    total = weight_bytes(model)
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.weight is not head_weight:
            w = module.weight
            total -= w.numel() * w.element_size() - batch * w.shape[1] * w.element_size()
    return total
