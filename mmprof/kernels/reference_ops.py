"""The reference implementation's fused ops, written again in plain PyTorch with the same saved tensors.

The MatMul-free reference (ridgerchu/matmulfreellm) runs its model through Triton ops that each keep
a few tensors for backward; the `vanilla` and `ref-fused` BitLinear rows of mmprof must keep exactly
those, or their memory is not the paper's. Each op here is a `torch.autograd.Function` whose forward
and backward are plain PyTorch (so they run on CPU, CUDA, meta and fake tensors alike) and whose
`save_for_backward` holds what the reference's op holds, in the same dtypes:

- `rms_norm_keep_input` (modules/layernorm.py `RMSNorm`, `rms_norm_fn`): keeps its input (or, with
  a residual, the sum x + residual in the residual's dtype) and one fp32 rstd per row; the output
  has the input's dtype (no autocast: an fp32 residual stream gives an fp32 output).
- `swiglu` (modules/activations.py `SwiGLUFunction`): silu(x) * y, keeps x and y; the output has
  the promoted dtype of x and y.
- `bitlinear_vanilla` (ops/bitnet.py `BitLinear`, the paper's unfused baseline): the RMSNorm above
  (eps 1e-8), fake-quantisation written `x + (q(x) - x).detach()`, then `F.linear`; autograd keeps
  what `F.linear` keeps (under autocast the bf16 copies of the quantised activations and weights).
- `bitlinear_ref_fused` (ops/fusedbitnet.py `FusedBitLinear`, the class the published models use):
  norm and activation quantisation fused; keeps the input x, one fp32 rstd per row and the ternary
  weight in the matmul dtype; backward recomputes the quantised activations. Its eps is 1e-6: the
  reference passes no eps to `layer_norm_linear_quant_fn`, whose default is 1e-6 (its `norm.eps`
  of 1e-8 is never read).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from mmprof.kernels.ternary import (
    NORM_EPS,
    REF_FUSED_EPS,
    act_quant,
    act_scale,
    autocast_dtype,
    autocast_off,
    rms_inv,
    weight_quant,
)


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


def _rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """d x (fp32) and d weight (fp32) of y = x * rstd * weight, rows [M, K], rstd [M, 1]."""
    xhat = x.float() * rstd
    wdy = dy.float() * weight.float()
    d_weight = (dy.float() * xhat).sum(0)
    dx = (wdy - xhat * (xhat * wdy).mean(-1, keepdim=True)) * rstd
    return dx, d_weight


class _RMSNormKeepInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        shape = x.shape
        x2d = _rows(x)
        with autocast_off(x.device.type):
            src = x2d if residual is None else (x2d + _rows(residual)).to(residual.dtype)
            xf = src.float()
            rstd = rms_inv(xf, eps)
            y = (xf * rstd * weight.float()).to(x.dtype)
        ctx.save_for_backward(src, weight, rstd)
        ctx.x_dtype, ctx.has_residual, ctx.shape = x.dtype, residual is not None, shape
        if residual is None:
            return y.view(shape), None
        return y.view(shape), src.view(shape)

    @staticmethod
    def backward(ctx, dy, d_sum):
        src, weight, rstd = ctx.saved_tensors
        dx, d_weight = _rms_norm_backward(_rows(dy), src, weight, rstd)
        if d_sum is not None:
            dx = dx + _rows(d_sum).float()
        dx = dx.view(ctx.shape)
        d_res = dx.to(src.dtype) if ctx.has_residual else None
        return dx.to(ctx.x_dtype), d_weight.to(weight.dtype), d_res, None


def rms_norm_keep_input(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
    """RMSNorm(x [+ residual]) * weight -> y in x's dtype, or (y, x + residual) with a residual."""
    y, total = _RMSNormKeepInput.apply(x, weight, residual, float(eps))
    return y if residual is None else (y, total)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        with autocast_off(x.device.type):
            out = F.silu(x.float()) * y.float()
        return out.to(torch.promote_types(x.dtype, y.dtype))

    @staticmethod
    def backward(ctx, dout):
        x, y = ctx.saved_tensors
        xf, d = x.float(), dout.float()
        sig = torch.sigmoid(xf)
        dx = d * y.float() * sig * (1 + xf * (1 - sig))
        dy = d * xf * sig
        return dx.to(x.dtype), dy.to(y.dtype)


def swiglu(x: Tensor, y: Tensor) -> Tensor:
    """silu(x) * y, keeping only x and y for backward."""
    return _SwiGLU.apply(x, y)


def bitlinear_vanilla(x: Tensor, norm_weight: Tensor, weight: Tensor, eps: float = NORM_EPS) -> Tensor:
    """The reference's unfused BitLinear: its fused RMSNorm, STE fake-quant in x's dtype, F.linear."""
    x_norm = rms_norm_keep_input(x, norm_weight, eps)
    x_quant = x_norm + (act_quant(x_norm, act_scale(x_norm)) - x_norm).detach()
    w_quant = weight + (weight_quant(weight) - weight).detach()
    return F.linear(x_quant, w_quant)


class _BitLinearRefFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, weight, eps):
        shape = x.shape
        x2d = _rows(x)
        cast = autocast_dtype(x.device.type)
        dtype = cast if cast is not None else x.dtype
        with autocast_off(x.device.type):
            xf = x2d.float()
            rstd = rms_inv(xf, eps)
            xn = xf * rstd * norm_weight.float()
            y = act_quant(xn, act_scale(xn)).to(dtype)
            del xf, xn
            w_quant = weight_quant(weight).to(dtype)
            out = F.linear(y, w_quant)
        ctx.save_for_backward(x2d, norm_weight, w_quant, rstd)
        ctx.x_dtype, ctx.w_dtype, ctx.shape = x.dtype, weight.dtype, shape
        return out.view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dout):
        x2d, norm_weight, w_quant, rstd = ctx.saved_tensors
        dout = _rows(dout).to(w_quant.dtype)
        with autocast_off(x2d.device.type):
            dy = dout @ w_quant  # straight through the activation quantiser
            dx, d_norm = _rms_norm_backward(dy, x2d, norm_weight, rstd)
            del dy
            xn = x2d.float() * rstd * norm_weight.float()
            y = act_quant(xn, act_scale(xn)).to(dout.dtype)  # recomputed, in the gradient's dtype
            del xn
            d_weight = dout.t() @ y
        return dx.to(ctx.x_dtype).view(ctx.shape), d_norm.to(norm_weight.dtype), d_weight.to(ctx.w_dtype), None


def bitlinear_ref_fused(x: Tensor, norm_weight: Tensor, weight: Tensor, eps: float = REF_FUSED_EPS) -> Tensor:
    """The reference's FusedBitLinear: keeps x, rstd and the ternary weight in the matmul dtype."""
    return _BitLinearRefFused.apply(x, norm_weight, weight, float(eps))
