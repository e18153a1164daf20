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

On CUDA, while gradients are on, every op's arithmetic (the pure functions `_*_fwd`, `_*_bwd` below,
called from inside the autograd Functions, so what is saved does not change) runs compiled by
`torch.compile(fullgraph=True, dynamic=False)` into a few fused kernels instead of a dozen elementwise
ones, as the reference's Triton kernels are; the matmuls stay cuBLAS. The plain-PyTorch run of the same
functions is the twin and the path everywhere else: CPU, meta, fake tensors, no-grad (decoding), under a
dispatch mode (the live-tensor tracker), CUDA-graph capture, a compile trace, and with
MMPROF_REFERENCE_FAST=0 (`mmprof.settings`). In `vanilla`'s fake-quantisation the compiled path
computes `x + (q(x) - x)` in one kernel with an identity backward, which is what the detach spelling
differentiates to; neither keeps anything for backward.
"""

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

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
from mmprof.settings import reference_fast_enabled

RECOMPILE_LIMIT = 64  # graphs per body: a few shapes and dtypes per model, times the sizes a process runs


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


# ---------------------------------------------------------------------------------------------
# Which bodies run: compiled on CUDA while training, plain PyTorch everywhere else
# ---------------------------------------------------------------------------------------------


def compiled_bodies(t: Tensor) -> bool:
    """True when the ops' bodies run compiled for a call on `t`: a plain CUDA tensor (not fake or
    another subclass) with gradients on, no dispatch mode, CUDA-graph capture or compile trace active,
    and MMPROF_REFERENCE_FAST not 0."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or not t.is_cuda or not torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    return not torch.cuda.is_current_stream_capturing() and reference_fast_enabled()


@functools.cache
def _compiled(body):
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
    # emulate_precision_casts: round to bf16 where the twin's ops do (else inductor keeps fp32 between
    # fused ops, and bf16 fake-quantisation flips a few levels)
    return torch.compile(body, fullgraph=True, dynamic=False, options={"emulate_precision_casts": True})


def _run(body, fast: bool):
    return _compiled(body) if fast else body


# ---------------------------------------------------------------------------------------------
# The ops' arithmetic as pure functions (the twin runs them as they are)
# ---------------------------------------------------------------------------------------------


def _rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """d x (fp32) and d weight (fp32) of y = x * rstd * weight, rows [M, K], rstd [M, 1]."""
    xhat = x.float() * rstd
    wdy = dy.float() * weight.float()
    d_weight = (dy.float() * xhat).sum(0)
    dx = (wdy - xhat * (xhat * wdy).mean(-1, keepdim=True)) * rstd
    return dx, d_weight


def _rms_fwd(x2d: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(y in x's dtype, fp32 rstd [M, 1])."""
    xf = x2d.float()
    rstd = rms_inv(xf, eps)
    return (xf * rstd * weight.float()).to(x2d.dtype), rstd


def _rms_fwd_residual(x2d: Tensor, res2d: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(x + residual in the residual's dtype, y in x's dtype, fp32 rstd [M, 1])."""
    src = (x2d + res2d).to(res2d.dtype)
    xf = src.float()
    rstd = rms_inv(xf, eps)
    return src, (xf * rstd * weight.float()).to(x2d.dtype), rstd


def _rms_bwd(dy, src, weight, rstd, d_sum, x_dtype: torch.dtype, res_dtype: torch.dtype | None):
    """(d x in x's dtype, d weight in its dtype, d residual in its dtype or None)."""
    dx, d_weight = _rms_norm_backward(dy, src, weight, rstd)
    if d_sum is not None:
        dx = dx + d_sum.float()
    d_res = dx.to(res_dtype) if res_dtype is not None else None
    return dx.to(x_dtype), d_weight.to(weight.dtype), d_res


def _swiglu_fwd(x: Tensor, y: Tensor) -> Tensor:
    return (F.silu(x.float()) * y.float()).to(torch.promote_types(x.dtype, y.dtype))


def _swiglu_bwd(x: Tensor, y: Tensor, dout: Tensor) -> tuple[Tensor, Tensor]:
    xf, d = x.float(), dout.float()
    sig = torch.sigmoid(xf)
    dx = d * y.float() * sig * (1 + xf * (1 - sig))
    dy = d * xf * sig
    return dx.to(x.dtype), dy.to(y.dtype)


def _norm_quant_fwd(x2d: Tensor, norm_weight: Tensor, eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(quantised normalised x in `dtype`, fp32 rstd [M, 1])."""
    xf = x2d.float()
    rstd = rms_inv(xf, eps)
    xn = xf * rstd * norm_weight.float()
    return act_quant(xn, act_scale(xn)).to(dtype), rstd


def _weight_quant_to(weight: Tensor, dtype: torch.dtype) -> Tensor:
    return weight_quant(weight).to(dtype)


def _norm_quant_bwd(dy, x2d, norm_weight, rstd, x_dtype: torch.dtype, y_dtype: torch.dtype):
    """(d x in x's dtype, d norm weight in its dtype, the quantised activations recomputed in y_dtype)."""
    dx, d_norm = _rms_norm_backward(dy, x2d, norm_weight, rstd)
    xn = x2d.float() * rstd * norm_weight.float()
    y = act_quant(xn, act_scale(xn)).to(y_dtype)
    return dx.to(x_dtype), d_norm.to(norm_weight.dtype), y


def _fake_quant_act(x: Tensor) -> Tensor:
    """The value of `x + (act_quant(x) - x).detach()`, in x's dtype."""
    return x + (act_quant(x, act_scale(x)) - x)


def _fake_quant_weight(w: Tensor) -> Tensor:
    """The value of `w + (weight_quant(w) - w).detach()`, in w's dtype."""
    return w + (weight_quant(w) - w)


# ---------------------------------------------------------------------------------------------
# The autograd Functions: what each saves does not depend on the body that runs
# ---------------------------------------------------------------------------------------------


class _RMSNormKeepInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps, fast):
        shape = x.shape
        x2d = _rows(x)
        with autocast_off(x.device.type):
            if residual is None:
                src = x2d
                y, rstd = _run(_rms_fwd, fast)(x2d, weight, eps)
            else:
                src, y, rstd = _run(_rms_fwd_residual, fast)(x2d, _rows(residual), weight, eps)
        ctx.save_for_backward(src, weight, rstd)
        ctx.x_dtype, ctx.shape, ctx.fast = x.dtype, shape, fast
        ctx.res_dtype = residual.dtype if residual is not None else None
        if residual is None:
            return y.view(shape), None
        return y.view(shape), src.view(shape)

    @staticmethod
    def backward(ctx, dy, d_sum):
        src, weight, rstd = ctx.saved_tensors
        d_sum = _rows(d_sum) if d_sum is not None else None
        with autocast_off(src.device.type):
            dx, d_weight, d_res = _run(_rms_bwd, ctx.fast)(
                _rows(dy), src, weight, rstd, d_sum, ctx.x_dtype, ctx.res_dtype
            )
        d_res = d_res.view(ctx.shape) if d_res is not None else None
        return dx.view(ctx.shape), d_weight, d_res, None, None


def rms_norm_keep_input(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
    """RMSNorm(x [+ residual]) * weight -> y in x's dtype, or (y, x + residual) with a residual."""
    y, total = _RMSNormKeepInput.apply(x, weight, residual, float(eps), compiled_bodies(x))
    return y if residual is None else (y, total)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, fast):
        ctx.save_for_backward(x, y)
        ctx.fast = fast
        with autocast_off(x.device.type):
            return _run(_swiglu_fwd, fast)(x, y)

    @staticmethod
    def backward(ctx, dout):
        x, y = ctx.saved_tensors
        with autocast_off(x.device.type):
            dx, dy = _run(_swiglu_bwd, ctx.fast)(x, y, dout)
        return dx, dy, None


def swiglu(x: Tensor, y: Tensor) -> Tensor:
    """silu(x) * y, keeping only x and y for backward."""
    return _SwiGLU.apply(x, y, compiled_bodies(x))


class _StraightThrough(torch.autograd.Function):
    """body(t) forward, the identity backward; keeps nothing."""

    @staticmethod
    def forward(ctx, t, body):
        with autocast_off(t.device.type):
            return _compiled(body)(t)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def bitlinear_vanilla(x: Tensor, norm_weight: Tensor, weight: Tensor, eps: float = NORM_EPS) -> Tensor:
    """The reference's unfused BitLinear: its fused RMSNorm, STE fake-quant in x's dtype, F.linear."""
    x_norm = rms_norm_keep_input(x, norm_weight, eps)
    if compiled_bodies(x):
        x_quant = _StraightThrough.apply(x_norm, _fake_quant_act)
        w_quant = _StraightThrough.apply(weight, _fake_quant_weight)
    else:
        x_quant = x_norm + (act_quant(x_norm, act_scale(x_norm)) - x_norm).detach()
        w_quant = weight + (weight_quant(weight) - weight).detach()
    return F.linear(x_quant, w_quant)


class _BitLinearRefFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, weight, eps, fast):
        shape = x.shape
        x2d = _rows(x)
        cast = autocast_dtype(x.device.type)
        dtype = cast if cast is not None else x.dtype
        with autocast_off(x.device.type):
            y, rstd = _run(_norm_quant_fwd, fast)(x2d, norm_weight, eps, dtype)
            w_quant = _run(_weight_quant_to, fast)(weight, dtype)
            out = F.linear(y, w_quant)
        ctx.save_for_backward(x2d, norm_weight, w_quant, rstd)
        ctx.x_dtype, ctx.w_dtype, ctx.shape, ctx.fast = x.dtype, weight.dtype, shape, fast
        return out.view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dout):
        x2d, norm_weight, w_quant, rstd = ctx.saved_tensors
        dout = _rows(dout).to(w_quant.dtype)
        with autocast_off(x2d.device.type):
            dy = dout @ w_quant  # straight through the activation quantiser
            # y: the quantised activations recomputed, in the gradient's dtype
            dx, d_norm, y = _run(_norm_quant_bwd, ctx.fast)(dy, x2d, norm_weight, rstd, ctx.x_dtype, dout.dtype)
            del dy
            d_weight = dout.t() @ y
        return dx.view(ctx.shape), d_norm, d_weight.to(ctx.w_dtype), None, None


def bitlinear_ref_fused(x: Tensor, norm_weight: Tensor, weight: Tensor, eps: float = REF_FUSED_EPS) -> Tensor:
    """The reference's FusedBitLinear: keeps x, rstd and the ternary weight in the matmul dtype."""
    return _BitLinearRefFused.apply(x, norm_weight, weight, float(eps), compiled_bodies(x))
