"""BitLinear: RMSNorm, 8-bit per-token activations, ternary per-tensor weights, then a matmul.

    xn = x * rsqrt(mean(x^2) + eps) * g          (eps 1e-8, learnable g = `norm.weight`)
    xq = round(xn * s).clamp(-128, 127) / s      s = 127 / max(max|xn|, 1e-5), per row
    wq = round(W * t).clamp(-1, 1) / t           t = 1 / max(mean|W|, 1e-5), per tensor
    y  = xq @ wq^T                               straight-through gradients for both quantizers

Two implementations of the same function:

- `vanilla`: plain PyTorch ops; autograd saves whatever it saves (x, the normalized x, the quantized
  x and the quantized weight in the matmul dtype, ...).
- `fused`: the custom op `mmprof::bitlinear_fused`. Its forward saves only x, the norm weight, the
  weight and two fp32 statistics per row (1/rms and the activation scale); its backward
  (`mmprof::bitlinear_fused_backward`) recomputes xn, xq and wq from them. Both ops have fake
  implementations, so they run on meta tensors, FakeTensor and under torch.compile.

Precision: statistics, normalization and quantization run in fp32; the matmul runs in the autocast
dtype when autocast is on (as `F.linear` would), otherwise in the promoted dtype of x and W. The
output has the matmul dtype.

The fused op's bodies are looked up per device type in one place (`_bodies`); every device uses the
plain-PyTorch bodies below unless a faster body is registered with `register_bodies`. On CUDA that
is the Triton body of `bitlinear_prologue.py` (registered when first needed), which saves the same
tensors, so the saving is the same on every device.
"""

import contextlib
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

NORM_EPS = 1e-8
ACT_LEVELS = 127.0
SCALE_FLOOR = 1e-5
IMPLS = ("vanilla", "fused")

# ---------------------------------------------------------------------------------------------
# Reference math (plain PyTorch, shared by both implementations)
# ---------------------------------------------------------------------------------------------


def rms_inv(xf: Tensor, eps: float = NORM_EPS) -> Tensor:
    """1 / rms over the last dim, keepdim; xf is fp32."""
    return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim computed in fp32; result in x's dtype."""
    xf = x.float()
    return (xf * rms_inv(xf, eps) * weight.float()).to(x.dtype)


def act_scale(xn: Tensor) -> Tensor:
    """Per-row 8-bit scale 127 / max|xn|, keepdim."""
    return ACT_LEVELS / xn.abs().amax(-1, keepdim=True).clamp(min=SCALE_FLOOR)


def act_quant(xn: Tensor, scale: Tensor) -> Tensor:
    """Quantize to int8 levels and back: round(xn * s).clamp(-128, 127) / s."""
    return (xn * scale).round().clamp(-128, 127) / scale


def weight_quant(w: Tensor) -> Tensor:
    """Ternary weights with one scale per tensor: round(W / mean|W|).clamp(-1, 1) * mean|W|."""
    scale = 1.0 / w.abs().mean().clamp(min=SCALE_FLOOR)
    return (w * scale).round().clamp(-1, 1) / scale


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for this device type, or None (also for types autocast lacks)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return None
    return None


def matmul_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype BitLinear's matmul runs in: autocast's if on, else promote(x, W)."""
    cast = _autocast_dtype(x.device.type)
    return cast if cast is not None else torch.promote_types(x.dtype, weight.dtype)


@contextlib.contextmanager
def _autocast_off(device_type: str):
    """Run inner ops in exactly the dtypes they are given (the op chose its matmul dtype)."""
    if _autocast_dtype(device_type) is None:
        yield
    else:
        with torch.autocast(device_type=device_type, enabled=False):
            yield


def bitlinear_vanilla(x: Tensor, norm_weight: Tensor, weight: Tensor, eps: float = NORM_EPS) -> Tensor:
    """The unoptimized BitLinear: plain ops, straight-through estimators via detach."""
    xf = x.float()
    xn = xf * rms_inv(xf, eps) * norm_weight.float()
    xq = xn + (act_quant(xn, act_scale(xn)) - xn).detach()
    wq = weight + (weight_quant(weight) - weight).detach()
    mm = matmul_dtype(x, weight)
    return F.linear(xq.to(mm), wq.to(mm))


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
        from mmprof.kernels import bitlinear_prologue  # noqa: F401  (registers the Triton bodies)
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


def bitlinear(x: Tensor, norm_weight: Tensor, weight: Tensor, impl: str = "fused", eps: float = NORM_EPS) -> Tensor:
    """BitLinear of x [..., K] with norm weight [K] and weight [N, K] -> [..., N]."""
    if impl == "vanilla":
        return bitlinear_vanilla(x, norm_weight, weight, eps)
    if impl != "fused":
        raise ValueError(f"unknown BitLinear implementation {impl!r}; expected one of {IMPLS}")
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
    """Ternary linear layer with its own input RMSNorm; no bias. `impl`: vanilla | fused."""

    def __init__(self, in_features: int, out_features: int, impl: str = "fused", eps: float = NORM_EPS):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"unknown BitLinear implementation {impl!r}; expected one of {IMPLS}")
        self.in_features, self.out_features, self.impl, self.eps = in_features, out_features, impl, eps
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.norm = _NormWeight(in_features)
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return bitlinear(x, self.norm.weight, self.weight, self.impl, self.eps)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, impl={self.impl}"
