"""Training precisions: parameter dtype and the context the forward pass runs in.

- `bf16-autocast`: fp32 master weights, forward under `torch.autocast(dtype=bfloat16)` (the default).
- `bf16`: bf16 weights and activations, no autocast.
- `fp32`: everything in fp32.

Autocast does not exist for the meta device, so on meta the forward runs under `MetaAutocast`, a
torch-function mode that gives the matmul-like ops the same bf16 inputs autocast would (linear,
matmul, SDPA, and the fused BitLinear ops' matmul dtype). Memory estimated on meta tensors then sees
the same activation dtypes as a real bf16-autocast run.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import mmprof.kernels.bitlinear  # noqa: F401  (registers torch.ops.mmprof.bitlinear_fused)
import mmprof.kernels.bitlinear_prologue  # noqa: F401  (registers the fused model's BitLinear ops)
from mmprof.errors import UserError

PRECISIONS = ("bf16-autocast", "bf16", "fp32")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return precision


def param_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if check_precision(precision) == "bf16" else torch.float32


class MetaAutocast(TorchFunctionMode):
    """Autocast's dtype choice for matmul-like ops, for devices autocast does not support (meta)."""

    _CAST_ALL = {
        F.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm,
        torch.Tensor.matmul, torch.Tensor.__matmul__, F.scaled_dot_product_attention,
        torch.ops.aten._scaled_dot_product_flash_attention,
        torch.ops.aten._scaled_dot_product_flash_attention.default,
    }  # fmt: skip
    # the BitLinear ops take their matmul dtype as an argument: its position in each
    _MM_DTYPE_ARG = {
        op: index
        for packet, index in (
            (torch.ops.mmprof.bitlinear_fused, 4),
            (torch.ops.mmprof.bitlinear_prologue_fwd, 5),
            (torch.ops.mmprof.ternary_weight, 1),
        )
        for op in (packet, packet.default)
    }

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.dtype = dtype

    @property
    def meta_autocast_dtype(self) -> torch.dtype:
        """What `kernels.ternary.autocast_dtype("meta")` returns while this mode runs: the ops that pick
        their matmul dtype themselves (the ref-fused BitLinear) pick autocast's."""
        return self.dtype

    def _cast(self, value):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != self.dtype:
            return value.to(self.dtype)
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._CAST_ALL:
            args = tuple(self._cast(a) for a in args)
            kwargs = {k: self._cast(v) for k, v in kwargs.items()}
        elif func in self._MM_DTYPE_ARG:
            index = self._MM_DTYPE_ARG[func]
            args = (*args[:index], self.dtype, *args[index + 1 :])
        return func(*args, **kwargs)


def forward_context(precision: str, device: torch.device | str):
    """The context a training forward pass runs in for this precision and device."""
    device = torch.device(device)
    if check_precision(precision) != "bf16-autocast":
        return contextlib.nullcontext()
    if device.type == "meta":
        return MetaAutocast(torch.bfloat16)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
