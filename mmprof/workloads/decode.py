"""Decoding: prefill a prompt, then one token at a time with the MLGRU recurrent state (MatMul-free)
or a preallocated KV cache (Transformer++).

`Decoder` runs the model's own forward with its state. `GraphDecoder` drives a model's static
decoder (`model.static_decoder(batch, max_len, device)`: `prefill(prompt) -> logits` resets and runs
the prompt eagerly, `step(ids) -> logits` is capturable: fixed shapes, position on the device) and
on CUDA replays one captured CUDA graph per token, so no per-token host work is left but a copy and
a replay. `make_decoder` picks the graph decoder for models that have a static decoder.

Weights are used as the model holds them: `MMFreeLM` keeps bf16 or fp32 weights and quantizes them
to ternary on every call (fake-quant, as the reference implementation does); `PackedMMFreeLM`
(workloads/packed.py) holds them packed in 2 bits and has only the static decoder.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch
import torch.nn as nn
from torch import Tensor

from mmprof.errors import UserError


@runtime_checkable
class StaticDecoder(Protocol):
    """What `GraphDecoder` drives, and what `model.static_decoder(batch, max_len, device)` returns
    for Transformer++ (`transformer.TransformerStaticDecoder`), the fake-quant MatMul-free model
    (`mmfree.MMFreeStaticDecoder`) and the packed one (`packed.PackedStaticDecoder`): its state in
    fixed buffers on the device, so that `step` can be captured in a CUDA graph and replayed."""

    batch: int
    max_len: int

    def prefill(self, prompt_ids: Tensor) -> Tensor:
        """Reset the state, run the prompt [batch, P] eagerly; return its last logits [batch, vocab]."""
        ...

    def step(self, ids: Tensor) -> Tensor:
        """Feed ids [batch] at the next position; return their logits [batch, vocab]. Fixed shapes,
        no host synchronisation (the position, where there is one, lives on the device)."""
        ...

    def rewind(self, position: int) -> None:
        """Make the next step write at `position` (at most the current one), queued on the device
        with no host synchronisation. A KV cache keeps what lies before it and is overwritten after
        it; a recurrent state has no position and is kept (each step costs the same wherever it is),
        so the steps after a rewind cost what the first steps from there cost."""
        ...


def check_room(decoder, batch: int, start: int, tokens: int) -> None:
    """UserError unless `batch` is the decoder's and `tokens` more fit after position `start`."""
    if batch != decoder.batch:
        raise UserError(f"decoder holds {decoder.batch} sequences, got a batch of {batch}")
    if start + tokens > decoder.max_len:
        raise UserError(f"decoding past max_len {decoder.max_len} (at {start} + {tokens})")


class Decoder:
    """Holds the decoding state of `batch` sequences of up to `max_len` tokens."""

    def __init__(self, model: nn.Module, batch: int, max_len: int, device: str | torch.device | None = None):
        self.model, self.batch, self.max_len = model, batch, max_len
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.state = model.init_state(batch, max_len, self.device)
        self.length = 0

    def _run(self, input_ids: Tensor) -> Tensor:
        check_room(self, input_ids.shape[0], self.length, input_ids.shape[1])
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

    def greedy_step(self, next_ids: Tensor) -> Tensor:
        """Feed one token per sequence; return the most likely next ids [B]."""
        return self.step(next_ids).argmax(-1)


class GraphDecoder:
    """The `Decoder` API over a static decoder; on CUDA (`use_graph` None) or with `use_graph=True`
    each step is one CUDA graph replay.

    The graph is captured at the first prefill that leaves room for a step: the static decoder is
    prefilled, stepped a few times on a side stream (warm-up: lazy initialisation, allocator), and
    its step is captured (capture runs nothing) reading a static ids buffer, followed by the greedy
    choice of the next ids (argmax), written back into that buffer. The warm-up steps advanced the
    state, so the prompt is then prefilled again, which resets it. Later prefills reuse the graph:
    the position lives on the device, so a replay continues from wherever prefill left it. `step`
    copies the given ids in and returns the logits as a fresh tensor (a copy of the graph's output
    buffer); `greedy_step` returns the ids buffer itself, and given it back copies nothing: a greedy
    decoding loop is one graph replay per token and no other GPU work.
    """

    WARMUP_STEPS = 3

    def __init__(self, static_decoder: StaticDecoder, use_graph: bool | None = None):
        self.decoder, self.use_graph = static_decoder, use_graph
        self.batch, self.max_len = static_decoder.batch, static_decoder.max_len
        self.length = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._ids: Tensor | None = None
        self._logits: Tensor | None = None

    @torch.inference_mode()
    def prefill(self, input_ids: Tensor) -> Tensor:
        """Start over with the prompt [B, P]; return the logits of its last position [B, vocab]."""
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise UserError(f"a prompt is [batch, length >= 1] token ids, got shape {tuple(input_ids.shape)}")
        check_room(self, input_ids.shape[0], 0, input_ids.shape[1])
        graph = self.use_graph if self.use_graph is not None else input_ids.device.type == "cuda"
        if graph and input_ids.device.type != "cuda":
            raise UserError(f"CUDA graphs need a CUDA device, the prompt is on {input_ids.device}")
        if graph and self.graph is None and input_ids.shape[1] < self.max_len:
            self.decoder.prefill(input_ids)
            self._capture(input_ids.device, min(self.WARMUP_STEPS, self.max_len - input_ids.shape[1]))
        logits = self.decoder.prefill(input_ids)
        self.length = input_ids.shape[1]
        return logits

    def _capture(self, device: torch.device, warmup: int) -> None:
        with torch.cuda.device(device):
            self._ids = torch.zeros(self.batch, dtype=torch.long, device=device)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self.decoder.step(self._ids)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._logits = self.decoder.step(self._ids)
                torch.argmax(self._logits, dim=-1, out=self._ids)  # the greedy next ids, fed back in place
            self.graph = graph

    @torch.inference_mode()
    def step(self, next_ids: Tensor) -> Tensor:
        """Feed one token per sequence ([B] or [B, 1]); return its logits [B, vocab]."""
        ids = self._next_position(next_ids)
        if self.graph is None:
            return self.decoder.step(ids)
        self._replay(ids)
        return self._logits.clone()

    @torch.inference_mode()
    def greedy_step(self, next_ids: Tensor) -> Tensor:
        """Feed one token per sequence; return the most likely next ids [B]. With a graph they are
        its ids buffer, overwritten by the next step: pass it straight back, or clone it to keep it."""
        ids = self._next_position(next_ids)
        if self.graph is None:
            return self.decoder.step(ids).argmax(-1)
        self._replay(ids)
        return self._ids

    def rewind(self, position: int) -> None:
        """Steps continue at `position` (1 <= position <= length) with the state the static decoder
        keeps (its `rewind`); energy windows replay the decode steps of one range back to back."""
        if not 1 <= position <= self.length:
            raise UserError(f"decoder: rewind to {position} outside 1..{self.length}")
        self.decoder.rewind(position)
        self.length = position

    def _next_position(self, next_ids: Tensor) -> Tensor:
        if self.length == 0:
            raise UserError("decoder: step before prefill")
        ids = next_ids.reshape(-1)
        check_room(self, ids.shape[0], self.length, 1)
        self.length += 1
        return ids

    def _replay(self, ids: Tensor) -> None:
        if ids.data_ptr() != self._ids.data_ptr():  # the buffer greedy_step returned holds them already
            self._ids.copy_(ids)
        self.graph.replay()


def make_decoder(
    model: nn.Module, batch: int, max_len: int, device: str | torch.device | None = None, graph: bool | None = None
) -> Decoder | GraphDecoder:
    """A `GraphDecoder` over `model.static_decoder(...)` when the model has one, else a `Decoder`."""
    if hasattr(model, "static_decoder"):
        return GraphDecoder(model.static_decoder(batch, max_len, device), graph)
    return Decoder(model, batch, max_len, device)


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
    decoder = make_decoder(model, batch, prompt_len + new_tokens, prompt_ids.device, graph=False)
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
