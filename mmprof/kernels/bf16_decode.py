"""Triton kernels for one-token (batch 1) bf16 decoding of Transformer++, each with a PyTorch twin.

At batch 1 a decoding step reads every weight once and does little else, so the step is as fast
as its weight reads and the launches between them. These kernels fold the small operations into
the matrix-vector products that read the weights, five launches a layer:

- `norm_qkv_rope`: RMSNorm of the residual row, the fused q/k/v product, rotary embedding of q and
  k, and the write of k and v into the static cache at the position held on the device;
- `attend`: one query row per head against the filled part of the cache only (positions 0..pos);
- `gemv` with `residual=True`: o_proj and down_proj added into the residual row in place;
- `gemv` with `norm` and `glu`: RMSNorm, the fused gate/up product and silu(gate) * up;
- `gemv` with `norm` alone: the final norm and lm_head.

With `pdl=True` (Hopper on), each kernel is launched with programmatic dependent launch: it may
start while the launch before it still runs, loads its first block of weights (which no launch
writes), then waits for that launch to finish before it reads its input, and lets the next launch
start in turn; a graph of such launches has no gap between them. The arithmetic is the same.

Rounding follows the eager decoder's bf16 graph: each product is accumulated in fp32 and rounded
to bf16 where the eager decoder holds a bf16 tensor (normed input, q/k/v, rotary terms, gate and
up, silu(gate)), so the two differ only in summation order (in fp32 nothing is rounded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from mmprof.kernels._triton_util import interpreting, pdl_supported


@dataclass(frozen=True)
class GemvBlocks:
    """Launch shape of a matrix-vector kernel: `rows` output rows per program (for the GLU and
    rotary kernels, rows of each half), `cols` input columns per loop step. `split` > 1 (plain and
    residual `gemv` only): split-K, each row's columns cut into `split` ranges, one program each,
    the fp32 partial sums added (with the residual) and rounded by a second, small launch: more
    programs for products with few rows (o_proj, down_proj) than the SMs would otherwise get."""

    rows: int = 16
    cols: int = 512
    warps: int = 4
    stages: int = 4
    split: int = 1


INTERPRET_BLOCKS = GemvBlocks(rows=64, cols=128, warps=1, stages=1)  # few, wide programs: the interpreter runs each in turn


def _launch(blocks: GemvBlocks, cols: int) -> tuple[int, int, dict]:
    """(rows, cols, launch kwargs), the column block no wider than the input needs."""
    if interpreting():
        blocks = INTERPRET_BLOCKS
    width = min(blocks.cols, triton.next_power_of_2(cols))
    opts = {} if interpreting() else {"num_warps": blocks.warps, "num_stages": blocks.stages}
    return blocks.rows, width, opts


def _dependent(pdl: bool, like: Tensor) -> dict:
    """The kernels' PDL argument and launch option: programmatic dependent launch where asked for
    and supported (`pdl_supported`), else plain stream order."""
    on = pdl and pdl_supported(like)
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}


@triton.jit
def _held(v, like):
    """Round fp32 to the element type of pointer `like` and back (where the eager decoder holds a
    tensor of the weights' dtype: bf16 on a GPU; a no-op in fp32)."""
    return v.to(like.dtype.element_ty).to(tl.float32)


@triton.jit
def _rstd(a_ptr, K, eps, BLOCK_K: tl.constexpr):
    cols = tl.arange(0, BLOCK_K)
    squares = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
        squares += a * a
    return tl.rsqrt(tl.sum(squares, 0) / K + eps)


@triton.jit
def _input(a_ptr, norm_ptr, k, k_ok, rstd, like, NORM: tl.constexpr):
    """Input columns k of a gemv in fp32: RMS-normed with NORM (held in `like`'s dtype)."""
    a = tl.load(a_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    if NORM:
        a = _held(a * rstd * tl.load(norm_ptr + k, mask=k_ok, other=0.0).to(tl.float32), like)
    return a


@triton.jit
def _dependent_start(PDL: tl.constexpr):
    """With PDL (launched with programmatic dependent launch): wait until the launch before this
    one has finished and its writes are visible, then let the launch after this one start (it
    loads its first weights while this one runs, and waits here in turn). Without: nothing."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _gemv_kernel(a_ptr, w_ptr, out_ptr, norm_ptr, K, N, eps,
                 NORM: tl.constexpr, GLU: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n] = W[n] . a (a RMS-normed first with NORM); GLU: silu(W[n] . a) * (W[N + n] . a);
    RESIDUAL: out[n] += (in place). The first column block of the weights (which no launch
    writes) is loaded before `_dependent_start`, the input after it."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * K
    first = row_ok[:, None] & (cols < K)[None, :]
    w_first = tl.load(w_rows + cols[None, :], mask=first, other=0.0)
    if GLU:
        up_first = tl.load(w_rows + N * K + cols[None, :], mask=first, other=0.0)
    _dependent_start(PDL)
    rstd = _rstd(a_ptr, K, eps, BLOCK_K) if NORM else 1.0
    a = _input(a_ptr, norm_ptr, cols, cols < K, rstd, w_ptr, NORM)
    acc = w_first.to(tl.float32) * a[None, :]
    if GLU:
        acc_up = up_first.to(tl.float32) * a[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + cols
        k_ok = k < K
        a = _input(a_ptr, norm_ptr, k, k_ok, rstd, w_ptr, NORM)
        ok = row_ok[:, None] & k_ok[None, :]
        acc += tl.load(w_rows + k[None, :], mask=ok, other=0.0).to(tl.float32) * a[None, :]
        if GLU:
            acc_up += tl.load(w_rows + N * K + k[None, :], mask=ok, other=0.0).to(tl.float32) * a[None, :]
    out = tl.sum(acc, 1)
    if GLU:
        gate = _held(out, out_ptr)
        out = _held(gate * tl.sigmoid(gate), out_ptr) * _held(tl.sum(acc_up, 1), out_ptr)
    if RESIDUAL:
        out += tl.load(out_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _gemv_part_kernel(a_ptr, w_ptr, part_ptr, K, N, K_PER,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """part[s, n] = W[n, s*K_PER : (s+1)*K_PER] . a[...] in fp32 (s: the second program index)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    start = tl.program_id(1) * K_PER
    cols = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * K
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K_PER, BLOCK_K):
        k = start + k0 + cols
        k_ok = (k < K) & (k0 + cols < K_PER)
        a = tl.load(a_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        acc += tl.load(w_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32) * a[None, :]
    tl.store(part_ptr + tl.program_id(1) * N + rows, tl.sum(acc, 1), mask=row_ok)


@triton.jit
def _gemv_sum_kernel(part_ptr, out_ptr, N, SPLIT: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """out[n] = sum over s of part[s, n] (+ out[n] with RESIDUAL), rounded once."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    acc = tl.zeros([BLOCK], tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(part_ptr + s * N + rows, mask=ok, other=0.0)
    if RESIDUAL:
        acc += tl.load(out_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _gemv_split(a: Tensor, weight: Tensor, out: Tensor, residual: bool, blocks: GemvBlocks) -> Tensor:
    """Split-K `gemv` (see GemvBlocks.split): a partial-sum launch and a summing launch."""
    N, K = weight.shape
    block_n, block_k, opts = _launch(blocks, triton.cdiv(K, blocks.split))
    k_per = triton.cdiv(triton.cdiv(K, blocks.split), block_k) * block_k  # whole column blocks a range
    split = triton.cdiv(K, k_per)
    part = torch.empty(split, N, device=a.device, dtype=torch.float32)
    _gemv_part_kernel[(triton.cdiv(N, block_n), split)](a, weight, part, K, N, k_per,
                                                       BLOCK_N=block_n, BLOCK_K=block_k, **opts)
    block = min(1024, triton.next_power_of_2(N))
    _gemv_sum_kernel[(triton.cdiv(N, block),)](part, out, N, SPLIT=split, RESIDUAL=residual, BLOCK=block)
    return out


def gemv(a: Tensor, weight: Tensor, out: Tensor | None = None, *, norm: Tensor | None = None,
         eps: float = 1e-6, glu: bool = False, residual: bool = False,
         blocks: GemvBlocks = GemvBlocks(), pdl: bool = False) -> Tensor:
    """One row a [K] times weight [N, K] (GLU: [2N, K], gate rows then up rows) -> [N].

    norm: RMSNorm a with this weight first. residual: add into `out` (given) in place. pdl:
    launched with programmatic dependent launch (see `_dependent_start`; split-K launches in
    plain stream order)."""
    rows_out = weight.shape[0] // 2 if glu else weight.shape[0]
    K = weight.shape[1]
    if out is None:
        if residual:
            raise ValueError("gemv(residual=True) adds into `out`: give it")
        out = torch.empty(rows_out, device=a.device, dtype=a.dtype)
    if blocks.split > 1:
        if norm is not None or glu:
            raise ValueError("gemv: split-K (blocks.split > 1) is for the plain and residual products only")
        return _gemv_split(a, weight, out, residual, blocks)
    block_n, block_k, opts = _launch(blocks, K)
    grid = (triton.cdiv(rows_out, block_n),)
    _gemv_kernel[grid](a, weight, out, norm if norm is not None else a, K, rows_out, eps,
                       NORM=norm is not None, GLU=glu, RESIDUAL=residual,
                       BLOCK_N=block_n, BLOCK_K=block_k, **opts, **_dependent(pdl, a))
    return out


def gemv_ref(a: Tensor, weight: Tensor, out: Tensor | None = None, *, norm: Tensor | None = None,
             eps: float = 1e-6, glu: bool = False, residual: bool = False) -> Tensor:
    """The twin of `gemv`, as the eager decoder computes it."""
    if norm is not None:
        a = F.rms_norm(a, (a.shape[-1],), norm, eps)
    y = F.linear(a, weight)
    if glu:
        gate, up = y.chunk(2)
        y = F.silu(gate) * up
    if residual:
        return out.add_(y)
    return y if out is None else out.copy_(y)


@triton.jit
def _qkv_rope_kernel(x_ptr, norm_ptr, w_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr,
                     K, eps, HEADS, KV_HEADS, head_stride, PDL: tl.constexpr,
                     HEAD_DIM: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (head h of q|k|v, dims j..j+BLOCK_J of each half): rows h*D + j and h*D + D/2 + j.
    The first column block of both halves' weights is loaded before `_dependent_start`."""
    HALF = HEAD_DIM // 2
    per_head = HALF // BLOCK_J
    pid = tl.program_id(0)
    head = pid // per_head
    j = (pid % per_head) * BLOCK_J + tl.arange(0, BLOCK_J)
    rows = (head * HEAD_DIM + j).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    w_lo = w_ptr + rows[:, None] * K + cols[None, :]
    first = (cols < K)[None, :]
    lo_first = tl.load(w_lo, mask=first, other=0.0)
    hi_first = tl.load(w_lo + HALF * K, mask=first, other=0.0)
    _dependent_start(PDL)
    rstd = _rstd(x_ptr, K, eps, BLOCK_K)
    a = _input(x_ptr, norm_ptr, cols, cols < K, rstd, w_ptr, True)
    acc_lo = lo_first.to(tl.float32) * a[None, :]
    acc_hi = hi_first.to(tl.float32) * a[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + cols
        k_ok = k < K
        a = _input(x_ptr, norm_ptr, k, k_ok, rstd, w_ptr, True)
        acc_lo += tl.load(w_lo + k0, mask=k_ok[None, :], other=0.0).to(tl.float32) * a[None, :]
        acc_hi += tl.load(w_lo + HALF * K + k0, mask=k_ok[None, :], other=0.0).to(tl.float32) * a[None, :]
    lo, hi = _held(tl.sum(acc_lo, 1), q_ptr), _held(tl.sum(acc_hi, 1), q_ptr)
    pos = tl.load(pos_ptr)
    cos = tl.load(cos_ptr + pos * HALF + j).to(tl.float32)
    sin = tl.load(sin_ptr + pos * HALF + j).to(tl.float32)
    # x * cos + rotate_half(x) * sin, each product and the sum held as the eager decoder holds them
    rot_lo = _held(_held(lo * cos, q_ptr) - _held(hi * sin, q_ptr), q_ptr)
    rot_hi = _held(_held(hi * cos, q_ptr) + _held(lo * sin, q_ptr), q_ptr)
    head_j = head + 0 * j  # the head as a block, so that the masks below are blocks
    is_q = head_j < HEADS
    is_k = (head_j >= HEADS) & (head_j < HEADS + KV_HEADS)
    is_v = head_j >= HEADS + KV_HEADS
    tl.store(q_ptr + rows, rot_lo.to(q_ptr.dtype.element_ty), mask=is_q)
    tl.store(q_ptr + rows + HALF, rot_hi.to(q_ptr.dtype.element_ty), mask=is_q)
    k_at = k_ptr + (head - HEADS) * head_stride + pos * HEAD_DIM + j
    tl.store(k_at, rot_lo.to(k_ptr.dtype.element_ty), mask=is_k)
    tl.store(k_at + HALF, rot_hi.to(k_ptr.dtype.element_ty), mask=is_k)
    v_at = v_ptr + (head - HEADS - KV_HEADS) * head_stride + pos * HEAD_DIM + j
    tl.store(v_at, lo.to(v_ptr.dtype.element_ty), mask=is_v)
    tl.store(v_at + HALF, hi.to(v_ptr.dtype.element_ty), mask=is_v)


def norm_qkv_rope(x: Tensor, norm: Tensor, eps: float, weight: Tensor, cos_half: Tensor, sin_half: Tensor,
                  pos: Tensor, q: Tensor, k_cache: Tensor, v_cache: Tensor, heads: int,
                  blocks: GemvBlocks = GemvBlocks(), pdl: bool = False) -> None:
    """x [K] -> q [heads * D] (normed, projected, rotated); k (rotated) and v written into
    k_cache/v_cache [kv_heads, max_len, D] at position pos [1]. weight [(heads + 2 kv_heads) * D, K]
    (q, k, v rows); cos_half/sin_half [max_len, D/2] (the rotary tables' first half)."""
    kv_heads, max_len, head_dim = k_cache.shape
    block_j, block_k, opts = _launch(blocks, weight.shape[1])
    block_j = min(block_j, head_dim // 2)
    grid = ((heads + 2 * kv_heads) * (head_dim // 2 // block_j),)
    _qkv_rope_kernel[grid](x, norm, weight, cos_half, sin_half, pos, q, k_cache, v_cache,
                           weight.shape[1], eps, heads, kv_heads, max_len * head_dim,
                           HEAD_DIM=head_dim, BLOCK_J=block_j, BLOCK_K=block_k, **opts, **_dependent(pdl, x))


def norm_qkv_rope_ref(x, norm, eps, weight, cos_half, sin_half, pos, q, k_cache, v_cache, heads) -> None:
    """The twin of `norm_qkv_rope`."""
    kv_heads, _, head_dim = k_cache.shape
    half = head_dim // 2
    qkv = F.linear(F.rms_norm(x, (x.shape[-1],), norm, eps), weight).view(heads + 2 * kv_heads, head_dim)
    cos = torch.cat([cos_half[pos]] * 2, -1)
    sin = torch.cat([sin_half[pos]] * 2, -1)
    qk = qkv[: heads + kv_heads]
    qk = qk * cos + torch.cat((-qk[:, half:], qk[:, :half]), -1) * sin
    q.copy_(qk[:heads].reshape(-1))
    k_cache.index_copy_(1, pos, qk[heads:, None])
    v_cache.index_copy_(1, pos, qkv[heads + kv_heads :, None])


@triton.jit
def _attend_kernel(q_ptr, k_ptr, v_ptr, o_ptr, pos_ptr, head_stride, group, scale,
                   HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, PDL: tl.constexpr):
    """One query head against keys 0..pos of its kv head (online softmax over blocks of keys)."""
    _dependent_start(PDL)
    head = tl.program_id(0)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + head * HEAD_DIM + dims).to(tl.float32) * scale
    base = (head // group) * head_stride
    n_keys = (tl.load(pos_ptr) + 1).to(tl.int32)
    best = tl.zeros([], tl.float32) - float("inf")
    total = tl.zeros([], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for t0 in range(0, n_keys, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = t < n_keys
        at = base + t[:, None] * HEAD_DIM + dims[None, :]
        keys = tl.load(k_ptr + at, mask=ok[:, None], other=0.0).to(tl.float32)
        scores = tl.where(ok, tl.sum(keys * q[None, :], 1), float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 0))
        p = tl.exp(scores - new_best)
        keep = tl.exp(best - new_best)
        values = tl.load(v_ptr + at, mask=ok[:, None], other=0.0).to(tl.float32)
        total = total * keep + tl.sum(p, 0)
        acc = acc * keep + tl.sum(p[:, None] * values, 0)
        best = new_best
    tl.store(o_ptr + head * HEAD_DIM + dims, (acc / total).to(o_ptr.dtype.element_ty))


def attend(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor, out: Tensor | None = None,
           block_t: int = 64, pdl: bool = False) -> Tensor:
    """q [heads * D] against k_cache/v_cache [kv_heads, max_len, D] at positions 0..pos -> [heads * D]
    (pdl: launched with programmatic dependent launch)."""
    kv_heads, max_len, head_dim = k_cache.shape
    heads = q.numel() // head_dim
    out = torch.empty_like(q) if out is None else out
    opts = {} if interpreting() else {"num_warps": 8 if block_t * head_dim >= 16384 else 4}
    _attend_kernel[(heads,)](q, k_cache, v_cache, out, pos, max_len * head_dim, heads // kv_heads,
                             head_dim**-0.5, HEAD_DIM=head_dim, BLOCK_T=block_t, **opts, **_dependent(pdl, q))
    return out


def attend_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor, out: Tensor | None = None) -> Tensor:
    """The twin of `attend` (SDPA over the filled positions)."""
    kv_heads, _, head_dim = k_cache.shape
    n = int(pos.item()) + 1
    qh = q.view(kv_heads, -1, head_dim)
    o = F.scaled_dot_product_attention(qh, k_cache[:, :n], v_cache[:, :n]).reshape(-1)
    return o if out is None else out.copy_(o)
