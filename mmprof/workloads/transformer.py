"""Transformer++ (Llama-2 style): pre-norm RMSNorm, rotary embeddings, SDPA attention with a
preallocated KV cache, SwiGLU MLP, untied lm_head. Parameter names as Hugging Face's Llama.

`TransformerLM.static_decoder` gives the decoding baseline: a static KV cache, the position in a
device tensor and one-token steps that a CUDA graph can capture (see `TransformerStaticDecoder`)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mmprof.errors import UserError
from mmprof.workloads.layers import ModelOutput, RMSNorm, apply_rotary, lm_loss, rotary_cos_sin
from mmprof.workloads.presets import ModelConfig

def _decode_blocks(hidden_size: int) -> dict:
    """Launch shapes of the Triton step's products (kernels.bf16_decode.GemvBlocks by product): for
    the 1.3b, 2.7b and 13b presets (by hidden size) the fastest of scripts/bench_tf_decode.py's sweep
    on an H200 (results/h200/decode-power/20261203-tfdecode-6d51098/bench.txt), else one default."""
    from mmprof.kernels.bf16_decode import GemvBlocks as B

    tuned = {
        2048: {"qkv": B(32, 512, 8), "o_proj": B(16, 512), "gate_up": B(32, 256), "down_proj": B(4, 1024),
               "lm_head": B(32, 256)},
        2560: {"qkv": B(8, 512), "o_proj": B(16, 1024, 8, 3), "gate_up": B(16, 512), "down_proj": B(16, 512),
               "lm_head": B(32, 512, 8)},
        5120: {"qkv": B(32, 256), "o_proj": B(16, 512), "gate_up": B(8, 512), "down_proj": B(16, 512),
               "lm_head": B(32, 256)},
    }
    default = {"qkv": B(16, 512), "o_proj": B(8, 512), "gate_up": B(16, 512, 8), "down_proj": B(8, 512),
               "lm_head": B(16, 512)}
    return dict(tuned.get(hidden_size, default))


# hidden sizes whose Triton step launches its kernels dependent (programmatic dependent launch, where
# the GPU has it): only where that measured faster on an H200 (results/h200/session13-20261204/bed2c6c/
# tf.log: 1.3b 704.5 -> 758.3 tokens/s; 2.7b 415.6 -> 394.4 and 13b 130.2 -> 125.3 were slower with it)
_DEPENDENT_LAUNCH_HIDDEN = frozenset({2048})

# SDPA takes keys/values with fewer heads than the queries (`enable_gqa`) from torch 2.5 on
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


class KVCache:
    """Keys and values of every layer, preallocated to max_len: k, v [layers, B, kv_heads, max_len, head_dim]
    (kv[0] and kv[1] of one buffer)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype: torch.dtype):
        shape = (cfg.num_layers, batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.kv = torch.zeros((2, *shape), device=device, dtype=dtype)  # one buffer: one write for both
        self.k, self.v = self.kv[0], self.kv[1]
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this call's keys/values at [length, length+T); return all of them so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise UserError(f"KV cache full: {end} tokens do not fit in max_len {self.max_len}")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def _attention_mask(start: int, steps: int, device) -> Tensor:
    """Boolean [steps, start+steps]: query at position start+t sees keys at positions <= start+t."""
    keys = torch.arange(start + steps, device=device)
    queries = torch.arange(start, start + steps, device=device)
    return keys[None, :] <= queries[:, None]


def _attend(q: Tensor, k: Tensor, v: Tensor, causal: bool, mask: Tensor | None = None) -> Tensor:
    """SDPA; keys/values may have fewer heads than q (grouped-query attention, no copies from torch
    2.5 on). On meta tensors (memory estimates) the flash kernel's meta function is used when it
    applies, so the saved tensors are those of a GPU run rather than of the math fallback, which
    would keep the whole [B, H, T, T] attention matrix."""
    grouped = k.shape[1] != q.shape[1]
    if grouped and not _SDPA_GQA:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        grouped = False
    if q.device.type == "meta" and mask is None:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)[0]
    gqa = {"enable_gqa": True} if grouped else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, **gqa)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, hd
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, layer: int) -> Tensor:
        batch, steps, _ = x.shape
        q = self.q_proj(x).view(batch, steps, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, steps, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, steps, self.kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos.to(q.dtype), sin.to(q.dtype))
        k = apply_rotary(k, cos.to(k.dtype), sin.to(k.dtype))
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.update(layer, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        if steps == 1:
            o = _attend(q, k, v, causal=False)
        elif start == 0:
            o = _attend(q, k, v, causal=True)
        else:
            o = _attend(q, k, v, causal=False, mask=_attention_mask(start, steps, x.device))
        return self.o_proj(o.transpose(1, 2).reshape(batch, steps, self.heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, layer: int) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class TransformerBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class TransformerLM(nn.Module):
    """`model(input_ids, labels=None, state=None) -> ModelOutput`; state: a KVCache (or None)."""

    arch = "transformer"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = TransformerBackbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share lm_head's weight with the embedding when the config ties them (again after to_empty)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(self, input_ids: Tensor, state: KVCache | None = None) -> Tensor:
        """The last block's output [B, T, d] (before the final norm); the cache advances by T."""
        start = state.length if state is not None else 0
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, torch.float32)
        x = self.model.embed_tokens(input_ids)
        for n, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, state, n)
        if state is not None:
            state.length += input_ids.shape[1]
        return x

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, state: KVCache | None = None) -> ModelOutput:
        logits = self.lm_head(self.model.norm(self.hidden_states(input_ids, state)))
        loss = lm_loss(logits, labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss, state=state)

    def init_state(self, batch: int, max_len: int, device=None) -> KVCache:
        weight = self.model.embed_tokens.weight
        return KVCache(self.config, batch, max_len, device if device is not None else weight.device, weight.dtype)

    def static_decoder(self, batch: int, max_len: int, device=None, backend: str = "auto") -> "TransformerStaticDecoder":
        """Graph-capturable decoding state for `batch` sequences of up to `max_len` tokens; backend
        of its steps as `TransformerStaticDecoder` says."""
        return TransformerStaticDecoder(self, batch, max_len, device, backend)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _norm(x: Tensor, norm: RMSNorm) -> Tensor:
    """RMSNorm as one fused kernel where torch has one (the math of `layers.RMSNorm`)."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)


def _fused_weight(owner: nn.Module, names: tuple[str, ...]) -> Tensor:
    """One weight [sum of out, in] over the Linear layers `owner.<names>`, so that one product gives
    all their outputs. The first call moves their parameters into row blocks of one new buffer (the
    `.data` is re-pointed: names, values and bytes stay); later calls find them there already."""
    weights = [getattr(owner, name).weight for name in names]
    first, cols = weights[0], weights[0].shape[1]
    starts = [sum(w.shape[0] for w in weights[:i]) for i in range(len(weights))]

    def laid_out() -> bool:
        return all(w.is_contiguous() and w.dtype == first.dtype
                   and w.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
                   and w.data_ptr() == first.data_ptr() + start * cols * w.element_size()
                   for w, start in zip(weights, starts))  # fmt: skip

    if not laid_out():
        with torch.inference_mode(False), torch.no_grad():
            fused = torch.cat([w.detach() for w in weights])
            for w, start in zip(weights, starts):
                w.data = fused[start : start + w.shape[0]]
    return first.detach().as_strided((sum(w.shape[0] for w in weights), cols), (cols, 1))


class TransformerStaticDecoder:
    """Decoding state of a TransformerLM in fixed buffers, for `workloads.decode.GraphDecoder`.

    `cache`: a KVCache [layers, B, kv_heads, max_len, head_dim] in the weights' dtype. `pos` [1]
    (long, on the device): the position the next step writes. `prefill` runs the prompt through the
    model's forward into the cache (eagerly); `step` appends one token per sequence with only
    fixed-shape, sync-free device work, so one CUDA graph replays every step: rotary cos/sin rows
    looked up at `pos` from tables made once, k and v written at `pos` by one `index_copy_`,
    attention over the whole cache with an additive mask (0 where key <= pos, -inf after) made once
    per step, `pos += 1` in place. A one-token query needs no causal mask, so SDPA's fused kernels
    run it (on an H200 SDPA picks cuDNN's, faster there than the memory-efficient one or the math
    path); grouped-query heads attend as G query rows of their shared kv head (no cache copies).
    At 1-token decoding the weights' reads are the cost, so each layer's q/k/v and gate/up weights
    are laid out as one matrix each (`_fused_weight`): one product instead of three and two.

    backend "auto" steps a batch of 1 on CUDA with the Triton kernels of `kernels.bf16_decode`
    (five launches a layer: norm+qkv+rotary+cache write, attention over positions 0..pos only,
    o_proj into the residual, norm+gate/up+SiLU-GLU, down_proj into the residual); other batches,
    CPU tensors and "torch" run the PyTorch step above. "triton" asks for the kernels (on a CPU
    only under TRITON_INTERPRET=1). `blocks` (name -> GemvBlocks) sets their launch shapes, `pdl`
    whether they launch as programmatic dependent launches (on for the presets where it measured faster).
    "compile" runs the PyTorch step through torch.compile (COMPILE_MODE; compiled at the first
    step, which GraphDecoder's warm-up takes before it captures), at any batch.
    """

    COMPILE_MODE = "max-autotune-no-cudagraphs"

    def __init__(self, model: TransformerLM, batch: int, max_len: int, device=None, backend: str = "auto"):
        weight = model.model.embed_tokens.weight
        device = torch.device(device) if device is not None else weight.device
        cfg, dtype = model.config, weight.dtype
        self.model, self.batch, self.max_len, self.device = model, batch, max_len, device
        self.cache = KVCache(cfg, batch, max_len, device, dtype)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        layers = model.model.layers
        self.qkv = [_fused_weight(layer.self_attn, ("q_proj", "k_proj", "v_proj")) for layer in layers]
        self.gate_up = [_fused_weight(layer.mlp, ("gate_proj", "up_proj")) for layer in layers]
        cos, sin = rotary_cos_sin(torch.arange(max_len, device=device), cfg.head_dim, cfg.rope_theta, torch.float32)
        half = cfg.head_dim // 2
        # rotate_half(x) * sin == roll(x, half) * [-sin, sin] (halves): one roll instead of neg + cat
        self.cos = cos.to(dtype)
        self.sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).to(dtype)
        # the mask's row is padded to 8 elements, the alignment SDPA's fused kernels want for a mask
        self.keys = torch.arange(-(-max_len // 8) * 8, device=device)
        self.zero = torch.zeros((), dtype=dtype, device=device)
        self.neg_inf = torch.full((), float("-inf"), dtype=dtype, device=device)
        self.backend = _step_backend(backend, cfg, batch, device)
        if self.backend == "compile":
            # gpt-fast's way: inductor's kernels (autotuned, its own CUDA graphs off) inside our graph
            self._compiled_step = torch.compile(self._torch_step, mode=self.COMPILE_MODE, dynamic=False)
        if self.backend == "triton":
            self.cos_half, self.sin_half = cos[:, :half].to(dtype).contiguous(), sin[:, :half].to(dtype).contiguous()
            self.q = torch.empty(cfg.num_heads * cfg.head_dim, device=device, dtype=dtype)
            self.attn_out = torch.empty_like(self.q)
            self.glu_out = torch.empty(cfg.intermediate_size, device=device, dtype=dtype)
            self.blocks = _decode_blocks(cfg.hidden_size)
            self.attend_block = 64  # keys per step of the attention kernel's loop
            # programmatic dependent launch between the step's kernels (Hopper on; see bf16_decode)
            self.pdl = cfg.hidden_size in _DEPENDENT_LAUNCH_HIDDEN

    @torch.inference_mode()
    def prefill(self, prompt_ids: Tensor) -> Tensor:
        """Reset, run the prompt [B, P], leave `pos` at P; return the last position's logits [B, vocab]."""
        batch, steps = prompt_ids.shape
        if batch != self.batch or not 1 <= steps <= self.max_len:
            raise UserError(
                f"static decoder holds {self.batch} x {self.max_len} tokens, got a prompt of {batch} x {steps}"
            )
        self.cache.length = 0
        x = self.model.hidden_states(prompt_ids, self.cache)
        self.pos.fill_(steps)
        return self.model.lm_head(self.model.model.norm(x[:, -1]))

    def rewind(self, position: int) -> None:
        """The next step writes at `position`: `pos` is set on the device (no host sync); the cache
        before it is kept, after it overwritten by the steps that follow."""
        self.pos.fill_(position)

    @torch.inference_mode()
    def step(self, ids: Tensor) -> Tensor:
        """ids [B] at position `pos` -> logits [B, vocab]; `pos` advances. Never past max_len: not checked."""
        if self.backend == "triton":
            return self._triton_step(ids)
        if self.backend == "compile":
            return self._compiled_step(ids)
        return self._torch_step(ids)

    def _torch_step(self, ids: Tensor) -> Tensor:
        """The PyTorch step (see the class docstring)."""
        cfg, cache, pos, batch = self.model.config, self.cache, self.pos, self.batch
        heads, kv_heads, hd = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)  # [1, hd]
        mask = torch.where(self.keys <= pos, self.zero, self.neg_inf)[None, None, None, :]
        mask = mask[..., : self.max_len]
        x = self.model.model.embed_tokens(ids.reshape(batch))  # [B, d]
        for n, layer in enumerate(self.model.model.layers):
            h = _norm(x, layer.input_layernorm)
            qkv = F.linear(h, self.qkv[n]).view(batch, heads + 2 * kv_heads, hd)
            qk = qkv[:, : heads + kv_heads]
            torch.addcmul(qk * cos, qk.roll(hd // 2, dims=-1), sin, out=qk)  # rotary, in place
            kv = qkv[:, heads:].unflatten(1, (2, kv_heads)).transpose(0, 1).unsqueeze(3)  # [2, B, kv, 1, hd]
            cache.kv[:, n].index_copy_(3, pos, kv)
            q = qkv[:, :heads].unflatten(1, (kv_heads, heads // kv_heads))  # [B, kv, G, hd]
            o = F.scaled_dot_product_attention(q, cache.k[n], cache.v[n], attn_mask=mask)
            x.addmm_(o.reshape(batch, heads * hd), layer.self_attn.o_proj.weight.t())
            gate, up = F.linear(_norm(x, layer.post_attention_layernorm), self.gate_up[n]).chunk(2, dim=-1)
            x.addmm_(F.silu(gate).mul_(up), layer.mlp.down_proj.weight.t())
        pos.add_(1)
        return self.model.lm_head(_norm(x, self.model.model.norm))

    def _triton_step(self, ids: Tensor) -> Tensor:
        """The batch-1 step in five Triton launches a layer (see the class docstring)."""
        from mmprof.kernels import bf16_decode as k

        cache, pos, heads, blocks, pdl = self.cache, self.pos, self.model.config.num_heads, self.blocks, self.pdl
        x = self.model.model.embed_tokens(ids.reshape(1))[0]  # [d], the residual row, updated in place
        for n, layer in enumerate(self.model.model.layers):
            ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
            k_cache, v_cache = cache.k[n, 0], cache.v[n, 0]
            k.norm_qkv_rope(x, ln1.weight, ln1.eps, self.qkv[n], self.cos_half, self.sin_half, pos,
                            self.q, k_cache, v_cache, heads, blocks["qkv"], pdl)
            k.attend(self.q, k_cache, v_cache, pos, self.attn_out, self.attend_block, pdl)
            k.gemv(self.attn_out, layer.self_attn.o_proj.weight, x, residual=True, blocks=blocks["o_proj"], pdl=pdl)
            k.gemv(x, self.gate_up[n], self.glu_out, norm=ln2.weight, eps=ln2.eps, glu=True, blocks=blocks["gate_up"],
                   pdl=pdl)
            k.gemv(self.glu_out, layer.mlp.down_proj.weight, x, residual=True, blocks=blocks["down_proj"], pdl=pdl)
        final = self.model.model.norm
        logits = k.gemv(x, self.model.lm_head.weight, norm=final.weight, eps=final.eps, blocks=blocks["lm_head"],
                        pdl=pdl)
        pos.add_(1)  # after lm_head, which does not read it: the last down_proj and lm_head launch back to back
        return logits[None]


def _step_backend(backend: str, cfg: ModelConfig, batch: int, device: torch.device) -> str:
    """"triton" where the batch-1 kernels apply and are asked for (or "auto" on CUDA), else "torch"."""
    if backend not in ("auto", "triton", "torch", "compile"):
        raise UserError(f"static decoder backend must be auto, triton, torch or compile, got {backend!r}")
    if backend == "compile":
        return "compile"
    hd = cfg.head_dim
    fits = batch == 1 and hd >= 2 and hd & (hd - 1) == 0
    if backend == "torch" or (backend == "auto" and (device.type != "cuda" or not fits)):
        return "torch"
    if not fits:
        raise UserError(f"the Triton decode step needs batch 1 and a power-of-two head_dim, got {batch} and {hd}")
    if device.type != "cuda":
        from mmprof.kernels._triton_util import interpreting

        if not interpreting():
            raise UserError("the Triton decode step needs a CUDA device, or TRITON_INTERPRET=1 on a CPU")
    return "triton"
