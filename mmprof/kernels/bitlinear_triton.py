"""Triton kernels for BitLinear's input pass and its backward, and for the ternary weights.

One program handles one row (token) with the whole row in registers:

- `quantize_rows`: builds the BitLinear input u from the row (the input prologue: nothing, RMSNorm,
  residual add + RMSNorm, GLU silu(a) * b, or the MLGRU output gate RMSNorm(g) * w * silu(c)),
  then for each of P projections sharing that input: xn = u * rstd(u) * g_k and its int8 levels
  q = round(xn * s_k).clamp(-128, 127), s_k = 127 / max|xn|, stored as q / s_k in the matmul dtype.
  In forward it writes the per-row statistics (the prologue's rstd, rstd(u), s_k) and, for the
  residual add, the new residual x + m. Given the statistics (backward) it only recomputes.
- `quantize_rows_backward`: from d xn_k = dy_k @ wq_k (straight through the quantizer), the
  gradient of the row's inputs through the shared RMSNorm and the prologue, and per-program partial
  sums of the norm weights' gradients (summed by the caller).
- `ternary_weight`: round(W / mean|W|).clamp(-1, 1) * mean|W| in the matmul dtype, in two passes
  (a sum of |W| per block, then the quantization), rounding in W's dtype as the PyTorch ops do.

Every rounding the unfused model makes (the prologue's outputs in the input dtype, round half to
even, correctly rounded divisions) is repeated here, so the kernels agree with the plain-PyTorch
twin to the last bit on most elements.
"""

import torch
import triton
import triton.language as tl

from mmprof.kernels._triton_util import device_guard, persistent_programs, round_half_even, row_block
from mmprof.kernels.ternary import ACT_LEVELS, SCALE_FLOOR
from mmprof.kernels.norm_gate import norm_silu_gate_grads

PROLOGUES = ("none", "norm", "add_norm", "glu", "norm_gate")
_MODE = {name: n for n, name in enumerate(PROLOGUES)}
_NONE, _NORM, _ADD_NORM, _GLU, _NORM_GATE = range(5)
MAX_PROJECTIONS = 3


@triton.jit
def _rstd(v, K, eps):
    return tl.div_rn(1.0, tl.sqrt_rn(tl.sum(v * v, axis=0) / K + eps))


@triton.jit
def _input_row(
    x_ptr, aux_ptr, pw_ptr, x2_ptr, r0_ptr, row, cols, ok, K, x_stride, pre_eps,
    MODE: tl.constexpr, STATS_GIVEN: tl.constexpr,
):  # fmt: skip
    """BitLinear's input u for one row, fp32, rounded to the dtype the unfused ops produce. Without
    given statistics it stores the prologue's rstd (and x2 for add_norm); with them it loads it."""
    x_row = x_ptr + row * x_stride
    if MODE == 3:  # glu: silu(a) * b over the two halves of the row
        a = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(x_row + K + cols, mask=ok, other=0.0).to(tl.float32)
        silu = (a * tl.sigmoid(a)).to(x_ptr.dtype.element_ty).to(tl.float32)
        u = (silu * b).to(x_ptr.dtype.element_ty).to(tl.float32)
    elif MODE == 0:
        u = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
    else:  # norm (1), add_norm (2): RMSNorm(x) or RMSNorm(x + m); norm_gate (4): RMSNorm(g) * silu(c)
        v = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
        if MODE == 2:
            m = tl.load(aux_ptr + row * K + cols, mask=ok, other=0.0).to(tl.float32)
            v = (v + m).to(x2_ptr.dtype.element_ty).to(tl.float32)
        if STATS_GIVEN:
            r0 = tl.load(r0_ptr + row)
        else:
            if MODE == 2:
                tl.store(x2_ptr + row * K + cols, v.to(x2_ptr.dtype.element_ty), mask=ok)
            r0 = _rstd(v, K, pre_eps)
            tl.store(r0_ptr + row, r0)
        u = v * r0 * tl.load(pw_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        if MODE == 4:
            c = tl.load(aux_ptr + row * K + cols, mask=ok, other=0.0).to(tl.float32)
            u = (u * (c * tl.sigmoid(c))).to(x_ptr.dtype.element_ty).to(tl.float32)
        else:
            u = u.to(x2_ptr.dtype.element_ty).to(tl.float32)
    return u


@triton.jit
def _quantize_rows_kernel(
    x_ptr, aux_ptr, pw_ptr, nw_ptr, xq_ptr, x2_ptr, r0_ptr, r_ptr, s_ptr,
    N, K, x_stride, pre_eps, eps, levels, scale_floor,
    MODE: tl.constexpr, P: tl.constexpr, STATS_GIVEN: tl.constexpr, BLOCK: tl.constexpr, LEVELS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < K
    u = _input_row(x_ptr, aux_ptr, pw_ptr, x2_ptr, r0_ptr, row, cols, ok, K, x_stride, pre_eps, MODE, STATS_GIVEN)
    if STATS_GIVEN:
        r = tl.load(r_ptr + row)
    else:
        r = _rstd(u, K, eps)
        tl.store(r_ptr + row, r)
    uhat = u * r
    for k in tl.static_range(P):
        xn = uhat * tl.load(nw_ptr + k * K + cols, mask=ok, other=0.0).to(tl.float32)
        if STATS_GIVEN:
            s = tl.load(s_ptr + k * N + row)
        else:
            s = tl.div_rn(levels, tl.maximum(tl.max(tl.abs(xn), axis=0), scale_floor))
            tl.store(s_ptr + k * N + row, s)
        q = tl.minimum(tl.maximum(round_half_even(xn * s), -levels - 1.0), levels)
        if LEVELS:  # the int8 levels themselves (the int8 tensor-core forward)
            tl.store(xq_ptr + (k * N + row) * K + cols, q.to(tl.int8), mask=ok)
        else:
            tl.store(xq_ptr + (k * N + row) * K + cols, tl.div_rn(q, s).to(xq_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _quantize_rows_bwd_kernel(
    x_ptr, aux_ptr, pw_ptr, nw_ptr, r0_ptr, r_ptr, dxn_ptr, dx2_ptr,
    dx_ptr, daux_ptr, dpw_ptr, dnw_ptr,
    N, K, x_stride, rows_per_program, pre_eps,
    MODE: tl.constexpr, HAS_PRE: tl.constexpr, P: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < K
    g0 = tl.load(nw_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    g1 = tl.zeros([BLOCK], dtype=tl.float32)
    g2 = tl.zeros([BLOCK], dtype=tl.float32)
    if P > 1:
        g1 = tl.load(nw_ptr + K + cols, mask=ok, other=0.0).to(tl.float32)
    if P > 2:
        g2 = tl.load(nw_ptr + 2 * K + cols, mask=ok, other=0.0).to(tl.float32)
    pw = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_PRE:
        pw = tl.load(pw_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    # separate accumulators (the interpreter may update a shared one in place)
    acc0 = tl.zeros([BLOCK], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    acc_pw = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program):
        row = first + i
        rok = cols < tl.where(row < N, K, 0)
        srow = tl.minimum(row, N - 1)  # past the end: read any row, every store is masked
        u = _input_row(x_ptr, aux_ptr, pw_ptr, dx2_ptr, r0_ptr, srow, cols, rok, K, x_stride, pre_eps, MODE, True)
        r = tl.load(r_ptr + srow)
        uhat = u * r
        # xn_k = uhat * g_k: d uhat = sum_k dxn_k * g_k, d g_k += dxn_k * uhat
        d = tl.load(dxn_ptr + srow * K + cols, mask=rok, other=0.0).to(tl.float32)
        v = d * g0
        acc0 += d * uhat
        if P > 1:
            d = tl.load(dxn_ptr + (N + srow) * K + cols, mask=rok, other=0.0).to(tl.float32)
            v += d * g1
            acc1 += d * uhat
        if P > 2:
            d = tl.load(dxn_ptr + (2 * N + srow) * K + cols, mask=rok, other=0.0).to(tl.float32)
            v += d * g2
            acc2 += d * uhat
        du = r * (v - uhat * (tl.sum(v * uhat, axis=0) / K))
        x_row = x_ptr + srow * x_stride
        dx_row = dx_ptr + row * x_stride
        if MODE == 0:
            tl.store(dx_row + cols, du.to(dx_ptr.dtype.element_ty), mask=rok)
        elif MODE == 3:  # glu
            a = tl.load(x_row + cols, mask=rok, other=0.0).to(tl.float32)
            b = tl.load(x_row + K + cols, mask=rok, other=0.0).to(tl.float32)
            sig = tl.sigmoid(a)
            silu = (a * sig).to(x_ptr.dtype.element_ty).to(tl.float32)
            tl.store(dx_row + cols, (du * b * sig * (1 + a * (1 - sig))).to(dx_ptr.dtype.element_ty), mask=rok)
            tl.store(dx_row + K + cols, (du * silu).to(dx_ptr.dtype.element_ty), mask=rok)
        elif MODE == 4:  # norm_gate
            r0 = tl.load(r0_ptr + srow)
            g = tl.load(x_row + cols, mask=rok, other=0.0).to(tl.float32)
            c = tl.load(aux_ptr + srow * K + cols, mask=rok, other=0.0).to(tl.float32)
            dg, dc, dpw = norm_silu_gate_grads(g, c, r0, pw, du, K)
            acc_pw += dpw
            tl.store(dx_row + cols, dg.to(dx_ptr.dtype.element_ty), mask=rok)
            tl.store(daux_ptr + row * K + cols, dc.to(daux_ptr.dtype.element_ty), mask=rok)
        else:  # norm, add_norm
            r0 = tl.load(r0_ptr + srow)
            src = tl.load(x_row + cols, mask=rok, other=0.0).to(tl.float32)
            if MODE == 2:
                m = tl.load(aux_ptr + srow * K + cols, mask=rok, other=0.0).to(tl.float32)
                src = (src + m).to(dx2_ptr.dtype.element_ty).to(tl.float32)
            xhat = src * r0
            acc_pw += du * xhat
            t = du * pw
            dsrc = r0 * (t - xhat * (tl.sum(t * xhat, axis=0) / K))
            if MODE == 2:  # x2 = x + m is also an output: its own gradient joins
                dsrc += tl.load(dx2_ptr + srow * K + cols, mask=rok, other=0.0).to(tl.float32)
                tl.store(daux_ptr + row * K + cols, dsrc.to(daux_ptr.dtype.element_ty), mask=rok)
            tl.store(dx_row + cols, dsrc.to(dx_ptr.dtype.element_ty), mask=rok)
    base = pid.to(tl.int64) * P * K
    tl.store(dnw_ptr + base + cols, acc0, mask=ok)
    if P > 1:
        tl.store(dnw_ptr + base + K + cols, acc1, mask=ok)
    if P > 2:
        tl.store(dnw_ptr + base + 2 * K + cols, acc2, mask=ok)
    if HAS_PRE:
        tl.store(dpw_ptr + pid.to(tl.int64) * K + cols, acc_pw, mask=ok)


@triton.jit
def _abs_sum_kernel(w_ptr, part_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(part_ptr + pid, tl.sum(tl.abs(w), axis=0))


@triton.jit
def _ternary_kernel(w_ptr, scale_ptr, out_ptr, n, BLOCK: tl.constexpr, LEVELS: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    # every step rounds to the weight's dtype, as the same PyTorch ops on that dtype do
    t = tl.load(scale_ptr).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0)
    v = (w.to(tl.float32) * t).to(w_ptr.dtype.element_ty).to(tl.float32)
    q = tl.minimum(tl.maximum(round_half_even(v), -1.0), 1.0)
    if LEVELS:
        tl.store(out_ptr + offs, q.to(tl.int8), mask=ok)
    else:
        wq = tl.div_rn(q, t).to(w_ptr.dtype.element_ty)
        tl.store(out_ptr + offs, wq.to(out_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def in_features(prologue: str, x: torch.Tensor) -> int:
    """Width K of BitLinear's input: half the row for the GLU prologue, the row otherwise."""
    return x.shape[-1] // 2 if prologue == "glu" else x.shape[-1]


def quantize_rows(prologue, x, aux, pre_weight, norm_weights, pre_eps, eps, out_dtype, stats=None):
    """x [N, K] ([N, 2K] for glu), aux [N, K] or None, norm_weights [P, K] -> (xq [P, N, K] in
    out_dtype, x2 [N, K] or None, prologue rstd [N] or None, rstd [N], scales [P, N]). With
    stats = (prologue rstd, rstd, scales) from forward, only xq is computed. out_dtype int8: xq holds
    the int8 levels round(xn * s) themselves instead of q / s."""
    rows, k = x.shape[0], in_features(prologue, x)
    p = norm_weights.shape[0]
    if not 1 <= p <= MAX_PROJECTIONS:
        raise ValueError(f"1 to {MAX_PROJECTIONS} projections per call, got {p}")
    mode = _MODE[prologue]
    xq = torch.empty(p, rows, k, device=x.device, dtype=out_dtype)
    x2 = None
    if mode == _ADD_NORM and stats is None:
        x2 = torch.empty(rows, k, device=x.device, dtype=torch.promote_types(x.dtype, aux.dtype))
    if stats is None:
        has_pre = mode in (_NORM, _ADD_NORM, _NORM_GATE)
        r0 = torch.empty(rows, device=x.device, dtype=torch.float32) if has_pre else None
        r = torch.empty(rows, device=x.device, dtype=torch.float32)
        s = torch.empty(p, rows, device=x.device, dtype=torch.float32)
    else:
        r0, r, s = stats
    if rows == 0:
        return xq, x2, r0, r, s
    block, warps = row_block(k)
    any_ = r  # stands in for pointers a prologue does not use (never read or written)
    if mode == _ADD_NORM and x2 is None:  # recomputing: only x2's dtype is read
        x2_arg = torch.empty(1, device=x.device, dtype=torch.promote_types(x.dtype, aux.dtype))
    else:
        x2_arg = x2 if x2 is not None else x
    with device_guard(x):
        _quantize_rows_kernel[(rows,)](
            x, aux if aux is not None else any_, pre_weight if pre_weight is not None else any_,
            norm_weights, xq, x2_arg, r0 if r0 is not None else any_, r, s,
            rows, k, x.stride(0), pre_eps, eps, ACT_LEVELS, SCALE_FLOOR,
            MODE=mode, P=p, STATS_GIVEN=stats is not None, BLOCK=block, LEVELS=out_dtype == torch.int8,
            num_warps=warps,
        )  # fmt: skip
    return xq, x2, r0, r, s


def quantize_rows_backward(prologue, x, aux, pre_weight, norm_weights, r0, r, d_xn, d_x2, pre_eps):
    """Gradients of the row inputs from d_xn [P, N, K] (and d_x2 [N, K] for add_norm): (dx, d aux or
    None, d pre_weight fp32 [K] or None, d norm_weights fp32 [P, K])."""
    rows, k = x.shape[0], in_features(prologue, x)
    p = norm_weights.shape[0]
    mode = _MODE[prologue]
    dx = torch.empty_like(x)
    daux = torch.empty_like(aux) if mode in (_ADD_NORM, _NORM_GATE) else None
    has_pre = mode in (_NORM, _ADD_NORM, _NORM_GATE)
    programs = persistent_programs(x.device, rows)
    dnw = torch.zeros(programs, p, k, device=x.device, dtype=torch.float32)
    dpw = torch.zeros(programs, k, device=x.device, dtype=torch.float32) if has_pre else None
    if rows > 0:
        block, warps = row_block(k)
        any_ = r
        with device_guard(x):
            _quantize_rows_bwd_kernel[(programs,)](
                x, aux if aux is not None else any_, pre_weight if pre_weight is not None else any_,
                norm_weights, r0 if r0 is not None else any_, r, d_xn,
                d_x2 if d_x2 is not None else x, dx, daux if daux is not None else dx,
                dpw if dpw is not None else dnw, dnw,
                rows, k, x.stride(0), triton.cdiv(rows, programs), pre_eps,
                MODE=mode, HAS_PRE=has_pre, P=p, BLOCK=block, num_warps=warps,
            )  # fmt: skip
    return dx, daux, dpw.sum(0) if dpw is not None else None, dnw.sum(0)


_WEIGHT_BLOCK = 4096


def ternary_weight(weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """round(W * t).clamp(-1, 1) / t with t = 1 / max(mean|W|, 1e-5) computed in W's dtype (as
    `bitlinear.weight_quant`), then cast to out_dtype."""
    return _ternary(weight, out_dtype)[0]


def ternary_levels(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 levels round(W * t).clamp(-1, 1), t [1] fp32) with t as in `ternary_weight`: the right
    operand and scale of the int8 tensor-core forward (`w2a8_gemm.int8_ternary_linear`)."""
    levels, scale = _ternary(weight, torch.int8)
    return levels, scale.float().reshape(1)


def _ternary(weight, out_dtype):
    w = weight.contiguous()
    n = w.numel()
    out = torch.empty(w.shape, device=w.device, dtype=out_dtype)
    if n == 0:
        return out, torch.ones(1, device=w.device, dtype=torch.float32)
    block = min(_WEIGHT_BLOCK, triton.next_power_of_2(n))
    programs = triton.cdiv(n, block)
    parts = torch.empty(programs, device=w.device, dtype=torch.float32)
    with device_guard(w):
        _abs_sum_kernel[(programs,)](w, parts, n, BLOCK=block)
        scale = 1.0 / (parts.sum() / n).to(w.dtype).clamp(min=SCALE_FLOOR)  # in W's dtype, as torch
        _ternary_kernel[(programs,)](w, scale, out, n, BLOCK=block, LEVELS=out_dtype == torch.int8)
    return out, scale
