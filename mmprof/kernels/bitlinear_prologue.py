"""BitLinear with the op before it folded into its input pass, for one to three projections that
share the input: the MatMul-free model's fused path.

    prologue      BitLinear input u                            in the model
    "none"        x                                            (any BitLinear)
    "norm"        RMSNorm(x) * w0                              i/f/g_proj after attn_norm; lm_head
    "add_norm"    x2 = x + m (returned); RMSNorm(x2) * w0      gate_proj after the residual add, mlp_norm
    "glu"         silu(a) * b with [a | b] = x                 down_proj
    "norm_gate"   RMSNorm(g) * w0 * silu(c), g = x, c = aux    o_proj after the MLGRU output gate

then per projection k, y_k = BitLinear(u; g_k, W_k) (its own RMSNorm, eps 1e-8, int8 per-token
activations, ternary per-tensor weights, straight-through gradients; see `bitlinear.py`).

The forward op `mmprof::bitlinear_prologue_fwd` saves only its inputs and fp32 statistics per row;
backward (`mmprof::bitlinear_prologue_bwd`) recomputes u, the quantized activations and the ternary
weights. So u, the normalized/quantized activations and the prologue's output are never kept for
backward: the unfused model keeps each of them. Both ops have fake implementations (meta tensors,
FakeTensor, torch.compile). On CUDA the row work is the Triton kernels of `bitlinear_triton.py`;
elsewhere (and with backend="torch") the same steps in plain PyTorch (`bitlinear_torch.py`), so the
same tensors are saved everywhere. The
matmuls are torch.mm in the matmul dtype (autocast's when on, as F.linear).

`quantized_input` is the "quantize only" variant (the lm_head before the chunked cross-entropy) and
`ternary_weight` the weight quantizer with a straight-through gradient. The twin is
`bitlinear_prologue_ref`: the unfused model's own ops, differentiated by autograd.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mmprof.kernels import bitlinear_torch as rows_torch
from mmprof.kernels import bitlinear_triton as tri
from mmprof.kernels._triton_util import select_backend
from mmprof.kernels.w2a8_gemm import int8_ternary_linear
from mmprof.kernels.norm_gate import rms_norm_silu_gate_ref
from mmprof.kernels.ternary import NORM_EPS, autocast_dtype as _autocast_dtype, autocast_off as _autocast_off
from mmprof.kernels.ternary import bitlinear_naive, rms_norm
from mmprof.settings import int8_forward_enabled

PROLOGUES = tri.PROLOGUES
_PRE_NORMED = ("norm", "add_norm", "norm_gate")

# ---------------------------------------------------------------------------------------------
# The twin: the unfused model's ops
# ---------------------------------------------------------------------------------------------


def prologue_ref(prologue, x, aux=None, pre_weight=None, pre_eps=1e-6):
    """The prologue as the unfused model computes it -> (u, x2 or None)."""
    if prologue == "none":
        return x, None
    if prologue == "norm":
        return rms_norm(x, pre_weight, pre_eps), None
    if prologue == "add_norm":
        x2 = x + aux
        return rms_norm(x2, pre_weight, pre_eps), x2
    if prologue == "glu":
        a, b = x.chunk(2, dim=-1)
        return F.silu(a) * b, None
    if prologue == "norm_gate":
        return rms_norm_silu_gate_ref(x, aux, pre_weight, pre_eps), None
    raise ValueError(f"unknown prologue {prologue!r}; expected one of {PROLOGUES}")


def bitlinear_prologue_ref(prologue, x, norm_weights, weights, *, aux=None, pre_weight=None, pre_eps=1e-6,
                           eps=NORM_EPS):  # fmt: skip
    """The twin of `bitlinear_prologue`: (tuple of y_k, x2 or None)."""
    u, x2 = prologue_ref(prologue, x, aux, pre_weight, pre_eps)
    return tuple(bitlinear_naive(u, g, w, eps) for g, w in zip(norm_weights, weights)), x2


_TRITON = (tri.quantize_rows, tri.quantize_rows_backward, tri.ternary_weight)
_TORCH = (rows_torch.quantize_rows, rows_torch.quantize_rows_backward, rows_torch.ternary_weight)


def _impl(backend, x):
    backend = "triton" if backend == INT8_BACKEND else backend
    return _TRITON if select_backend(backend, x) == "triton" and x.numel() > 0 else _TORCH


# The forward product on int8 tensor cores (issue 26): backend "triton-int8" asks for it (also on the
# CPU under the Triton interpreter); "auto" takes it on CUDA GPUs with int8 tensor cores (sm_80+) when
# the matmul dtype is bf16 or fp16, unless MMPROF_INT8_FORWARD=0. The backward is the same either way.
INT8_BACKEND = "triton-int8"


def _int8_forward(backend, x, mm):
    if backend == INT8_BACKEND:
        return True
    if backend != "auto" or not x.is_cuda or mm not in (torch.bfloat16, torch.float16):
        return False
    if not int8_forward_enabled():
        return False
    return torch.cuda.get_device_capability(x.device) >= (8, 0)


# ---------------------------------------------------------------------------------------------
# Forward and backward bodies, written once over either set of row steps
# ---------------------------------------------------------------------------------------------


def _forward(impl, prologue, x, aux, pre_weight, norm_weights, weights, mm, pre_eps, eps, matmul, int8=False):
    quantize, _, ternary = impl
    with _autocast_off(x.device.type):
        if int8 and matmul and impl is _TRITON:  # int8 levels x ternary levels, scales in the epilogue
            q, x2, r0, r, s = quantize(prologue, x, aux, pre_weight, torch.stack(norm_weights), pre_eps, eps, torch.int8)
            ys = [int8_ternary_linear(q[k], s[k], *tri.ternary_levels(w), mm) for k, w in enumerate(weights)]
            return ys, x2, r0, r, s
        xq, x2, r0, r, s = quantize(prologue, x, aux, pre_weight, torch.stack(norm_weights), pre_eps, eps, mm)
        if not matmul:
            return [xq[0]], x2, r0, r, s
        ys = [torch.mm(xq[k], ternary(w, mm).t()) for k, w in enumerate(weights)]
    return ys, x2, r0, r, s


def _backward(impl, grads, grad_x2, x, aux, pre_weight, norm_weights, weights, r0, r, s, mm, prologue, pre_eps,
              eps, matmul):  # fmt: skip
    quantize, quantize_backward, ternary = impl
    stacked = torch.stack(norm_weights)
    with _autocast_off(x.device.type):
        if matmul:
            grads = [g.to(mm) for g in grads]
            wq = [ternary(w, mm) for w in weights]
            xq = quantize(prologue, x, aux, pre_weight, stacked, pre_eps, eps, mm, stats=(r0, r, s))[0]
            d_weights = [torch.mm(g.t(), xq[k]).to(w.dtype) for k, (g, w) in enumerate(zip(grads, weights))]
            del xq
            d_xn = torch.empty((len(weights), x.shape[0], wq[0].shape[1]), device=x.device, dtype=mm)
            for k, g in enumerate(grads):  # straight through the activation quantizer
                torch.mm(g, wq[k], out=d_xn[k])
        else:
            d_xn, d_weights = grads[0].unsqueeze(0), []
        dx, daux, d_pre, d_norm = quantize_backward(
            prologue, x, aux, pre_weight, stacked, r0, r, d_xn, grad_x2, pre_eps
        )
    d_norms = [d_norm[k].to(g.dtype, copy=True) for k, g in enumerate(norm_weights)]  # outputs must not alias
    d_pre = d_pre.to(pre_weight.dtype) if d_pre is not None else None
    return dx, daux, d_pre, d_norms, d_weights


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------


def _absent(x):
    return x.new_empty(0, dtype=torch.float32)


@torch.library.custom_op("mmprof::bitlinear_prologue_fwd", mutates_args=())
def _fwd_op(
    x: Tensor, aux: Optional[Tensor], pre_weight: Optional[Tensor], norm_weights: List[Tensor],
    weights: List[Tensor], mm_dtype: torch.dtype, prologue: str, pre_eps: float, eps: float, matmul: bool,
    backend: str,
) -> List[Tensor]:  # fmt: skip
    """-> [y_1..y_P (or the quantized input when not matmul), x2, prologue rstd, rstd, scales [P, N]];
    x2 and the prologue rstd are empty when the prologue has none."""
    ys, x2, r0, r, s = _forward(_impl(backend, x), prologue, x, aux, pre_weight, norm_weights, weights,
                                mm_dtype, pre_eps, eps, matmul, _int8_forward(backend, x, mm_dtype))  # fmt: skip
    return [*ys, x2 if x2 is not None else _absent(x), r0 if r0 is not None else _absent(x), r, s]


@_fwd_op.register_fake
def _(x, aux, pre_weight, norm_weights, weights, mm_dtype, prologue, pre_eps, eps, matmul, backend):
    rows, k = x.shape[0], tri.in_features(prologue, x)
    if matmul:
        ys = [x.new_empty((rows, w.shape[0]), dtype=mm_dtype) for w in weights]
    else:
        ys = [x.new_empty((rows, k), dtype=mm_dtype)]
    x2 = _absent(x)
    if prologue == "add_norm":
        x2 = x.new_empty((rows, k), dtype=torch.promote_types(x.dtype, aux.dtype))
    r0 = x.new_empty(rows, dtype=torch.float32) if prologue in _PRE_NORMED else _absent(x)
    stats = [x.new_empty(rows, dtype=torch.float32), x.new_empty((len(norm_weights), rows), dtype=torch.float32)]
    return [*ys, x2, r0, *stats]


@torch.library.custom_op("mmprof::bitlinear_prologue_bwd", mutates_args=())
def _bwd_op(
    grads: List[Tensor], grad_x2: Optional[Tensor], x: Tensor, aux: Optional[Tensor], pre_weight: Optional[Tensor],
    norm_weights: List[Tensor], weights: List[Tensor], r0: Tensor, r: Tensor, s: Tensor, mm_dtype: torch.dtype,
    prologue: str, pre_eps: float, eps: float, matmul: bool, backend: str,
) -> List[Tensor]:  # fmt: skip
    """-> [dx, d aux, d pre_weight (both empty when absent), d norm_weights..., d weights...]."""
    dx, daux, d_pre, d_norms, d_weights = _backward(
        _impl(backend, x), grads, grad_x2, x, aux, pre_weight, norm_weights, weights,
        r0 if r0.numel() else None, r, s, mm_dtype, prologue, pre_eps, eps, matmul,
    )  # fmt: skip
    return [dx, daux if daux is not None else _absent(x), d_pre if d_pre is not None else _absent(x),
            *d_norms, *d_weights]  # fmt: skip


@_bwd_op.register_fake
def _(grads, grad_x2, x, aux, pre_weight, norm_weights, weights, r0, r, s, mm_dtype, prologue, pre_eps, eps,
      matmul, backend):  # fmt: skip
    daux = torch.empty_like(aux) if prologue in ("add_norm", "norm_gate") else _absent(x)
    d_pre = torch.empty_like(pre_weight) if prologue in _PRE_NORMED else _absent(x)
    d_weights = [torch.empty_like(w) for w in weights] if matmul else []
    return [torch.empty_like(x), daux, d_pre, *(torch.empty_like(g) for g in norm_weights), *d_weights]


def _setup_context(ctx, inputs, output):
    x, aux, pre_weight, norm_weights, weights, mm_dtype, prologue, pre_eps, eps, matmul, backend = inputs
    r0, r, s = output[-3:]
    ctx.mark_non_differentiable(r0, r, s)
    ctx.save_for_backward(x, aux, pre_weight, r0, r, s, *norm_weights, *weights)
    ctx.n_norms = len(norm_weights)
    ctx.options = (mm_dtype, prologue, pre_eps, eps, matmul, backend)


def _backward_op(ctx, grads):
    x, aux, pre_weight, r0, r, s, *params = ctx.saved_tensors
    norm_weights, weights = params[: ctx.n_norms], params[ctx.n_norms :]
    mm_dtype, prologue, pre_eps, eps, matmul, backend = ctx.options
    outputs = len(weights) if matmul else 1
    ys_grads = [g.contiguous() for g in grads[:outputs]]
    grad_x2 = None
    if prologue == "add_norm":
        grad_x2 = grads[outputs]
        grad_x2 = torch.zeros_like(x, dtype=torch.promote_types(x.dtype, aux.dtype)) if grad_x2 is None else grad_x2
        grad_x2 = grad_x2.contiguous()
    dx, daux, d_pre, *rest = torch.ops.mmprof.bitlinear_prologue_bwd(
        ys_grads, grad_x2, x, aux, pre_weight, norm_weights, weights, r0, r, s, *ctx.options
    )
    return (
        dx,
        daux if aux is not None else None,
        d_pre if pre_weight is not None else None,
        rest[: ctx.n_norms],
        rest[ctx.n_norms :],  # an empty list when not matmul
        None, None, None, None, None, None,
    )  # fmt: skip


_fwd_op.register_autograd(_backward_op, setup_context=_setup_context)


@torch.library.custom_op("mmprof::ternary_weight", mutates_args=())
def _ternary_op(weight: Tensor, dtype: torch.dtype, backend: str) -> Tensor:
    _, _, ternary = _impl(backend, weight)
    return ternary(weight, dtype)


@_ternary_op.register_fake
def _(weight, dtype, backend):
    return weight.new_empty(weight.shape, dtype=dtype)


def _ternary_backward(ctx, grad):
    return grad.to(ctx.weight_dtype), None, None


def _ternary_setup(ctx, inputs, output):
    ctx.weight_dtype = inputs[0].dtype


_ternary_op.register_autograd(_ternary_backward, setup_context=_ternary_setup)

# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def _check(prologue, x, aux, pre_weight, norm_weights):
    if prologue not in PROLOGUES:
        raise ValueError(f"unknown prologue {prologue!r}; expected one of {PROLOGUES}")
    if not 1 <= len(norm_weights) <= tri.MAX_PROJECTIONS:
        raise ValueError(f"1 to {tri.MAX_PROJECTIONS} projections per call, got {len(norm_weights)}")
    k = x.shape[-1] // 2 if prologue == "glu" else x.shape[-1]
    if prologue == "glu" and x.shape[-1] % 2:
        raise ValueError(f"the glu prologue needs an even last dim, got {x.shape[-1]}")
    if (aux is not None) != (prologue in ("add_norm", "norm_gate")):
        raise ValueError(f"prologue {prologue!r} {'needs' if aux is None else 'takes no'} aux")
    if aux is not None and aux.shape != x.shape:
        raise ValueError(f"aux must have x's shape {tuple(x.shape)}, got {tuple(aux.shape)}")
    if (pre_weight is not None) != (prologue in _PRE_NORMED):
        raise ValueError(f"prologue {prologue!r} {'needs' if pre_weight is None else 'takes no'} pre_weight")
    for w in [*norm_weights, *([pre_weight] if pre_weight is not None else [])]:
        if w.shape != (k,):
            raise ValueError(f"norm weights must be [{k}], got {tuple(w.shape)}")
    return k


def _rows(t):
    return t.reshape(-1, t.shape[-1]).contiguous() if t is not None else None


def bitlinear_prologue(prologue, x, norm_weights, weights, *, aux=None, pre_weight=None, pre_eps=1e-6,
                       eps=NORM_EPS, backend="auto"):  # fmt: skip
    """BitLinear(s) of prologue(x): x [..., K] ([..., 2K] for glu), aux [..., K] for add_norm and
    norm_gate, pre_weight [K] for the normed prologues, 1-3 norm weights [K] and weights [N_k, K].
    Returns (tuple of y_k [..., N_k] in the matmul dtype, x2 = x + aux for add_norm else None).
    backend: "auto" (Triton on CUDA, PyTorch elsewhere; the int8 forward on sm_80+, see `INT8_BACKEND`)
    | "triton" (bf16 forward) | "triton-int8" | "torch"."""
    k = _check(prologue, x, aux, pre_weight, norm_weights)
    if len(weights) != len(norm_weights) or any(w.dim() != 2 or w.shape[1] != k for w in weights):
        raise ValueError(f"need one weight [N, {k}] per norm weight")
    cast = _autocast_dtype(x.device.type)
    u_dtype = torch.promote_types(x.dtype, aux.dtype) if prologue == "add_norm" else x.dtype
    mm = cast if cast is not None else torch.promote_types(u_dtype, weights[0].dtype)
    out = torch.ops.mmprof.bitlinear_prologue_fwd(
        _rows(x), _rows(aux), pre_weight, list(norm_weights), list(weights), mm, prologue, float(pre_eps),
        float(eps), True, backend,
    )  # fmt: skip
    lead = x.shape[:-1]
    ys = tuple(y.view(*lead, y.shape[-1]) for y in out[: len(weights)])
    return ys, out[len(weights)].view(*lead, k) if prologue == "add_norm" else None


def quantized_input(prologue, x, norm_weight, dtype, *, aux=None, pre_weight=None, pre_eps=1e-6, eps=NORM_EPS,
                    backend="auto"):  # fmt: skip
    """BitLinear's fake-quantized activations of prologue(x) in `dtype` (q / s, the matmul's left
    operand), with the straight-through gradient; saves only x and per-row statistics."""
    k = _check(prologue, x, aux, pre_weight, [norm_weight])
    out = torch.ops.mmprof.bitlinear_prologue_fwd(
        _rows(x), _rows(aux), pre_weight, [norm_weight], [], dtype, prologue, float(pre_eps), float(eps), False,
        backend,
    )  # fmt: skip
    return out[0].view(*x.shape[:-1], k)


def ternary_weight(weight, dtype, *, backend="auto"):
    """Ternary weights round(W / mean|W|).clamp(-1, 1) * mean|W| in `dtype`, straight-through gradient."""
    return torch.ops.mmprof.ternary_weight(weight, dtype, backend)


# ---------------------------------------------------------------------------------------------
# The plain BitLinear op (`mmprof::bitlinear_fused`) on CUDA: the same bodies with no prologue
# ---------------------------------------------------------------------------------------------


def _plain_forward_cuda(x2d, norm_weight, weight, eps, mm):
    ys, _, _, r, s = _forward(_TRITON, "none", x2d, None, None, [norm_weight], [weight], mm, 0.0, eps, True,
                              _int8_forward("auto", x2d, mm))  # fmt: skip
    return ys[0], r, s[0]


def _plain_backward_cuda(grad_y, x2d, norm_weight, weight, r, s, eps, mm):
    dx, _, _, d_norms, d_weights = _backward(
        _TRITON, [grad_y], None, x2d, None, None, [norm_weight], [weight], None, r, s.unsqueeze(0), mm,
        "none", 0.0, eps, True,
    )  # fmt: skip
    return dx, d_norms[0], d_weights[0]


# What `bitlinear.py` registers for the op `mmprof::bitlinear_fused` on CUDA (this file does not import it).
CUDA_BODIES = (_plain_forward_cuda, _plain_backward_cuda)
