"""The MLGRU recurrence c_t = f_t * c_{t-1} + i_t (elementwise, fp32 state).

Inputs are the finished gates: f [B, T, D] (forget gate after sigmoid and lower bound) and
i [B, T, D] (input after silu * (1 - f)); `state` [B, D] is c_0 (zeros when None). Both functions
return (h, final_state): h [B, T, D] holds every c_t in i's dtype, final_state is c_T in fp32.

- `mlgru_scan_naive`: a Python loop over time, differentiated by autograd (the test oracle).
- `mlgru_scan`: a blocked two-level scan in PyTorch with a hand-written backward. Time is cut into
  chunks of about sqrt(T) steps (a power of two); one loop walks the positions inside all chunks at
  once (state 0 at each chunk start), a second loop carries the true state across chunks, adding
  cumprod(f within the chunk) * carry. Both loops run ~sqrt(T) vectorized steps, the work buffers are
  O(B*T*D) and nothing inside is recorded by autograd. Backward is the same scan run backwards in
  time, g_t = dh_t + f_{t+1} g_{t+1}, with di = g and df_t = g_t * c_{t-1}; it saves only f, the
  output h (kept by the next op anyway) and c_0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


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


def _blocked_scan(f: Tensor, i: Tensor, c0: Tensor | None, chunk_len: int | None = None) -> tuple[Tensor, Tensor]:
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
    fc = f.view(batch, chunks, size, dim)
    ic = i.view(batch, chunks, size, dim)
    out = torch.empty_like(fc)
    out[:, :, 0] = ic[:, :, 0]
    for j in range(1, size):  # inside every chunk at once, starting from 0
        out[:, :, j] = torch.addcmul(ic[:, :, j], fc[:, :, j], out[:, :, j - 1])
    carry = c0
    for k in range(chunks):  # the true state across chunks
        if carry is not None:
            out[:, k].addcmul_(torch.cumprod(fc[:, k], dim=1), carry.unsqueeze(1))
        carry = out[:, k, -1]
    c = out.view(batch, chunks * size, dim)
    if pad:
        c = c[:, :steps].contiguous()
    return c, carry.clone()


class _MLGRUScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f: Tensor, i: Tensor, state: Tensor | None, chunk_len: int | None):
        with torch.no_grad():
            c, final = _blocked_scan(f.float(), i.float(), state.float() if state is not None else None, chunk_len)
        h = c.to(i.dtype)
        ctx.save_for_backward(f, h, state)
        ctx.i_dtype, ctx.chunk_len = i.dtype, chunk_len
        return h, final

    @staticmethod
    def backward(ctx, dh: Tensor, dfinal: Tensor):
        f, h, state = ctx.saved_tensors
        batch, steps, dim = f.shape
        ff = f.float()
        # g_t = dh_t + f_{t+1} g_{t+1}: the forward scan on time-reversed inputs, from g_T = dfinal.
        # The reversed copies are arguments only, so they are freed as soon as the scan returns.
        g, _ = _blocked_scan(
            torch.cat((ff[:, 1:], ff.new_ones(batch, 1, dim)), dim=1).flip(1),
            dh.float().flip(1),
            dfinal.float(),
            ctx.chunk_len,
        )
        g = g.flip(1)
        c0 = state.float() if state is not None else ff.new_zeros(batch, dim)
        d_f = (g * torch.cat((c0.unsqueeze(1), h[:, :-1].float()), dim=1)).to(f.dtype)
        d_state = None
        if state is not None:
            d_state = (ff[:, 0] * g[:, 0] if steps else dfinal).to(state.dtype)
        return d_f, g.to(ctx.i_dtype), d_state, None


def mlgru_scan(
    f: Tensor, i: Tensor, state: Tensor | None = None, *, chunk_len: int | None = None
) -> tuple[Tensor, Tensor]:
    """Production scan; same results as `mlgru_scan_naive` to fp32 rounding."""
    if f.shape != i.shape or f.dim() != 3:
        raise ValueError(f"f and i must both be [B, T, D]; got {tuple(f.shape)} and {tuple(i.shape)}")
    return _MLGRUScan.apply(f, i, state, chunk_len)
