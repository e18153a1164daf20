"""BitLinear: RMSNorm, 8-bit per-token activations, ternary per-tensor weights, then a matmul.

    xn = x * rsqrt(mean(x^2) + eps) * g          (learnable g = `norm.weight`)
    xq = round(xn * s).clamp(-128, 127) / s      s = 127 / max(max|xn|, 1e-5), per row
    wq = round(W * t).clamp(-1, 1) / t           t = 1 / max(mean|W|, 1e-5), per tensor
    y  = xq @ wq^T                               straight-through gradients for both quantizers

Four implementations of the same function (`IMPLS`), chosen model-wide by `ModelConfig.bitlinear`:

- `vanilla`: the reference's unfused class (ops/bitnet.py `BitLinear`, the paper's baseline): its
  fused RMSNorm keeping x and rstd, STE fake-quant, F.linear (`reference_ops.bitlinear_vanilla`).
- `ref-fused`: the reference's `FusedBitLinear` as shipped: keeps x, rstd and the ternary weight in
  the matmul dtype, recomputes the quantised activations (`reference_ops.bitlinear_ref_fused`).
- `fused`: the custom op `mmprof::bitlinear_fused`. Its forward saves only x, the norm weight, the
  weight and two fp32 statistics per row (1/rms and the activation scale); its backward
  (`mmprof::bitlinear_fused_backward`) recomputes xn, xq and wq from them. Both ops have fake
  implementations, so they run on meta tensors, FakeTensor and under torch.compile.
- `naive`: every step a plain fp32 op, autograd keeping what it keeps (`ternary.bitlinear_naive`).

The norm eps follows the reference class each mirrors (`DEFAULT_EPS`): 1e-8 for `vanilla` and
`naive` (bitnet.BitLinear's RMSNorm), 1e-6 for `ref-fused` and `fused` (FusedBitLinear reads the
1e-6 default of its fused op, not its norm's 1e-8; the published checkpoints ran with it).

Precision: statistics, normalization and quantization of `fused` and `naive` run in fp32; the matmul
runs in the autocast dtype when autocast is on (as `F.linear` would), otherwise in the promoted dtype
of x and W. The output has the matmul dtype.

The fused op's bodies are looked up per device type in one place (`_bodies`); every device uses the
plain-PyTorch bodies below unless a faster body is registered with `register_bodies`. On CUDA that
is the Triton body of `bitlinear_prologue.py` (`CUDA_BODIES`, registered when first needed), which
saves the same tensors, so the saving is the same on every device.
"""

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mmprof.kernels.reference_ops import bitlinear_ref_fused, bitlinear_vanilla
from mmprof.kernels.ternary import (
    NORM_EPS,
    REF_FUSED_EPS,
    act_quant,
    act_scale,
    autocast_off as _autocast_off,
    bitlinear_naive,
    matmul_dtype,
    rms_inv,
    weight_quant,
)

IMPLS = ("vanilla", "ref-fused", "fused", "naive")
DEFAULT_EPS = {"vanilla": NORM_EPS, "ref-fused": REF_FUSED_EPS, "fused": REF_FUSED_EPS, "naive": NORM_EPS}
# The reference class each implementation mirrors (README, model config).
MIRRORS = {
    "vanilla": "mmfreelm.ops.bitnet.BitLinear",
    "ref-fused": "mmfreelm.ops.fusedbitnet.FusedBitLinear",
    "fused": "mmfreelm.ops.fusedbitnet.FusedBitLinear",
    "naive": "mmfreelm.ops.bitnet.BitLinear",
}


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown BitLinear implementation {impl!r}; expected one of {IMPLS}")
    return impl


# ---------------------------------------------------------------------------------------------
# Fused op: plain-PyTorch bodies and the per-device dispatch point
# ---------------------------------------------------------------------------------------------


def _forward_reference(x2d: Tensor, norm_weight: Tensor, weight: Tensor, eps: float, mm: torch.dtype):
    """x2d [M, K] -> (y [M, N] in mm, 1/rms [M] fp32, activation scale [M] fp32)."""
    with _autocast_off(x2d.device.type):
        xf = x2d.float()
        r = rms_inv(xf, eps)
        xn = xf * r * norm_weight.float()
        s = act_scale(xn)
        xq = act_quant(xn, s)
        y = F.linear(xq.to(mm), weight_quant(weight).to(mm))
    return y, r.squeeze(-1), s.squeeze(-1)


def _backward_reference(
    grad_y: Tensor, x2d: Tensor, norm_weight: Tensor, weight: Tensor,
    r: Tensor, s: Tensor, eps: float, mm: torch.dtype,
):  # fmt: skip
    """Recompute xn, xq, wq from x and the row statistics; return (dx, d norm_weight, dW)."""
    with _autocast_off(x2d.device.type):
        r, s = r.unsqueeze(-1), s.unsqueeze(-1)
        xhat = x2d.float() * r
        g = norm_weight.float()
        xq = act_quant(xhat * g, s)
        gy = grad_y.to(mm)
        d_xn = (gy @ weight_quant(weight).to(mm)).float()  # straight through the quantizer
        d_weight = (gy.t() @ xq.to(mm)).to(weight.dtype)
        d_norm = (d_xn * xhat).sum(0).to(norm_weight.dtype)
        u = d_xn * g
        d_x = r * (u - xhat * (u * xhat).mean(-1, keepdim=True))
    return d_x.to(x2d.dtype), d_norm, d_weight


ForwardBody = Callable[[Tensor, Tensor, Tensor, float, torch.dtype], "tuple[Tensor, Tensor, Tensor]"]
BackwardBody = Callable[..., "tuple[Tensor, Tensor, Tensor]"]
_REGISTERED: dict[str, tuple[ForwardBody, BackwardBody]] = {}


def register_bodies(device_type: str, forward: ForwardBody, backward: BackwardBody) -> None:
    """Use `forward`/`backward` (same signatures as the reference bodies) on this device type."""
    _REGISTERED[device_type] = (forward, backward)


def _bodies(device_type: str) -> tuple[ForwardBody, BackwardBody]:
    """The one dispatch point: a registered body for this device, else the plain-PyTorch one."""
    if device_type == "cuda" and device_type not in _REGISTERED:
        from mmprof.kernels.bitlinear_prologue import CUDA_BODIES  # the Triton bodies, imported when first needed

        register_bodies("cuda", *CUDA_BODIES)
    return _REGISTERED.get(device_type, (_forward_reference, _backward_reference))


@torch.library.custom_op("mmprof::bitlinear_fused", mutates_args=())
def bitlinear_fused(
    x2d: Tensor, norm_weight: Tensor, weight: Tensor, eps: float, mm_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    forward, _ = _bodies(x2d.device.type)
    return forward(x2d, norm_weight, weight, eps, mm_dtype)


@bitlinear_fused.register_fake
def _(x2d, norm_weight, weight, eps, mm_dtype):
    rows = x2d.shape[0]
    y = x2d.new_empty((rows, weight.shape[0]), dtype=mm_dtype)
    return y, x2d.new_empty((rows,), dtype=torch.float32), x2d.new_empty((rows,), dtype=torch.float32)


@torch.library.custom_op("mmprof::bitlinear_fused_backward", mutates_args=())
def bitlinear_fused_backward(
    grad_y: Tensor, x2d: Tensor, norm_weight: Tensor, weight: Tensor,
    r: Tensor, s: Tensor, eps: float, mm_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    _, backward = _bodies(x2d.device.type)
    return backward(grad_y, x2d, norm_weight, weight, r, s, eps, mm_dtype)


@bitlinear_fused_backward.register_fake
def _(grad_y, x2d, norm_weight, weight, r, s, eps, mm_dtype):
    return torch.empty_like(x2d), torch.empty_like(norm_weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x2d, norm_weight, weight, eps, mm_dtype = inputs
    _, r, s = output
    ctx.mark_non_differentiable(r, s)
    ctx.save_for_backward(x2d, norm_weight, weight, r, s)
    ctx.eps, ctx.mm_dtype = eps, mm_dtype


def _backward(ctx, grad_y, _grad_r, _grad_s):
    x2d, norm_weight, weight, r, s = ctx.saved_tensors
    d_x, d_norm, d_weight = torch.ops.mmprof.bitlinear_fused_backward(
        grad_y.contiguous(), x2d, norm_weight, weight, r, s, ctx.eps, ctx.mm_dtype
    )
    need_x, need_norm, need_weight = ctx.needs_input_grad[:3]
    return (
        d_x if need_x else None,
        d_norm if need_norm else None,
        d_weight if need_weight else None,
        None,
        None,
    )


bitlinear_fused.register_autograd(_backward, setup_context=_setup_context)

# ---------------------------------------------------------------------------------------------
# Public function and module
# ---------------------------------------------------------------------------------------------


def bitlinear(x: Tensor, norm_weight: Tensor, weight: Tensor, impl: str = "fused", eps: float | None = None) -> Tensor:
    """BitLinear of x [..., K] with norm weight [K] and weight [N, K] -> [..., N]; eps None: the
    implementation's own (`DEFAULT_EPS`)."""
    eps = DEFAULT_EPS[check_impl(impl)] if eps is None else eps
    if impl == "vanilla":
        return bitlinear_vanilla(x, norm_weight, weight, eps)
    if impl == "ref-fused":
        return bitlinear_ref_fused(x, norm_weight, weight, eps)
    if impl == "naive":
        return bitlinear_naive(x, norm_weight, weight, eps)
    lead = x.shape[:-1]
    y, _, _ = torch.ops.mmprof.bitlinear_fused(
        x.reshape(-1, x.shape[-1]), norm_weight, weight, eps, matmul_dtype(x, weight)
    )
    return y.reshape(*lead, weight.shape[0])


class _NormWeight(nn.Module):
    """Holds BitLinear's RMSNorm weight so its name is `<layer>.norm.weight` as in the reference."""

    def __init__(self, features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))


class BitLinear(nn.Module):
    """Ternary linear layer with its own input RMSNorm; no bias. `impl`: one of `IMPLS` (the model
    sets it from its config); eps None: the implementation's own."""

    def __init__(self, in_features: int, out_features: int, impl: str = "fused", eps: float | None = None):
        super().__init__()
        eps = DEFAULT_EPS[check_impl(impl)] if eps is None else eps
        self.in_features, self.out_features, self.impl, self.eps = in_features, out_features, impl, eps
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.norm = _NormWeight(in_features)
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return bitlinear(x, self.norm.weight, self.weight, self.impl, self.eps)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, impl={self.impl}, eps={self.eps}"
