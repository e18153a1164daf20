"""W2A8 BitLinear for prefill: int8 activations times 2-bit packed ternary weights, added in int32.

The inference form of BitLinear (`bitlinear.py`) on weights packed by `ternary_pack.py`:

    xn   = x * rsqrt(mean(x^2) + eps) * g                  fp32, eps 1e-8
    amax = max(max|xn|, 1e-5),  q = round(xn * 127 / amax).clamp(-128, 127)      int8, per row
    acc  = sum_k q[m, k] * t[n, k]                         int32, t in {-1, 0, 1} from the packed words
    y    = acc * (amax / 127) * w_scale                    in the output dtype, amax / 127 taken as
                                                           amax * fp32(1/127)

`127 / amax` is the training path's activation scale s, computed first as there, so q is exactly the
int8 level the fake-quantised BitLinear rounds to, and y equals its output up to float rounding.

What the file holds, each op with a plain-PyTorch twin of the same function:

- `quantize_rows` / `quantize_rows_ref`: the RMSNorm and per-row int8 quantisation, one row per
  program with the whole row in one block.
- `w2a8_matmul` / `w2a8_matmul_ref`: the integer product. The kernel decodes a [BLOCK_N, BLOCK_K]
  tile of codes from the packed words by shifts and masks (code - 1 in {-1, 0, 1} as int8) and
  feeds it with the int8 activation tile to `tl.dot` with int32 accumulation (tensor cores on a
  GPU); no weight value is multiplied anywhere else. The twin computes it exactly in float64.
- `w2a8_linear` / `w2a8_linear_ref`: the same product with the dequantisation fused into the
  kernel's epilogue (the same fp32 operations in the same order as the twin, so equal bits).
- `packed_bitlinear`: the whole forward for x [..., K], on Triton or PyTorch (`backend`).
- `int8_ternary_linear` / `int8_ternary_linear_ref`: the training forward (issue 26). The same kernel
  with the weight format switched (constexpr WEIGHT_INT8): ternary levels as int8 [N, K] (quantised
  once per step from the fp32 master weights by `bitlinear_triton.ternary_levels`), int8 activation
  levels q from `bitlinear_triton.quantize_rows` with their per-row scale s = 127 / amax, and the
  epilogue y = (acc / s[:, None]) / t in fp32 (correctly rounded divisions, the order of the
  fake-quantised path's q / s and q_w / t), then cast to the output dtype. acc is exact.

Under the Triton interpreter (TRITON_INTERPRET=1, CPU tests) the very same kernels run: its `tl.dot`
takes int8 operands and accumulates exactly in int32 (numpy matmul), so no substitute path exists.
Rounding half to even is done with floor and a tie test rather than libdevice `rint`, which the
interpreter cannot call (it has no extern functions); it is exact for |v| < 2^22, far above 128.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmprof.kernels._triton_util import (
    autotune_configs, device_guard, interpreting, round_half_even, row_block, select_backend,
)
from mmprof.kernels.ternary import ACT_LEVELS, NORM_EPS, SCALE_FLOOR, act_scale, rms_inv
from mmprof.kernels.ternary_pack import packed_words, unpack_ternary

# ---------------------------------------------------------------------------------------------
# Plain-PyTorch twins
# ---------------------------------------------------------------------------------------------


def quantize_rows_ref(x: Tensor, norm_weight: Tensor, eps: float = NORM_EPS) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (q int8 [M, K], amax fp32 [M]) with the training path's own functions."""
    xf = x.float()
    xn = xf * rms_inv(xf, eps) * norm_weight.float()
    s = act_scale(xn)
    q = (xn * s).round().clamp(-128, 127).to(torch.int8)
    return q, xn.abs().amax(-1).clamp(min=SCALE_FLOOR)


def w2a8_matmul_ref(q: Tensor, packed: Tensor, features: int | None = None) -> Tensor:
    """q int8 [M, K] @ unpacked t [N, K]^T -> int32 [M, N], exact: every partial sum is an integer
    below 2^53 in magnitude, so float64 adds them without rounding in any order (CPU and CUDA)."""
    features = q.shape[-1] if features is None else features
    t = unpack_ternary(packed, features)
    return (q.double() @ t.double().t()).to(torch.int32)


_INV_LEVELS = 1.0 / ACT_LEVELS


def _row_scale(amax: Tensor) -> Tensor:
    """amax / 127 per row as amax * fp32(1/127): one fp32 multiplication, the same in the kernel, on
    the CPU and in CUDA torch (which divides by a Python number as a multiplication anyway)."""
    return amax.float() * _INV_LEVELS


def _dequantize(acc: Tensor, amax: Tensor, w_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    # the kernel's epilogue performs these same fp32 operations in this order
    return (acc.float() * _row_scale(amax)[:, None] * w_scale.float()).to(out_dtype)


def w2a8_linear_ref(
    q: Tensor, amax: Tensor, packed: Tensor, w_scale: Tensor, features: int | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:  # fmt: skip
    """acc * (amax / 127)[:, None] * w_scale in out_dtype, acc = `w2a8_matmul_ref(q, packed)`."""
    return _dequantize(w2a8_matmul_ref(q, packed, features), amax, w_scale, out_dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _quantize_rows_kernel(
    x_ptr, g_ptr, q_ptr, amax_ptr, K, K_float, x_stride, eps, levels, floor, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < K
    x = tl.load(x_ptr + row * x_stride + cols, mask=ok, other=0.0).to(tl.float32)
    r = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(tl.sum(x * x, axis=0), K_float) + eps))
    xn = x * r * tl.load(g_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(xn), axis=0), floor)
    s = tl.div_rn(levels, amax)
    q = tl.minimum(tl.maximum(round_half_even(xn * s), -levels - 1.0), levels)
    tl.store(q_ptr + row * K + cols, q.to(tl.int8), mask=ok)
    tl.store(amax_ptr + row, amax)


# (BLOCK_M, BLOCK_N, BLOCK_K), warps: small tiles for a few rows (decode-like prefill), large ones
# for thousands. BLOCK_K is a multiple of 16 (whole packed words) and of 32 (int8 MMA depth).
_GPU_TILES = [
    ((16, 32, 256), 4),
    ((16, 64, 256), 4),
    ((16, 64, 128), 4),
    ((32, 64, 256), 4),
    ((64, 64, 128), 4),
    ((64, 128, 128), 4),
    ((128, 128, 128), 8),
    ((256, 128, 128), 8),
]
_CONFIGS = autotune_configs(
    gpu=[({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, warps) for (m, n, k), warps in _GPU_TILES],
    interpret={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2},
)
_MAX_M_BUCKET = 4096
# training shapes (M = batch x seq in the tens of thousands, N and K 1k-12k): large tiles, pipelined
_TRAIN_TILES = [
    ((128, 128, 64), 4, 4),
    ((128, 256, 64), 8, 3),
    ((256, 128, 64), 8, 3),
    ((128, 128, 128), 8, 3),
    ((64, 128, 128), 4, 4),
]
if interpreting():
    _TRAIN_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=1)]
else:
    _TRAIN_CONFIGS = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=st)
        for (m, n, k), w, st in _TRAIN_TILES
    ]


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles with more rows than the call has, or with under 1/8 of them (up to 256): fewer
    configs to time. Keeps the smallest tile if none is left."""
    rows = named_args["M_BUCKET"]
    kept = [c for c in configs if min(rows, 256) // 8 <= c.kwargs["BLOCK_M"] <= max(16, rows)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]


@triton.jit
def _w2a8_body(
    q_ptr, w_ptr, amax_ptr, ws_ptr, out_ptr,
    M, N, K, KW, M_BUCKET, q_stride, out_stride, inv_levels,
    DEQUANT: tl.constexpr, WEIGHT_INT8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # tiles in groups of GROUP_M row tiles, so that consecutive programs share weight tiles in L2
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    WORDS: tl.constexpr = BLOCK_K // 16
    ks = tl.arange(0, BLOCK_K)
    ws = tl.arange(0, WORDS)
    p = tl.arange(0, 16)
    shifts = 8 * (p % 4) + 2 * (p // 4)  # bit offset of weight p of a word (ternary_pack layout)
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * q_stride
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * KW

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        a = tl.load(q_rows + k[None, :], mask=row_ok[:, None] & (k < K)[None, :], other=0)
        # words past the row's last one read as 0 (weight -1) but meet activations masked to 0;
        # columns past N decode garbage that is never stored
        if WEIGHT_INT8:  # ternary levels as int8 [N, K] (KW = K, the row stride)
            t = tl.load(w_rows + k[None, :], mask=col_ok[:, None] & (k < K)[None, :], other=0)
        else:
            w = k0 // 16 + ws
            words = tl.load(w_rows + w[None, :], mask=col_ok[:, None] & (w < KW)[None, :], other=0)
            codes = (words[:, :, None] >> shifts[None, None, :]) & 3  # [BLOCK_N, WORDS, 16]
            t = (tl.reshape(codes, (BLOCK_N, BLOCK_K)) - 1).to(tl.int8)
        acc = tl.dot(a, tl.trans(t), acc, out_dtype=tl.int32)

    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * out_stride + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if DEQUANT == 2:  # training: (acc / s) / t, s = 127 / amax per row, t the weight's 1 / mean|W|
        s_row = tl.load(amax_ptr + rows, mask=row_ok, other=1.0)
        y = tl.div_rn(tl.div_rn(acc.to(tl.float32), s_row[:, None]), tl.load(ws_ptr))
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
    elif DEQUANT == 1:
        row_scale = tl.load(amax_ptr + rows, mask=row_ok, other=0.0) * inv_levels
        y = acc.to(tl.float32) * row_scale[:, None] * tl.load(ws_ptr)
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptrs, acc, mask=mask)


_w2a8_kernel = triton.autotune(
    configs=_CONFIGS, key=["M_BUCKET", "N", "K", "DEQUANT"], prune_configs_by={"early_config_prune": _prune_configs}
)(_w2a8_body)
_int8_kernel = triton.autotune(configs=_TRAIN_CONFIGS, key=["M_BUCKET", "N", "K"])(_w2a8_body)

# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def quantize_rows(x: Tensor, norm_weight: Tensor, eps: float = NORM_EPS) -> tuple[Tensor, Tensor]:
    """Triton: x [M, K] (any float dtype) -> (q int8 [M, K], amax fp32 [M]); see the module doc."""
    select_backend("triton", x)  # CUDA, or CPU under the interpreter; a clear error otherwise
    if x.dim() != 2 or norm_weight.shape != (x.shape[1],):
        raise ValueError(
            f"quantize_rows expects x [M, K] and norm_weight [K], got {tuple(x.shape)}, {tuple(norm_weight.shape)}"
        )
    if x.stride(1) != 1:
        x = x.contiguous()
    rows, k = x.shape
    q = torch.empty(rows, k, device=x.device, dtype=torch.int8)
    amax = torch.empty(rows, device=x.device, dtype=torch.float32)
    if rows == 0 or k == 0:
        return q, amax.fill_(SCALE_FLOOR)
    block, warps = row_block(k)
    with device_guard(x):
        _quantize_rows_kernel[(rows,)](
            x, norm_weight.contiguous(), q, amax, k, float(k), x.stride(0), eps, ACT_LEVELS, SCALE_FLOOR,
            BLOCK=block, num_warps=warps,
        )  # fmt: skip
    return q, amax


def _check_gemm_args(q: Tensor, packed: Tensor, features: int | None) -> int:
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"expected int8 activations [M, K], got {q.dtype} {tuple(q.shape)}")
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"expected packed int32 weights [N, ceil(K/16)], got {packed.dtype} {tuple(packed.shape)}")
    features = q.shape[1] if features is None else features
    if features != q.shape[1] or packed_words(features) != packed.shape[1]:
        raise ValueError(
            f"{features} features do not fit activations of width {q.shape[1]} and "
            f"{packed.shape[1]} packed words per row"
        )
    return features


def _launch(q, packed, amax, w_scale, out):
    m, k = q.shape
    n = packed.shape[0]
    if q.stride(1) != 1:
        q = q.contiguous()
    packed = packed.contiguous()
    dequant = amax is not None
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    with device_guard(q):
        _w2a8_kernel[grid](
            q, packed, amax if dequant else out, w_scale if dequant else out, out,
            m, n, k, packed.shape[1], min(triton.next_power_of_2(m), _MAX_M_BUCKET), q.stride(0), out.stride(0),
            _INV_LEVELS, DEQUANT=int(dequant), WEIGHT_INT8=False,
        )  # fmt: skip
    return out


def w2a8_matmul(q: Tensor, packed: Tensor, features: int | None = None) -> Tensor:
    """Triton: q int8 [M, K] times the ternary t [N, K] packed in `packed` int32 [N, ceil(K/16)],
    transposed: int32 [M, N], acc[m, n] = sum_k q[m, k] * t[n, k]. `features` is K (default q's width)."""
    select_backend("triton", q)
    _check_gemm_args(q, packed, features)
    out = torch.empty(q.shape[0], packed.shape[0], device=q.device, dtype=torch.int32)
    if out.numel() == 0:
        return out.zero_()
    return _launch(q, packed, None, None, out)


def w2a8_linear(
    q: Tensor, amax: Tensor, packed: Tensor, w_scale: Tensor, features: int | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:  # fmt: skip
    """Triton: `w2a8_matmul` with the dequantisation acc * (amax / 127)[:, None] * w_scale fused
    into its epilogue; amax fp32 [M] from `quantize_rows`, w_scale a one-element fp32 tensor."""
    select_backend("triton", q)
    _check_gemm_args(q, packed, features)
    if amax.dtype != torch.float32 or amax.shape != (q.shape[0],):
        raise ValueError(f"expected amax fp32 [{q.shape[0]}], got {amax.dtype} {tuple(amax.shape)}")
    out = torch.empty(q.shape[0], packed.shape[0], device=q.device, dtype=out_dtype)
    if out.numel() == 0:
        return out.zero_()
    w_scale = w_scale.to(device=q.device, dtype=torch.float32).reshape(1)
    return _launch(q, packed, amax.contiguous(), w_scale, out)


def int8_ternary_linear_ref(q: Tensor, s: Tensor, levels: Tensor, t: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Twin of `int8_ternary_linear`: exact int32 product (float64 sums) then (acc / s) / t in fp32."""
    acc = (q.double() @ levels.double().t()).to(torch.int32)
    return ((acc.float() / s.float()[:, None]) / t.float().reshape(())).to(out_dtype)


def int8_ternary_linear(q: Tensor, s: Tensor, levels: Tensor, t: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Triton: q int8 [M, K] (activation levels), s fp32 [M] (127 / amax per row), levels int8 [N, K]
    in {-1, 0, 1}, t a one-element fp32 tensor (1 / mean|W|) -> (q @ levels^T / s) / t in out_dtype,
    int32 accumulation on int8 tensor cores. BitLinear's training forward (see the module doc)."""
    select_backend("triton", q)
    if q.dtype != torch.int8 or levels.dtype != torch.int8 or q.dim() != 2 or levels.dim() != 2:
        raise ValueError(f"expected int8 q [M, K] and int8 levels [N, K], got {q.dtype} {tuple(q.shape)}, "
                         f"{levels.dtype} {tuple(levels.shape)}")  # fmt: skip
    if levels.shape[1] != q.shape[1] or s.shape != (q.shape[0],):
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, levels {tuple(levels.shape)}, s {tuple(s.shape)}")
    m, k = q.shape
    n = levels.shape[0]
    out = torch.empty(m, n, device=q.device, dtype=out_dtype)
    if out.numel() == 0:
        return out.zero_()
    q = q.contiguous()
    levels = levels.contiguous()
    t = t.to(device=q.device, dtype=torch.float32).reshape(1)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    with device_guard(q):
        _int8_kernel[grid](
            q, levels, s.float().contiguous(), t, out, m, n, k, k, min(triton.next_power_of_2(m), _MAX_M_BUCKET),
            q.stride(0), out.stride(0), _INV_LEVELS, DEQUANT=2, WEIGHT_INT8=True,
        )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------


def packed_bitlinear(
    x: Tensor, norm_weight: Tensor, packed: Tensor, w_scale: Tensor, features: int,
    eps: float = NORM_EPS, out_dtype: torch.dtype | None = None, backend: str = "auto",
) -> Tensor:  # fmt: skip
    """BitLinear's forward on packed ternary weights: x [..., K] -> [..., N] in out_dtype (x's dtype
    by default). `packed`, `w_scale` come from `ternary_pack.pack_weight(W)`; the result matches
    `bitlinear(x, norm_weight, W, "vanilla")` up to float rounding. backend: auto | triton | torch
    ("auto" is Triton on CUDA tensors, PyTorch elsewhere)."""
    if x.shape[-1] != features:
        raise ValueError(f"x has {x.shape[-1]} features, the packed weights {features}")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    lead = x.shape[:-1]
    x2d = x.reshape(-1, features)
    w_scale = torch.as_tensor(w_scale, dtype=torch.float32, device=x.device)
    if select_backend(backend, x) == "triton":
        q, amax = quantize_rows(x2d, norm_weight, eps)
        y = w2a8_linear(q, amax, packed, w_scale, features, out_dtype)
    else:
        q, amax = quantize_rows_ref(x2d, norm_weight, eps)
        y = w2a8_linear_ref(q, amax, packed, w_scale, features, out_dtype)
    return y.reshape(*lead, packed.shape[0])


__all__ = [
    "int8_ternary_linear",
    "int8_ternary_linear_ref",
    "packed_bitlinear",
    "quantize_rows",
    "quantize_rows_ref",
    "w2a8_linear",
    "w2a8_linear_ref",
    "w2a8_matmul",
    "w2a8_matmul_ref",
]
