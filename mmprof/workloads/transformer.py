"""Transformer++ (Llama-2 style): pre-norm RMSNorm, rotary embeddings, SDPA attention with a
preallocated KV cache, SwiGLU MLP, untied lm_head. Parameter names as Hugging Face's Llama."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mmprof.errors import UserError
from mmprof.workloads.layers import ModelOutput, RMSNorm, apply_rotary, lm_loss, rotary_cos_sin
from mmprof.workloads.presets import ModelConfig


class KVCache:
    """Keys and values of every layer, preallocated to max_len: k, v [layers, B, kv_heads, max_len, head_dim]."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype: torch.dtype):
        shape = (cfg.num_layers, batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
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
    """SDPA. On meta tensors (memory estimates) the flash kernel's meta function is used when it
    applies, so the saved tensors are those of a GPU run rather than of the math fallback, which
    would keep the whole [B, H, T, T] attention matrix."""
    if q.device.type == "meta" and mask is None:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


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
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
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

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, state: KVCache | None = None) -> ModelOutput:
        start = state.length if state is not None else 0
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, torch.float32)
        x = self.model.embed_tokens(input_ids)
        for n, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, state, n)
        if state is not None:
            state.length += input_ids.shape[1]
        logits = self.lm_head(self.model.norm(x))
        loss = lm_loss(logits, labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss, state=state)

    def init_state(self, batch: int, max_len: int, device=None) -> KVCache:
        weight = self.model.embed_tokens.weight
        return KVCache(self.config, batch, max_len, device if device is not None else weight.device, weight.dtype)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
