"""Build either model directly on its device: modules are made on meta (no memory), cast there,
materialised with `to_empty` on the target device and initialised in place, so no weights are ever
made in fp32 on the host first. On `meta` the model stays unallocated."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from mmprof.errors import UserError
from mmprof.kernels.bitlinear import IMPLS, BitLinear
from mmprof.workloads.mmfree import MMFreeLM
from mmprof.workloads.presets import ModelConfig, check_arch, get_config
from mmprof.workloads.transformer import TransformerLM

INIT_STD = 0.02
_RESIDUAL_OUTPUTS = ("o_proj", "down_proj")  # scaled by 1/sqrt(2 * layers), as GPT-2 and the reference


def resolve_config(size_or_config: str | ModelConfig) -> ModelConfig:
    return size_or_config if isinstance(size_or_config, ModelConfig) else get_config(size_or_config)


def build_model(
    arch: str,
    size_or_config: str | ModelConfig,
    *,
    bitlinear: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> nn.Module:
    """A MatMul-free LM or Transformer++ with fresh random weights on `device` in `dtype`.

    `bitlinear` (MatMul-free only): sets the config's `bitlinear` field; None keeps the config's."""
    cfg = resolve_config(size_or_config)
    check_arch(arch)
    if bitlinear is not None:
        if bitlinear not in IMPLS:
            raise UserError(f"unknown BitLinear implementation {bitlinear!r}; valid: {', '.join(IMPLS)}")
        cfg = cfg.replace(bitlinear=bitlinear)
    device = torch.device(device)
    make = MMFreeLM if arch == "mmfree" else TransformerLM
    args = (cfg,)
    if _fake_mode_active():  # fake tensors hold no memory: make them in place (they cannot be swapped)
        with torch.device(device), _default_dtype(dtype):
            model = make(*args)
        if device.type != "meta":
            init_weights(model, seed)
        return model
    with torch.device("meta"):
        model = make(*args).to(dtype=dtype)
    if device.type != "meta":
        model = model.to_empty(device=device)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        init_weights(model, seed)
    return model


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _fake_mode_active() -> bool:
    try:
        from torch._guards import detect_fake_mode
    except ImportError:  # pragma: no cover - very old torch
        return False
    return detect_fake_mode() is not None


@torch.no_grad()
def init_weights(model: nn.Module, seed: int = 0) -> None:
    """In-place, on-device initialisation: N(0, 0.02) matrices (residual outputs scaled down),
    ones for norm weights, zeros for the lower bounds. Sharded (DTensor) parameters: the local shard."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    layers = model.config.num_layers
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, BitLinear, nn.Embedding)):
            std = INIT_STD
            if name.rsplit(".", 1)[-1] in _RESIDUAL_OUTPUTS:
                std /= math.sqrt(2 * layers)
            _local(module.weight).normal_(0.0, std, generator=generator)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):  # every RMSNorm: BitLinear norms, g_norm, *_layernorm, model.norm
            _local(param).fill_(1.0)
        elif name.endswith("lower_bounds"):
            _local(param).zero_()


def _local(param: torch.Tensor) -> torch.Tensor:
    """The part of `param` this process holds: its local shard when FSDP2 made it a DTensor, so each
    rank initialises its own shard with its own generator and no DTensor random-number collective."""
    return param.to_local() if hasattr(param, "to_local") else param
