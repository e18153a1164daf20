"""The MLGRU output gate RMSNorm(g) * weight * silu(c) fused, and its plain-PyTorch twin.

`rms_norm_silu_gate` is the custom op `mmprof::norm_gate_fwd` (backward `mmprof::norm_gate_bwd`)
with fake implementations. Backward keeps g, c and one fp32 rstd per row (plus the weight) and
recomputes the normalised g and silu(c) from them.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from mmprof.kernels._triton_util import device_guard, persistent_programs, row_block, select_backend
from mmprof.kernels.ternary import rms_inv


def rms_norm_silu_gate_ref(g, c, weight, eps=1e-6):
    """The twin, in fp32, result in g's dtype."""
    g32 = g.float()
    normed = g32 * rms_inv(g32, eps)
    return (normed * weight.float() * F.silu(c.float())).to(g.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels: one row at a time, the whole row in one block
# ---------------------------------------------------------------------------------------------


@triton.jit
def norm_silu_gate_grads(g, c, rstd, w, do, D):
    """Gradients of out = g * rstd * w * silu(c) for one row (fp32 blocks): d g, d c, and the row's d w."""
    normed = g * rstd
    sc = tl.sigmoid(c)
    gate = c * sc
    dnormed = do * w * gate
    dg = rstd * (dnormed - normed * (tl.sum(dnormed * normed, axis=0) / D))
    dc = do * normed * w * sc * (1 + c * (1 - sc))
    return dg, dc, do * normed * gate


@triton.jit
def _norm_gate_fwd_kernel(g_ptr, c_ptr, w_ptr, o_ptr, rstd_ptr, D, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    g = tl.load(g_ptr + row * D + cols, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + row * D + cols, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(g * g, axis=0) / D + eps)
    o = g * rstd * w * c * tl.sigmoid(c)
    tl.store(o_ptr + row * D + cols, o.to(o_ptr.dtype.element_ty), mask=ok)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _norm_gate_bwd_kernel(
    g_ptr, c_ptr, w_ptr, rstd_ptr, do_ptr, dg_ptr, dc_ptr, dw_ptr,
    N, D, rows_per_program, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program):
        r = first + i
        ok_row = cols < tl.where(r < N, D, 0)
        offs = r * D + cols
        g = tl.load(g_ptr + offs, mask=ok_row, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + offs, mask=ok_row, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + offs, mask=ok_row, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + tl.minimum(r, N - 1))  # past the end: any row, all stores masked
        dg, dc, dw_row = norm_silu_gate_grads(g, c, rstd, w, do, D)
        dw += dw_row
        tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=ok_row)
        tl.store(dc_ptr + offs, dc.to(dc_ptr.dtype.element_ty), mask=ok_row)
    tl.store(dw_ptr + pid * D + cols, dw, mask=ok)


def _fwd_triton(g, c, weight, eps):
    dim = g.shape[-1]
    rows = g.numel() // dim
    out = torch.empty_like(g)
    rstd = torch.empty(g.shape[:-1], device=g.device, dtype=torch.float32)
    block, warps = row_block(dim)
    with device_guard(g):
        _norm_gate_fwd_kernel[(rows,)](g, c, weight, out, rstd, dim, eps, BLOCK_D=block, num_warps=warps)
    return out, rstd


def _bwd_triton(g, c, weight, rstd, grad_out):
    dim = g.shape[-1]
    rows = g.numel() // dim
    programs = persistent_programs(g.device, rows)
    rows_per_program = triton.cdiv(rows, programs)
    dg = torch.empty_like(g)
    dc = torch.empty_like(c)
    dw_rows = torch.empty(programs, dim, device=g.device, dtype=torch.float32)
    block, warps = row_block(dim)
    with device_guard(g):
        _norm_gate_bwd_kernel[(programs,)](
            g, c, weight, rstd, grad_out, dg, dc, dw_rows, rows, dim, rows_per_program,
            BLOCK_D=block, num_warps=warps,
        )  # fmt: skip
    return dg, dc, dw_rows.sum(0)


# ---------------------------------------------------------------------------------------------
# Plain-PyTorch forward and backward saving the same tensors (CPU, or backend="torch")
# ---------------------------------------------------------------------------------------------


def _fwd_torch(g, c, weight, eps):
    g32 = g.float()
    rstd = torch.rsqrt(g32.pow(2).mean(-1) + eps)
    out = g32 * rstd[..., None] * weight.float() * F.silu(c.float())
    return out.to(g.dtype), rstd


def _bwd_torch(g, c, weight, rstd, grad_out):
    c32, do, w = c.float(), grad_out.float(), weight.float()
    normed = g.float() * rstd[..., None]
    sc = torch.sigmoid(c32)
    gate = c32 * sc
    dnormed = do * w * gate
    dg = rstd[..., None] * (dnormed - normed * (dnormed * normed).mean(-1, keepdim=True))
    dc = do * normed * w * sc * (1 + c32 * (1 - sc))
    dw = (do * normed * gate).reshape(-1, g.shape[-1]).sum(0)
    return dg.to(g.dtype), dc.to(c.dtype), dw


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("mmprof::norm_gate_fwd", mutates_args=())
def _norm_gate_fwd(
    g: torch.Tensor, c: torch.Tensor, weight: torch.Tensor, eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (output in g's dtype, rstd [rows] fp32)."""
    if select_backend(backend, g) == "triton" and g.numel() > 0:
        return _fwd_triton(g, c, weight, eps)
    return _fwd_torch(g, c, weight, eps)


@_norm_gate_fwd.register_fake
def _(g, c, weight, eps, backend):
    return torch.empty_like(g), g.new_empty(g.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("mmprof::norm_gate_bwd", mutates_args=())
def _norm_gate_bwd(
    g: torch.Tensor, c: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, grad_out: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (d g, d c, d weight in fp32)."""
    if select_backend(backend, g) == "triton" and g.numel() > 0:
        return _bwd_triton(g, c, weight, rstd, grad_out)
    return _bwd_torch(g, c, weight, rstd, grad_out)


@_norm_gate_bwd.register_fake
def _(g, c, weight, rstd, grad_out, backend):
    return torch.empty_like(g), torch.empty_like(c), weight.new_empty(weight.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    g, c, weight, _, backend = inputs
    _, rstd = output
    ctx.save_for_backward(g, c, weight, rstd)
    ctx.backend = backend


def _backward(ctx, grad_out, _grad_rstd):
    g, c, weight, rstd = ctx.saved_tensors
    dg, dc, dw = _norm_gate_bwd(g, c, weight, rstd, grad_out.contiguous(), ctx.backend)
    return dg, dc, dw.to(weight.dtype), None, None


_norm_gate_fwd.register_autograd(_backward, setup_context=_setup_context)


def rms_norm_silu_gate(g, c, weight, eps=1e-6, *, backend="auto"):
    """RMSNorm(g) * weight * silu(c) over the last dim; g and c [..., D], weight [D]; result in g's dtype.
    c is kept in its own dtype (an fp32 MLGRU output is not copied to g's dtype).

    backend: "auto" (Triton on CUDA, PyTorch elsewhere) | "triton" | "torch".
    """
    if g.shape != c.shape:
        raise ValueError(f"g and c must have the same shape; got {tuple(g.shape)} and {tuple(c.shape)}")
    if weight.shape != g.shape[-1:]:
        raise ValueError(f"weight must be [{g.shape[-1]}], got {tuple(weight.shape)}")
    out, _ = _norm_gate_fwd(g.contiguous(), c.contiguous(), weight.contiguous(), float(eps), backend)
    return out
