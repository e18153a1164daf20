"""Decoding: prefill a prompt, then one token at a time with the MLGRU recurrent state (MatMul-free)
or a preallocated KV cache (Transformer++).

Weights are used as the model holds them: for the MatMul-free LM that is `fake-quant` (bf16 or fp32
weights quantized to ternary on every call, as the reference implementation does).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

from mmprof.errors import UserError


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters as held on the device (shared tensors counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


class Decoder:
    """Holds the decoding state of `batch` sequences of up to `max_len` tokens."""

    def __init__(self, model: nn.Module, batch: int, max_len: int, device: str | torch.device | None = None):
        self.model, self.batch, self.max_len = model, batch, max_len
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.state = model.init_state(batch, max_len, self.device)
        self.length = 0

    def _run(self, input_ids: Tensor) -> Tensor:
        if input_ids.shape[0] != self.batch:
            raise UserError(f"decoder holds {self.batch} sequences, got a batch of {input_ids.shape[0]}")
        if self.length + input_ids.shape[1] > self.max_len:
            raise UserError(f"decoding past max_len {self.max_len} (at {self.length} + {input_ids.shape[1]})")
        out = self.model(input_ids, state=self.state)
        self.state = out.state
        self.length += input_ids.shape[1]
        return out.logits[:, -1]

    @torch.inference_mode()
    def prefill(self, input_ids: Tensor) -> Tensor:
        """Run the prompt [B, P]; return the logits of its last position [B, vocab]."""
        return self._run(input_ids)

    @torch.inference_mode()
    def step(self, next_ids: Tensor) -> Tensor:
        """Feed one token per sequence ([B] or [B, 1]); return its logits [B, vocab]."""
        return self._run(next_ids.reshape(self.batch, 1))


def sample(logits: Tensor, temperature: float = 0.0, top_k: int | None = None, generator=None) -> Tensor:
    """Next token ids [B] from logits [B, vocab]: argmax at temperature 0, else softmax sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompt_ids: Tensor,
    new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    on_token: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """Prompt [B, P] -> [B, P + new_tokens]. `on_token(n, ids)` is called after each new token."""
    batch, prompt_len = prompt_ids.shape
    decoder = Decoder(model, batch, prompt_len + new_tokens, prompt_ids.device)
    logits = decoder.prefill(prompt_ids)
    pieces = [prompt_ids]
    for n in range(new_tokens):
        ids = sample(logits, temperature, top_k, generator)
        pieces.append(ids[:, None])
        if on_token is not None:
            on_token(n, ids)
        if n + 1 < new_tokens:
            logits = decoder.step(ids)
    return torch.cat(pieces, dim=1)
