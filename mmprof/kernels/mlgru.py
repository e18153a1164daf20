"""MLGRU recurrence with its gates computed inside the kernel (the gates, the twin `mlgru_ref`, the
decoding step `mlgru_step` and the scans it runs off CUDA are `mlgru_scan`'s).

    f_t = lb + (1 - lb) * sigmoid(f_pre_t)        i_t = silu(i_pre_t) * (1 - f_t)
    c_t = f_t * c_{t-1} + i_t                     (fp32 state, c_0 = state or 0)
    h_t = c_t in the inputs' dtype;  final_state = c_T in fp32

`mlgru` calls the torch custom op `mmprof::mlgru_fwd` (its backward is the op `mmprof::mlgru_bwd`);
both have fake implementations, so it runs on meta tensors, FakeTensor and torch.compile. Backward saves only
f_pre, i_pre, the output h (which the next op keeps anyway), lower_bound and the initial state;
the gates are recomputed from the pre-activations and c_{t-1} is read back from h.

The Triton kernels give one program a batch row and a block of channels, and walk time in tiles of
BT steps: each tile's gates are computed in registers and the recurrence inside the tile is a
parallel associative scan of the affine maps c -> f * c + i, then the carried fp32 state is applied.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from mmprof.kernels._triton_util import device_guard, select_backend
from mmprof.kernels.mlgru_scan_triton import (CONFIGS, grid, load_row, previous_state, program_channels, reverse_steps,
                                              scan_forward, scan_tile, tile_offsets)
from mmprof.kernels.mlgru_scan import affine_scan, forget_gate, mlgru_gates, mlgru_ref, mlgru_step, reverse_scan

__all__ = ["mlgru", "mlgru_ref", "mlgru_step"]  # the twins live in mlgru_scan

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.autotune(configs=CONFIGS, key=["T", "D"])
@triton.jit
def _mlgru_bwd_kernel(
    fp_ptr, ip_ptr, lb_ptr, s0_ptr, h_ptr, dh_ptr, dsT_ptr,
    dfp_ptr, dip_ptr, dlb_ptr, ds0_ptr,
    T, D,
    HAS_STATE: tl.constexpr, HAS_DFINAL: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    # Reverse recurrence dc_t = dh_t + f_{t+1} dc_{t+1} (dc_T = d final_state, f_T = 1), walked
    # tile by tile from the end; inside a tile the rows are loaded in reverse time order so that
    # the same forward scan runs it.
    pid_b, cols, col_ok, rows = program_channels(D, BT, BD)
    lb_row = tl.load(lb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    lb = lb_row[None, :]
    s0 = load_row(s0_ptr, pid_b, cols, col_ok, D, HAS_STATE, BD)
    carry = load_row(dsT_ptr, pid_b, cols, col_ok, D, HAS_DFINAL, BD)
    dlb = tl.zeros([BD], dtype=tl.float32)
    base = pid_b.to(tl.int64) * T * D
    for k in range(0, (T + BT - 1) // BT):
        t = reverse_steps(k, T, rows, BT)
        mask, offs = tile_offsets(base, t, cols, col_ok, T, D)
        fp = tl.load(fp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        ip = tl.load(ip_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        next_ok = (t + 1 < T)[:, None] & col_ok[None, :]
        fp_next = tl.load(fp_ptr + offs + D, mask=next_ok, other=0.0).to(tl.float32)
        f_next = tl.where(next_ok, lb + (1 - lb) * tl.sigmoid(fp_next), 1.0)
        c_prev = previous_state(h_ptr, offs, t, mask, s0, D)
        dc, carry = scan_tile(f_next, dh, carry, rows, BT - 1)

        sf = tl.sigmoid(fp)
        f = lb + (1 - lb) * sf
        si = tl.sigmoid(ip)
        df = tl.where(mask, dc * (c_prev - ip * si), 0.0)
        dip = dc * (1 - f) * si * (1 + ip * (1 - si))
        dfp = df * (1 - lb) * sf * (1 - sf)
        dlb += tl.sum(df * (1 - sf), axis=0)
        tl.store(dfp_ptr + offs, dfp.to(dfp_ptr.dtype.element_ty), mask=mask)
        tl.store(dip_ptr + offs, dip.to(dip_ptr.dtype.element_ty), mask=mask)

    fp0 = tl.load(fp_ptr + base + cols, mask=col_ok, other=0.0).to(tl.float32)
    f0 = lb_row + (1 - lb_row) * tl.sigmoid(fp0)
    tl.store(ds0_ptr + pid_b * D + cols, f0 * carry, mask=col_ok)
    tl.store(dlb_ptr + pid_b * D + cols, dlb, mask=col_ok)


def _fwd_triton(f_pre, i_pre, lower_bound, state):
    return scan_forward(f_pre, i_pre, state, lower_bound=lower_bound)   # the gates computed in its loop


def _bwd_triton(f_pre, i_pre, lower_bound, state, h, dh, dfinal):
    batch, steps, dim = f_pre.shape
    df_pre = torch.empty_like(f_pre)
    di_pre = torch.empty_like(i_pre)
    dlb_rows = torch.empty(batch, dim, device=f_pre.device, dtype=torch.float32)
    dstate = torch.empty(batch, dim, device=f_pre.device, dtype=torch.float32)
    with device_guard(f_pre):
        _mlgru_bwd_kernel[grid(batch, dim)](
            f_pre, i_pre, lower_bound, state if state is not None else dstate, h, dh,
            dfinal if dfinal is not None else dstate,
            df_pre, di_pre, dlb_rows, dstate,
            steps, dim, HAS_STATE=state is not None, HAS_DFINAL=dfinal is not None,
        )  # fmt: skip
    return df_pre, di_pre, dlb_rows.sum(0), dstate


# ---------------------------------------------------------------------------------------------
# The same forward and backward in plain PyTorch, saving the same tensors (CPU, or backend="torch"),
# with the recurrence as mlgru_scan's two-level chunked scan instead of a loop over every step
# ---------------------------------------------------------------------------------------------


def _fwd_torch(f_pre, i_pre, lower_bound, state):
    batch, steps, dim = f_pre.shape
    forget, inp = mlgru_gates(f_pre.float(), i_pre.float(), lower_bound.float())
    c0 = state.to(torch.float32, copy=True) if state is not None else forget.new_zeros(batch, dim)
    if steps == 0:
        return torch.empty_like(f_pre), c0
    c, final = affine_scan(forget, inp, c0)
    return c.to(f_pre.dtype).contiguous(), final


def _bwd_torch(f_pre, i_pre, lower_bound, state, h, dh, dfinal):
    batch, steps, dim = f_pre.shape
    lb, fp, ip = lower_bound.float(), f_pre.float(), i_pre.float()
    carry = dfinal.to(torch.float32, copy=True) if dfinal is not None else fp.new_zeros(batch, dim)
    if steps == 0:
        return torch.empty_like(f_pre), torch.empty_like(i_pre), lb.new_zeros(dim), carry
    sf, si = torch.sigmoid(fp), torch.sigmoid(ip)
    forget = forget_gate(fp, lb)
    dc = reverse_scan(forget, dh.float(), carry)  # dc_t = dh_t + f_{t+1} dc_{t+1}, from d final_state
    s0 = state.float() if state is not None else fp.new_zeros(batch, dim)
    c_prev = torch.cat([s0[:, None], h[:, :-1].float()], dim=1)
    df = dc * (c_prev - ip * si)
    df_pre = df * (1 - lb) * sf * (1 - sf)
    di_pre = dc * (1 - forget) * si * (1 + ip * (1 - si))
    dlb = (df * (1 - sf)).sum((0, 1))
    return df_pre.to(f_pre.dtype), di_pre.to(i_pre.dtype), dlb, forget[:, 0] * dc[:, 0]


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("mmprof::mlgru_fwd", mutates_args=())
def _mlgru_fwd(
    f_pre: torch.Tensor,
    i_pre: torch.Tensor,
    lower_bound: torch.Tensor,
    state: Optional[torch.Tensor],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if select_backend(backend, f_pre) == "triton" and f_pre.shape[1] > 0:
        return _fwd_triton(f_pre, i_pre, lower_bound, state)
    return _fwd_torch(f_pre, i_pre, lower_bound, state)


@_mlgru_fwd.register_fake
def _(f_pre, i_pre, lower_bound, state, backend):
    batch, _, dim = f_pre.shape
    return torch.empty_like(f_pre), f_pre.new_empty(batch, dim, dtype=torch.float32)


@torch.library.custom_op("mmprof::mlgru_bwd", mutates_args=())
def _mlgru_bwd(
    f_pre: torch.Tensor,
    i_pre: torch.Tensor,
    lower_bound: torch.Tensor,
    state: Optional[torch.Tensor],
    h: torch.Tensor,
    dh: torch.Tensor,
    dfinal: Optional[torch.Tensor],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (d f_pre, d i_pre, d lower_bound in fp32, d state in fp32)."""
    if select_backend(backend, f_pre) == "triton" and f_pre.shape[1] > 0:
        return _bwd_triton(f_pre, i_pre, lower_bound, state, h, dh, dfinal)
    return _bwd_torch(f_pre, i_pre, lower_bound, state, h, dh, dfinal)


@_mlgru_bwd.register_fake
def _(f_pre, i_pre, lower_bound, state, h, dh, dfinal, backend):
    batch, _, dim = f_pre.shape
    return (
        torch.empty_like(f_pre),
        torch.empty_like(i_pre),
        lower_bound.new_empty(lower_bound.shape, dtype=torch.float32),
        f_pre.new_empty(batch, dim, dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    f_pre, i_pre, lower_bound, state, backend = inputs
    h, _ = output
    ctx.save_for_backward(f_pre, i_pre, lower_bound, state, h)
    ctx.backend = backend


def _backward(ctx, dh, dfinal):
    f_pre, i_pre, lower_bound, state, h = ctx.saved_tensors
    dh = torch.zeros_like(h) if dh is None else dh.contiguous()
    dfinal = None if dfinal is None else dfinal.contiguous()
    df_pre, di_pre, dlb, dstate = _mlgru_bwd(
        f_pre, i_pre, lower_bound, state, h, dh, dfinal, ctx.backend
    )
    dstate = None if state is None else dstate.to(state.dtype)
    return df_pre, di_pre, dlb.to(lower_bound.dtype), dstate, None


_mlgru_fwd.register_autograd(_backward, setup_context=_setup_context)


def mlgru(f_pre, i_pre, lower_bound, state=None, *, backend="auto"):
    """MLGRU recurrence over [B, T, D] pre-activations -> (h [B, T, D] in their dtype, final [B, D] fp32).

    lower_bound [D] (zeros for layer 0); state [B, D] or None (zeros). Differentiable in f_pre,
    i_pre, lower_bound and state. backend: "auto" (Triton on CUDA, PyTorch elsewhere) | "triton" |
    "torch".
    """
    if f_pre.dim() != 3 or f_pre.shape != i_pre.shape:
        raise ValueError(f"f_pre and i_pre must both be [B, T, D]; got {tuple(f_pre.shape)} and {tuple(i_pre.shape)}")
    batch, _, dim = f_pre.shape
    if lower_bound.shape != (dim,):
        raise ValueError(f"lower_bound must be [{dim}], got {tuple(lower_bound.shape)}")
    if state is not None and state.shape != (batch, dim):
        raise ValueError(f"state must be [{batch}, {dim}], got {tuple(state.shape)}")
    if f_pre.dtype != i_pre.dtype:
        common = torch.promote_types(f_pre.dtype, i_pre.dtype)
        f_pre, i_pre = f_pre.to(common), i_pre.to(common)
    if state is not None:
        state = state.contiguous()
    return _mlgru_fwd(f_pre.contiguous(), i_pre.contiguous(), lower_bound.contiguous(), state, backend)
