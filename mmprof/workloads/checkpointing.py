"""Activation checkpointing per block: a block keeps only its inputs for backward and recomputes the rest.

`apply_checkpointing(model, "layer")` wraps every block of either model in `Checkpointed`
(non-reentrant `torch.utils.checkpoint`); the parameters stay the same objects, so an optimizer made
before still holds them. Under FSDP2 the wrapper is what `fully_shard` shards, as in torchtitan.
"""

from __future__ import annotations

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from mmprof.errors import UserError

CHECKPOINTING = ("none", "layer")


class Checkpointed(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args):
        # the blocks draw no random numbers: no RNG state to save and restore for the recomputation
        return checkpoint(self.block, *args, use_reentrant=False, preserve_rng_state=False)


def check_checkpointing(mode: str) -> str:
    if mode not in CHECKPOINTING:
        raise UserError(f"unknown checkpointing {mode!r}; valid: {', '.join(CHECKPOINTING)}")
    return mode


def apply_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Wrap each block of `model.model.layers` when mode is 'layer'; 'none' leaves the model as it is."""
    if check_checkpointing(mode) == "layer":
        layers = model.model.layers
        for n, block in enumerate(layers):
            if not isinstance(block, Checkpointed):
                layers[n] = Checkpointed(block)
    return model
