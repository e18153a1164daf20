"""Both models written again from their definitions (DESIGN.md, Hugging Face Llama), straight from a
state dict, with no code shared with mmprof: the oracle for the model tests. fp32, no cache."""

import math

import torch
import torch.nn.functional as F


def rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


# BitLinear's norm eps in the reference: its published model class (FusedBitLinear) runs its fused op
# with that op's default 1e-6; the unfused class (ops/bitnet.py BitLinear) uses its RMSNorm's 1e-8.
PUBLISHED_BITLINEAR_EPS = 1e-6
UNFUSED_BITLINEAR_EPS = 1e-8


def bitlinear(x, weight, norm_weight, eps=PUBLISHED_BITLINEAR_EPS):
    xn = rms(x, norm_weight, eps)
    scale = 127 / xn.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    xq = (xn * scale).round().clamp(-128, 127) / scale
    beta = weight.abs().mean().clamp(min=1e-5)
    wq = (weight * (1 / beta)).round().clamp(-1, 1) * beta
    return xq @ wq.t()


def mmfree_logits(sd, cfg, ids, bitlinear_eps=PUBLISHED_BITLINEAR_EPS):
    x = sd["model.embeddings.weight"][ids]
    s = sd["model.lower_bounds"].softmax(0)
    bounds = s.cumsum(0) - s[0]
    eps = cfg.rms_norm_eps
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."

        def bl(name, inp):
            return bitlinear(inp, sd[p + name + ".weight"], sd[p + name + ".norm.weight"], bitlinear_eps)

        h = rms(x, sd[p + "attn_norm.weight"], eps)
        f = torch.sigmoid(bl("attn.f_proj", h))
        if n > 0:
            f = bounds[n] + (1 - bounds[n]) * f
        i = F.silu(bl("attn.i_proj", h)) * (1 - f)
        c = torch.zeros_like(f[:, 0])
        states = []
        for t in range(ids.shape[1]):
            c = f[:, t] * c + i[:, t]
            states.append(c)
        c = torch.stack(states, 1)
        o = rms(bl("attn.g_proj", h), sd[p + "attn.g_norm.weight"], eps) * F.silu(c)
        x = x + bl("attn.o_proj", o)
        a, b = bl("mlp.gate_proj", rms(x, sd[p + "mlp_norm.weight"], eps)).chunk(2, -1)
        x = x + bl("mlp.down_proj", F.silu(a) * b)
    head_in = rms(x, sd["model.norm.weight"], eps)
    return bitlinear(head_in, sd["lm_head.weight"], sd["lm_head.norm.weight"], bitlinear_eps)


def _rope(x, theta):
    steps, dim = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    freqs = torch.arange(steps, dtype=torch.float32)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), -1)
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return x * emb.cos() + torch.cat((-x2, x1), -1) * emb.sin()


def transformer_logits(sd, cfg, ids):
    batch, steps = ids.shape
    heads, hd, eps = cfg.num_heads, cfg.head_dim, cfg.rms_norm_eps
    kv_heads = cfg.num_kv_heads or heads  # grouped-query attention: each kv head serves heads // kv_heads
    x = sd["model.embed_tokens.weight"][ids]
    causal = torch.ones(steps, steps, dtype=torch.bool).tril()
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        h = rms(x, sd[p + "input_layernorm.weight"], eps)

        def proj(name, n_heads):
            out = (h @ sd[p + f"self_attn.{name}.weight"].t()).view(batch, steps, n_heads, hd).transpose(1, 2)
            return out.repeat_interleave(heads // n_heads, dim=1)

        q = _rope(proj("q_proj", heads), cfg.rope_theta)
        k, v = _rope(proj("k_proj", kv_heads), cfg.rope_theta), proj("v_proj", kv_heads)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + attn.transpose(1, 2).reshape(batch, steps, -1) @ sd[p + "self_attn.o_proj.weight"].t()
        h = rms(x, sd[p + "post_attention_layernorm.weight"], eps)
        gate = F.silu(h @ sd[p + "mlp.gate_proj.weight"].t()) * (h @ sd[p + "mlp.up_proj.weight"].t())
        x = x + gate @ sd[p + "mlp.down_proj.weight"].t()
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])  # tied: the embedding table
    return rms(x, sd["model.norm.weight"], eps) @ head.t()
