"""Triton bodies of `mlgru_scan.mlgru_scan`, the recurrence on finished gates (the `vanilla` and
`ref-fused` models' fused recurrence), saving what its PyTorch body saves (f, h, the initial state).

    forward:  c_t = f_t c_{t-1} + i_t (fp32 state, c_0 = state or 0);  h = c in i's dtype, c_T fp32
    backward: g_t = dh_t + f_{t+1} g_{t+1} (g_{T-1} = dh_{T-1} + d c_T);  d i = g,  d f_t = g_t c_{t-1}
              (c_{t-1} read back from h, as the PyTorch body does);  d state = f_0 g_0

One program takes a batch row and a block of channels and walks time in tiles of BT steps; inside a
tile the recurrence is an associative scan of the affine maps c -> f c + i; backward loads each tile
in reverse time order and runs the same scan. `mlgru.py`'s kernels (the gates computed from the
pre-activations in the same loop) are made of the same pieces, defined here once.
"""

import torch
import triton
import triton.language as tl

from mmprof.kernels._triton_util import autotune_configs, device_guard

CONFIGS = autotune_configs(
    gpu=[({"BT": bt, "BD": bd}, 4 if bt * bd >= 2048 else 2) for bt in (16, 32, 64) for bd in (32, 64)],
    interpret={"BT": 8, "BD": 16},
)


@triton.jit
def _compose(a1, b1, a2, b2):
    # (c -> a1 c + b1) then (c -> a2 c + b2)
    return a1 * a2, b1 * a2 + b2


# ---- the pieces both recurrence kernels (these, and mlgru.py's with the gates inside) are made of ----

@triton.jit
def program_channels(D, BT: tl.constexpr, BD: tl.constexpr):
    """This program's batch row, its block of channels and which of them exist, a tile's row indices."""
    pid_b = tl.program_id(1)
    cols = tl.program_id(0) * BD + tl.arange(0, BD)
    return pid_b, cols, cols < D, tl.arange(0, BT)


@triton.jit
def load_row(ptr, pid_b, cols, col_ok, D, PRESENT: tl.constexpr, BD: tl.constexpr):
    """This program's channels of a [B, D] fp32 row (a state or its gradient), or zeros if absent."""
    if PRESENT:
        row = tl.load(ptr + pid_b * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        row = tl.zeros([BD], dtype=tl.float32)
    return row


@triton.jit
def tile_offsets(base, t, cols, col_ok, T, D):
    """The mask and element offsets of time steps `t` x this program's channels."""
    return (t < T)[:, None] & col_ok[None, :], base + t[:, None] * D + cols[None, :]


@triton.jit
def reverse_steps(k, T, rows, BT: tl.constexpr):
    """The time steps of the k-th tile counted from the end, latest first (so the forward scan runs
    the reverse recurrence)."""
    return ((T + BT - 1) // BT - 1 - k) * BT + (BT - 1 - rows)


@triton.jit
def scan_tile(f, i, carry, rows, last):
    """c_t = f_t c_{t-1} + i_t over a tile's rows, starting from `carry`; returns c and c at row `last`."""
    scale, shift = tl.associative_scan((f, i), 0, _compose)
    c = scale * carry[None, :] + shift
    return c, tl.sum(tl.where(rows[:, None] == last, c, 0.0), axis=0)


@triton.jit
def previous_state(h_ptr, offs, t, mask, s0, D):
    """c_{t-1} of each step of a tile: read back from h, the initial state at t = 0."""
    c_prev = tl.load(h_ptr + offs - D, mask=(t >= 1)[:, None] & mask, other=0.0).to(tl.float32)
    return tl.where((t == 0)[:, None], s0[None, :], c_prev)


@triton.autotune(configs=CONFIGS, key=["T", "D", "GATES"])
@triton.jit
def _scan_fwd_kernel(a_ptr, b_ptr, lb_ptr, s0_ptr, h_ptr, sT_ptr, T, D, HAS_STATE: tl.constexpr,
                     GATES: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    # GATES: a, b are the pre-activations and the gates are computed here; else a = f and b = i
    pid_b, cols, col_ok, rows = program_channels(D, BT, BD)
    if GATES:
        lb = tl.load(lb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    carry = load_row(s0_ptr, pid_b, cols, col_ok, D, HAS_STATE, BD)
    base = pid_b.to(tl.int64) * T * D
    for t0 in range(0, T, BT):
        t = t0 + rows
        mask, offs = tile_offsets(base, t, cols, col_ok, T, D)
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GATES:
            f = lb + (1 - lb) * tl.sigmoid(a)
            i = b * tl.sigmoid(b) * (1 - f)
        else:
            f, i = a, b
        c, carry = scan_tile(f, i, carry, rows, tl.minimum(T - t0, BT) - 1)
        tl.store(h_ptr + offs, c.to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(sT_ptr + pid_b * D + cols, carry, mask=col_ok)


@triton.autotune(configs=CONFIGS, key=["T", "D"])
@triton.jit
def _scan_bwd_kernel(f_ptr, s0_ptr, h_ptr, dh_ptr, dsT_ptr, df_ptr, di_ptr, ds0_ptr, T, D,
                     HAS_STATE: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    pid_b, cols, col_ok, rows = program_channels(D, BT, BD)
    s0 = load_row(s0_ptr, pid_b, cols, col_ok, D, HAS_STATE, BD)
    carry = load_row(dsT_ptr, pid_b, cols, col_ok, D, True, BD)
    base = pid_b.to(tl.int64) * T * D
    for k in range(0, (T + BT - 1) // BT):
        t = reverse_steps(k, T, rows, BT)
        mask, offs = tile_offsets(base, t, cols, col_ok, T, D)
        dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        next_ok = (t + 1 < T)[:, None] & col_ok[None, :]
        f_next = tl.load(f_ptr + offs + D, mask=next_ok, other=1.0).to(tl.float32)
        c_prev = previous_state(h_ptr, offs, t, mask, s0, D)
        g, carry = scan_tile(f_next, dh, carry, rows, BT - 1)
        tl.store(di_ptr + offs, g.to(di_ptr.dtype.element_ty), mask=mask)
        tl.store(df_ptr + offs, (g * c_prev).to(df_ptr.dtype.element_ty), mask=mask)
    f0 = tl.load(f_ptr + base + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(ds0_ptr + pid_b * D + cols, f0 * carry, mask=col_ok)


def grid(batch, dim):
    """One program per block of BD channels and batch row."""
    return lambda meta: (triton.cdiv(dim, meta["BD"]), batch)


def scan_forward(f: torch.Tensor, i: torch.Tensor, state: torch.Tensor | None,
                 lower_bound: torch.Tensor | None = None):
    """f, i [B, T >= 1, D] contiguous, state [B, D] or None -> (h in i's dtype, c_T fp32 [B, D]).
    With `lower_bound` [D], f and i are the gates' pre-activations, the gates computed in the loop
    (`mlgru.py`'s forward)."""
    batch, steps, dim = f.shape
    h = torch.empty_like(i)
    final = torch.empty(batch, dim, device=f.device, dtype=torch.float32)
    with device_guard(f):
        _scan_fwd_kernel[grid(batch, dim)](
            f, i, lower_bound if lower_bound is not None else f, state if state is not None else final, h, final,
            steps, dim, HAS_STATE=state is not None, GATES=lower_bound is not None,
        )  # fmt: skip
    return h, final


def scan_backward(f, h, state, dh, d_final, i_dtype: torch.dtype):
    """f, h, dh [B, T >= 1, D] and d_final [B, D] contiguous -> (d f in f's dtype, d i in `i_dtype`,
    d state fp32 [B, D])."""
    batch, steps, dim = f.shape
    d_f = torch.empty_like(f)
    d_i = torch.empty(f.shape, device=f.device, dtype=i_dtype)
    d_state = torch.empty(batch, dim, device=f.device, dtype=torch.float32)
    with device_guard(f):
        _scan_bwd_kernel[grid(batch, dim)](
            f, state if state is not None else d_state, h, dh, d_final, d_f, d_i, d_state, steps, dim,
            HAS_STATE=state is not None,
        )  # fmt: skip
    return d_f, d_i, d_state
