"""The MLGRU gates and recurrence in plain PyTorch: the one home of both (the Triton kernels in
`mlgru.py` and `w2a8_gemv_triton.py` spell the same gates in registers and are tested against these).

    f_t = lb + (1 - lb) * sigmoid(f_pre_t)   (sigmoid alone where there is no bound: layer 0)
    i_t = silu(i_pre_t) * (1 - f_t)
    c_t = f_t * c_{t-1} + i_t                (fp32 state, c_0 = state or 0)

- `mlgru_gates`: (f, i) from the two projections, in their dtype (`forget_gate`: f alone).
- `mlgru_scan_naive`: the recurrence on finished gates as a Python loop over time, differentiated by
  autograd (the test oracle); `mlgru_ref` and `mlgru_step` put the gates in front of it (the whole
  sequence, and one decoding step).
- `affine_scan` / `reverse_scan`: the recurrence as a blocked two-level scan without autograd, and
  the same scan run backwards in time, g_t = dh_t + f_{t+1} g_{t+1} (the backward of both
  `mlgru_scan` and the PyTorch backend of `mlgru.mlgru`). Time is cut into chunks of about sqrt(T)
  steps (a power of two); one loop walks the positions inside all chunks at once (state 0 at each
  chunk start), a second loop carries the true state across chunks, adding
  cumprod(f within the chunk) * carry. Both loops run ~sqrt(T) vectorised steps and the work
  buffers are O(B*T*D).
- `mlgru_scan`: the production scan on finished gates f, i [B, T, D] with a hand-written backward
  (di = g, df_t = g_t * c_{t-1}) that saves only f, the output h (kept by the next op anyway) and
  c_0. Returns (h [B, T, D] in i's dtype, final_state = c_T in fp32). On CUDA, while training, its
  forward and backward run as Triton kernels (`mlgru_scan_triton.py`) saving the same tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def forget_gate(f_pre: Tensor, lower_bound: Tensor | None) -> Tensor:
    """f = sigmoid(f_pre), raised by the lower bound where there is one: lb + (1 - lb) * sigmoid."""
    forget = torch.sigmoid(f_pre)
    if lower_bound is not None:
        forget = lower_bound + (1 - lower_bound) * forget
    return forget


def mlgru_gates(f_pre: Tensor, i_pre: Tensor, lower_bound: Tensor | None) -> tuple[Tensor, Tensor]:
    """Forget and input gates from the projections: f after sigmoid and lower bound, i = silu * (1-f)."""
    forget = forget_gate(f_pre, lower_bound)
    return forget, F.silu(i_pre) * (1 - forget)


def mlgru_scan_naive(f: Tensor, i: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Step-by-step recurrence in fp32; differentiable by autograd."""
    batch, steps, dim = f.shape
    c = state.float() if state is not None else f.new_zeros(batch, dim, dtype=torch.float32)
    outputs = []
    for t in range(steps):
        c = f[:, t].float() * c + i[:, t].float()
        outputs.append(c)
    h = torch.stack(outputs, dim=1) if outputs else c.new_zeros(batch, 0, dim)
    return h.to(i.dtype), c


def mlgru_ref(f_pre, i_pre, lower_bound, state=None):
    """The twin of `mlgru.mlgru`: gates and recurrence step by step in fp32, differentiated by autograd."""
    forget, inp = mlgru_gates(f_pre.float(), i_pre.float(), lower_bound.float())
    h, final = mlgru_scan_naive(forget, inp, state)
    return h.to(f_pre.dtype), final


def mlgru_step(f_pre, i_pre, lower_bound, state):
    """One decoding step: f_pre, i_pre [B, D] (or [B, 1, D]), state [B, D] fp32 -> (h, new_state)."""
    forget, inp = mlgru_gates(f_pre.float(), i_pre.float(), lower_bound.float())
    c = forget * state.float().reshape(forget.shape) + inp
    return c.to(f_pre.dtype), c.reshape(state.shape)


def affine_scan(f: Tensor, i: Tensor, c0: Tensor | None, chunk_len: int | None = None) -> tuple[Tensor, Tensor]:
    """No-autograd scan of fp32 f, i [B, T, D] from c0 [B, D] (or 0) -> (c [B, T, D], c_T [B, D])."""
    batch, steps, dim = f.shape
    if steps == 0:
        final = c0.clone() if c0 is not None else f.new_zeros(batch, dim)
        return f.new_zeros(batch, 0, dim), final
    size = chunk_len or 1 << math.ceil(math.log2(math.sqrt(steps)))  # power of two: no padding at 2^n
    chunks = -(-steps // size)
    pad = chunks * size - steps
    if pad:  # f = 1, i = 0 past the end: the state passes through unchanged
        f = torch.cat((f, f.new_ones(batch, pad, dim)), dim=1)
        i = torch.cat((i, i.new_zeros(batch, pad, dim)), dim=1)
    f_chunks = f.view(batch, chunks, size, dim)
    i_chunks = i.view(batch, chunks, size, dim)
    out = torch.empty_like(f_chunks)
    out[:, :, 0] = i_chunks[:, :, 0]
    for j in range(1, size):  # inside every chunk at once, starting from 0
        out[:, :, j] = torch.addcmul(i_chunks[:, :, j], f_chunks[:, :, j], out[:, :, j - 1])
    carry = c0
    for k in range(chunks):  # the true state across chunks
        if carry is not None:
            out[:, k].addcmul_(torch.cumprod(f_chunks[:, k], dim=1), carry.unsqueeze(1))
        carry = out[:, k, -1]
    c = out.view(batch, chunks * size, dim)
    if pad:  # a copy at every batch (at batch 1 the slice is contiguous already: .contiguous() would keep
        # the padded storage, and the step's allocations would change with the batch)
        c = c[:, :steps].clone(memory_format=torch.contiguous_format)
    return c, carry.clone()


def reverse_scan(f: Tensor, dh: Tensor, d_final: Tensor, chunk_len: int | None = None) -> Tensor:
    """g_t = dh_t + f_{t+1} g_{t+1} from g_{T-1} = dh_{T-1} + d_final (fp32 [B, T, D], T >= 1): the
    gradient reaching each c_t. The forward scan on time-reversed inputs; the reversed copies are
    arguments only, so they are freed as soon as it returns."""
    batch, _, dim = f.shape
    f_next = torch.cat((f[:, 1:], f.new_ones(batch, 1, dim)), dim=1)
    g, _ = affine_scan(f_next.flip(1), dh.flip(1), d_final, chunk_len)
    return g.flip(1)


class _MLGRUScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f: Tensor, i: Tensor, state: Tensor | None, chunk_len: int | None, triton: bool):
        ctx.triton = triton
        if ctx.triton:
            from mmprof.kernels.mlgru_scan_triton import scan_forward

            h, final = scan_forward(f.contiguous(), i.contiguous(), state.contiguous() if state is not None else None)
        else:
            with torch.no_grad():
                c, final = affine_scan(f.float(), i.float(), state.float() if state is not None else None, chunk_len)
            h = c.to(i.dtype)
        ctx.save_for_backward(f, h, state)
        ctx.i_dtype, ctx.chunk_len = i.dtype, chunk_len
        return h, final

    @staticmethod
    def backward(ctx, dh: Tensor, dfinal: Tensor):
        f, h, state = ctx.saved_tensors
        batch, steps, dim = f.shape
        if ctx.triton:
            from mmprof.kernels.mlgru_scan_triton import scan_backward

            s0 = state.contiguous() if state is not None else None
            d_f, d_i, d_s = scan_backward(f.contiguous(), h, s0, dh.contiguous(), dfinal.contiguous(), ctx.i_dtype)
            return d_f, d_i, d_s.to(state.dtype) if state is not None else None, None, None
        f32 = f.float()
        g = reverse_scan(f32, dh.float(), dfinal.float(), ctx.chunk_len)
        c0 = state.float() if state is not None else f32.new_zeros(batch, dim)
        d_f = (g * torch.cat((c0.unsqueeze(1), h[:, :-1].float()), dim=1)).to(f.dtype)
        d_state = None
        if state is not None:
            d_state = (f32[:, 0] * g[:, 0] if steps else dfinal).to(state.dtype)
        return d_f, g.to(ctx.i_dtype), d_state, None, None


def _use_triton(backend: str, f: Tensor) -> bool:
    """The Triton bodies (`mlgru_scan_triton`), for at least one step: where `select_backend` gives
    "triton" for an explicit backend="triton"; with "auto" on plain CUDA tensors (not fake ones) while
    gradients are on, no CUDA graph is being captured (training: decoding keeps the PyTorch scan) and
    MMPROF_REFERENCE_FAST is not 0."""
    from mmprof.kernels._triton_util import select_backend
    from mmprof.settings import reference_fast_enabled

    if f.shape[1] == 0 or select_backend(backend, f) != "triton":
        return False
    if backend == "triton":
        return True
    if type(f) not in (torch.Tensor, torch.nn.Parameter) or not torch.is_grad_enabled():
        return False
    return not torch.cuda.is_current_stream_capturing() and reference_fast_enabled()


def mlgru_scan(
    f: Tensor, i: Tensor, state: Tensor | None = None, *, chunk_len: int | None = None, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Production scan; same results as `mlgru_scan_naive` to fp32 rounding. backend: "auto" (Triton on
    CUDA while training, the chunked PyTorch scan elsewhere) | "triton" | "torch"; both keep f, h and
    the state."""
    if f.shape != i.shape or f.dim() != 3:
        raise ValueError(f"f and i must both be [B, T, D]; got {tuple(f.shape)} and {tuple(i.shape)}")
    return _MLGRUScan.apply(f, i, state, chunk_len, _use_triton(backend, f))
