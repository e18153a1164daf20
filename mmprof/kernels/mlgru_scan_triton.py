"""Triton bodies of `mlgru_scan.mlgru_scan`, the recurrence on finished gates (the `vanilla` and
`ref-fused` models' fused recurrence), saving what its PyTorch body saves (f, h, the initial state).

    forward:  c_t = f_t c_{t-1} + i_t (fp32 state, c_0 = state or 0);  h = c in i's dtype, c_T fp32
    backward: g_t = dh_t + f_{t+1} g_{t+1} (g_{T-1} = dh_{T-1} + d c_T);  d i = g,  d f_t = g_t c_{t-1}
              (c_{t-1} read back from h, as the PyTorch body does);  d state = f_0 g_0

One program takes a batch row and a block of channels and walks time in tiles of BT steps; inside a
tile the recurrence is an associative scan of the affine maps c -> f c + i, as in `mlgru.py` (which
computes the gates from the pre-activations in the same loop); backward loads each tile in reverse
time order and runs the same scan.
"""

import torch
import triton
import triton.language as tl

from mmprof.kernels._triton_util import autotune_configs, device_guard

_CONFIGS = autotune_configs(
    gpu=[({"BT": bt, "BD": bd}, 4 if bt * bd >= 2048 else 2) for bt in (16, 32, 64) for bd in (32, 64)],
    interpret={"BT": 8, "BD": 16},
)


@triton.jit
def _compose(a1, b1, a2, b2):
    # (c -> a1 c + b1) then (c -> a2 c + b2)
    return a1 * a2, b1 * a2 + b2


@triton.autotune(configs=_CONFIGS, key=["T", "D"])
@triton.jit
def _scan_fwd_kernel(f_ptr, i_ptr, s0_ptr, h_ptr, sT_ptr, T, D, HAS_STATE: tl.constexpr,
                     BT: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    cols = pid_d * BD + tl.arange(0, BD)
    col_ok = cols < D
    rows = tl.arange(0, BT)
    if HAS_STATE:
        carry = tl.load(s0_ptr + pid_b * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BD], dtype=tl.float32)
    base = pid_b.to(tl.int64) * T * D
    for t0 in range(0, T, BT):
        t = t0 + rows
        mask = (t < T)[:, None] & col_ok[None, :]
        offs = base + t[:, None] * D + cols[None, :]
        f = tl.load(f_ptr + offs, mask=mask, other=1.0).to(tl.float32)
        i = tl.load(i_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        scale, shift = tl.associative_scan((f, i), 0, _compose)
        c = scale * carry[None, :] + shift
        tl.store(h_ptr + offs, c.to(h_ptr.dtype.element_ty), mask=mask)
        last = tl.minimum(T - t0, BT) - 1
        carry = tl.sum(tl.where(rows[:, None] == last, c, 0.0), axis=0)
    tl.store(sT_ptr + pid_b * D + cols, carry, mask=col_ok)


@triton.autotune(configs=_CONFIGS, key=["T", "D"])
@triton.jit
def _scan_bwd_kernel(f_ptr, s0_ptr, h_ptr, dh_ptr, dsT_ptr, df_ptr, di_ptr, ds0_ptr, T, D,
                     HAS_STATE: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    cols = pid_d * BD + tl.arange(0, BD)
    col_ok = cols < D
    rows = tl.arange(0, BT)
    if HAS_STATE:
        s0 = tl.load(s0_ptr + pid_b * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        s0 = tl.zeros([BD], dtype=tl.float32)
    carry = tl.load(dsT_ptr + pid_b * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    base = pid_b.to(tl.int64) * T * D
    n_tiles = (T + BT - 1) // BT
    for k in range(0, n_tiles):
        t = (n_tiles - 1 - k) * BT + (BT - 1 - rows)  # latest step first
        mask = (t < T)[:, None] & col_ok[None, :]
        offs = base + t[:, None] * D + cols[None, :]
        dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        next_ok = (t + 1 < T)[:, None] & col_ok[None, :]
        f_next = tl.load(f_ptr + offs + D, mask=next_ok, other=1.0).to(tl.float32)
        prev_ok = (t >= 1)[:, None] & mask
        c_prev = tl.load(h_ptr + offs - D, mask=prev_ok, other=0.0).to(tl.float32)
        c_prev = tl.where((t == 0)[:, None], s0[None, :], c_prev)
        scale, shift = tl.associative_scan((f_next, dh), 0, _compose)
        g = scale * carry[None, :] + shift
        carry = tl.sum(tl.where(rows[:, None] == BT - 1, g, 0.0), axis=0)
        tl.store(di_ptr + offs, g.to(di_ptr.dtype.element_ty), mask=mask)
        tl.store(df_ptr + offs, (g * c_prev).to(df_ptr.dtype.element_ty), mask=mask)
    f0 = tl.load(f_ptr + base + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(ds0_ptr + pid_b * D + cols, f0 * carry, mask=col_ok)


def _grid(batch, dim):
    return lambda meta: (triton.cdiv(dim, meta["BD"]), batch)


def scan_forward(f: torch.Tensor, i: torch.Tensor, state: torch.Tensor | None):
    """f, i [B, T >= 1, D] contiguous, state [B, D] or None -> (h in i's dtype, c_T fp32 [B, D])."""
    batch, steps, dim = f.shape
    h = torch.empty_like(i)
    final = torch.empty(batch, dim, device=f.device, dtype=torch.float32)
    with device_guard(f):
        _scan_fwd_kernel[_grid(batch, dim)](
            f, i, state if state is not None else final, h, final, steps, dim, HAS_STATE=state is not None
        )
    return h, final


def scan_backward(f, h, state, dh, d_final, i_dtype: torch.dtype):
    """f, h, dh [B, T >= 1, D] and d_final [B, D] contiguous -> (d f in f's dtype, d i in `i_dtype`,
    d state fp32 [B, D])."""
    batch, steps, dim = f.shape
    d_f = torch.empty_like(f)
    d_i = torch.empty(f.shape, device=f.device, dtype=i_dtype)
    d_state = torch.empty(batch, dim, device=f.device, dtype=torch.float32)
    with device_guard(f):
        _scan_bwd_kernel[_grid(batch, dim)](
            f, state if state is not None else d_state, h, dh, d_final, d_f, d_i, d_state, steps, dim,
            HAS_STATE=state is not None,
        )  # fmt: skip
    return d_f, d_i, d_state
