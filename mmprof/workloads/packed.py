"""The MatMul-free LM for deployment: every BitLinear's ternary weights packed in 2 bits.

`PackedMMFreeLM.from_model(model)` packs a (fake-quant) `MMFreeLM`; `PackedMMFreeLM(cfg, device)`
makes an empty one for a packed checkpoint to be loaded into. Its buffers are the packed weights
(int32, 16 per word), one fp32 scale per BitLinear, the fp32 norm weights, the per-layer lower bounds
and the embedding table; nothing is kept in bf16 but the embedding.

Two paths, the same function (up to float rounding):

- `prefill(ids, state)`: a prompt [B, T] in chunks through the small-GEMM kernel (`packed_bitlinear`)
  and the MLGRU scan; returns the last position's logits.
- `step(ids, state)`: one token per sequence, four fused W2A8 GEMV launches per layer (`w2a8_gemv`):
  (attn_norm + i/f/g BitLinears + MLGRU gates and state update), (g_norm gate + o_proj + residual),
  (mlp_norm + gate_proj + silu(a) * b), (down_proj + residual); then the final norm and lm_head.
  All shapes are fixed and the state is updated in place, so the step is captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mmprof.kernels.ternary import NORM_EPS, rms_norm
from mmprof.kernels.mlgru_scan import mlgru_gates, mlgru_scan
from mmprof.kernels.norm_gate import rms_norm_silu_gate_ref
from mmprof.kernels.ternary_pack import pack_weight, packed_words
from mmprof.kernels.w2a8_gemm import packed_bitlinear
from mmprof.kernels.w2a8_gemv import DEFAULT_OPTIONS, GemvOptions, row_sums_ref, w2a8_gemv
from mmprof.workloads.mmfree import layer_lower_bounds
from mmprof.workloads.presets import ModelConfig

PREFILL_CHUNK = 256  # prompt tokens per prefill pass: bounds the activations of long prompts


class PackedLinear(nn.Module):
    """`parts` blocks of out_features rows packed into one [parts * out, in/16] tensor: separate
    BitLinears with a norm weight and scale each, or (`shared`) the parts of one BitLinear, which
    share them (gate_proj's a and b halves)."""

    def __init__(self, in_features: int, out_features: int, parts: int = 1, shared: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features, self.parts, self.shared = in_features, out_features, parts, shared
        quantised = 1 if shared else parts
        words = packed_words(in_features)
        self.register_buffer("packed", torch.zeros(parts * out_features, words, dtype=torch.int32, device=device))
        self.register_buffer("w_scale", torch.ones(quantised, device=device))
        self.register_buffer("norm", torch.ones(quantised, in_features, device=device))

    @torch.no_grad()
    def fill(self, bitlinears) -> None:
        """Pack the BitLinears of the parts in order (one BitLinear holding every part if shared)."""
        for p, lin in enumerate(bitlinears):
            packed, scale = pack_weight(lin.weight)
            rows = packed.shape[0]
            self.packed[p * rows : (p + 1) * rows] = packed
            self.w_scale[p] = scale
            self.norm[p] = lin.norm.weight.float()

    def prefill(self, x: Tensor, part: int = 0) -> Tensor:
        """BitLinear `part` on rows of any count (fp32 out); if shared, the one BitLinear, all parts."""
        rows = self.packed if self.shared else self.packed[part * self.out_features : (part + 1) * self.out_features]
        p = 0 if self.shared else part
        return packed_bitlinear(x, self.norm[p], rows, self.w_scale[p], self.in_features,
                                eps=NORM_EPS, out_dtype=torch.float32)  # fmt: skip


class PackedBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        d, inter = cfg.hidden_size, cfg.intermediate_size
        self.eps = cfg.rms_norm_eps
        self.register_buffer("attn_norm", torch.ones(d, device=device))
        self.register_buffer("mlp_norm", torch.ones(d, device=device))
        self.register_buffer("g_norm", torch.ones(d, device=device))
        self.ifg = PackedLinear(d, d, 3, device=device)
        self.o_proj = PackedLinear(d, d, device=device)
        self.gate_proj = PackedLinear(d, inter, 2, shared=True, device=device)  # a and b halves of one BitLinear
        self.down_proj = PackedLinear(inter, d, device=device)

    @torch.no_grad()
    def fill(self, block) -> None:
        attn, mlp = block.attn, block.mlp
        self.attn_norm.copy_(block.attn_norm.weight)
        self.mlp_norm.copy_(block.mlp_norm.weight)
        self.g_norm.copy_(attn.g_norm.weight)
        self.ifg.fill([attn.i_proj, attn.f_proj, attn.g_proj])
        self.o_proj.fill([attn.o_proj])
        self.gate_proj.fill([mlp.gate_proj])
        self.down_proj.fill([mlp.down_proj])

    def prefill(self, x: Tensor, lower_bound: Tensor | None, state: Tensor) -> Tensor:
        h = rms_norm(x, self.attn_norm, self.eps)
        i_pre, f_pre, g_pre = (self.ifg.prefill(h, p) for p in range(3))
        f, i = mlgru_gates(f_pre, i_pre, lower_bound)
        c, final = mlgru_scan(f, i, state)
        state.copy_(final)
        x = x + self.o_proj.prefill(rms_norm_silu_gate_ref(g_pre, c, self.g_norm, self.eps))
        a, b = self.gate_proj.prefill(rms_norm(x, self.mlp_norm, self.eps)).chunk(2, dim=-1)
        return x + self.down_proj.prefill(F.silu(a) * b)

    def step(self, x: Tensor, lower_bound: Tensor | None, state: Tensor, sums: Tensor, x_sums: Tensor | None,
             reader: tuple, options: GemvOptions = DEFAULT_OPTIONS) -> Tensor:  # fmt: skip
        """One token: x [B, d] -> the next residual [B, d]. sums [4, B, 5] are zeroed buffers for the
        row statistics of the o_proj, down_proj and next inputs, summed by the launch writing each
        (`w2a8_gemv`'s next_sums); x_sums are x's (None: computed here); reader is (norm weights,
        pre-norm weight) of the launch that reads this layer's output; options: the GEMVs' launches."""
        ifg, o, gate, down = self.ifg, self.o_proj, self.gate_proj, self.down_proj
        # each launch's residual (x, x2) and state were written two or more launches back: settled
        g, gate_in = w2a8_gemv(x, ifg.norm, ifg.packed, ifg.w_scale, parts=3, pre_weight=self.attn_norm,
                               pre_eps=self.eps, epilogue="mlgru", state=state, lower_bound=lower_bound,
                               gate_weight=self.g_norm, sums=x_sums, next_sums=(sums[0], o.norm, "gate"),
                               settled=True, options=options)  # fmt: skip
        x2 = w2a8_gemv(g, o.norm, o.packed, o.w_scale, pre_weight=gate_in, pre_eps=self.eps, epilogue="residual",
                       residual=x, sums=sums[0], next_sums=(sums[1], gate.norm, self.mlp_norm),
                       settled=True, options=options)  # fmt: skip
        z = w2a8_gemv(x2, gate.norm, gate.packed, gate.w_scale, parts=2, shared_quant=True,
                      pre_weight=self.mlp_norm, pre_eps=self.eps, epilogue="glu", sums=sums[1],
                      next_sums=(sums[2], down.norm, None), options=options)  # fmt: skip
        return w2a8_gemv(z, down.norm, down.packed, down.w_scale, epilogue="residual", residual=x2, sums=sums[2],
                         next_sums=(sums[3], *reader), settled=True, options=options)  # fmt: skip


class PackedMMFreeLM(nn.Module):
    arch = "mmfree"
    weights = "packed"

    def __init__(self, cfg: ModelConfig, device=None, embed_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.embeddings = nn.Embedding(cfg.vocab_size, d, device=device, dtype=embed_dtype)
        self.embeddings.weight.requires_grad_(False)
        self.layers = nn.ModuleList(PackedBlock(cfg, device) for _ in range(cfg.num_layers))
        self.register_buffer("lower_bounds", torch.zeros(cfg.num_layers, d, device=device))
        self.register_buffer("norm", torch.ones(d, device=device))
        self.lm_head = PackedLinear(d, cfg.vocab_size, device=device)
        self.gemv_options = DEFAULT_OPTIONS  # how step's W2A8 GEMVs launch (`GemvOptions`)

    @classmethod
    @torch.no_grad()
    def from_model(cls, model) -> "PackedMMFreeLM":
        """Pack an MMFreeLM on its own device; the embedding keeps the model's dtype."""
        body = model.model
        weight = body.embeddings.weight
        packed = cls(model.config, weight.device, weight.dtype)
        packed.embeddings.weight.copy_(weight)
        for mine, block in zip(packed.layers, body.layers):
            mine.fill(block)
        if model.config.use_lower_bound:
            packed.lower_bounds.copy_(layer_lower_bounds(body.lower_bounds))
        packed.norm.copy_(body.norm.weight)
        packed.lm_head.fill([model.lm_head])
        return packed

    def _bound(self, n: int) -> Tensor | None:
        return self.lower_bounds[n] if n > 0 and self.config.use_lower_bound else None

    @torch.inference_mode()
    def prefill(self, input_ids: Tensor, state: Tensor) -> Tensor:
        """Prompt [B, T] -> last-position logits [B, vocab] fp32; state [layers, B, d] is updated."""
        for start in range(0, input_ids.shape[1], PREFILL_CHUNK):
            x = self.embeddings(input_ids[:, start : start + PREFILL_CHUNK]).float()
            for n, layer in enumerate(self.layers):
                x = layer.prefill(x, self._bound(n), state[n])
        head = self.lm_head
        return head.prefill(rms_norm(x[:, -1], self.norm, self.config.rms_norm_eps))

    @torch.inference_mode()
    def token_sums(self, rows_per_pass: int = 1024) -> Tensor:
        """[vocab, 5] fp32: the row statistics (`row_sums_ref`) of every embedding row as layer 0's
        first launch quantises it, so a step can look its input's up instead of summing it."""
        first = self.layers[0]
        table = self.embeddings.weight
        return torch.cat([row_sums_ref(table[i : i + rows_per_pass].float(), first.ifg.norm, first.attn_norm)
                          for i in range(0, table.shape[0], rows_per_pass)])  # fmt: skip

    @torch.inference_mode()
    def step(self, ids: Tensor, state: Tensor, token_sums: Tensor | None = None) -> Tensor:
        """ids [B] -> logits [B, vocab] fp32; state [layers, B, d] fp32 is updated in place.
        token_sums: `token_sums()` (None: layer 0 sums its input itself)."""
        x = self.embeddings(ids).float()
        layers, head = self.layers, self.lm_head
        sums = x.new_zeros(len(layers), 4, x.shape[0], 5)
        x_sums = token_sums[ids] if token_sums is not None else None
        for n, layer in enumerate(layers):
            reader = (layers[n + 1].ifg.norm, layers[n + 1].attn_norm) if n + 1 < len(layers) else (head.norm, self.norm)
            x = layer.step(x, self._bound(n), state[n], sums[n], x_sums, reader, self.gemv_options)
            x_sums = sums[n, 3]
        return w2a8_gemv(x, head.norm, head.packed, head.w_scale, pre_weight=self.norm,
                         pre_eps=self.config.rms_norm_eps, sums=x_sums, options=self.gemv_options)  # fmt: skip

    def init_state(self, batch: int, max_len: int | None = None, device=None) -> Tensor:
        device = device if device is not None else self.norm.device
        return torch.zeros(self.config.num_layers, batch, self.config.hidden_size, device=device)

    def static_decoder(self, batch: int, max_len: int, device=None) -> "PackedStaticDecoder":
        return PackedStaticDecoder(self, batch, max_len, device)

    def num_params(self) -> int:
        """Weights the packed tensors stand for (as the unpacked model counts them)."""
        cfg = self.config
        d, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
        per_layer = 4 * d * d + 3 * d * inter + 8 * d + inter  # projections, then norms
        return 2 * cfg.vocab_size * d + layers * (per_layer + d) + 2 * d  # + lower bounds, final/head norms


class PackedStaticDecoder:
    """The static-decoder protocol of `workloads.decode` for the packed model: a fixed state buffer,
    and the embedding rows' statistics for layer 0 (`token_sums`, 20 bytes per vocabulary entry)."""

    def __init__(self, model: PackedMMFreeLM, batch: int, max_len: int, device=None):
        self.model, self.batch, self.max_len = model, batch, max_len
        self.state = model.init_state(batch, max_len, device)
        self.token_sums = model.token_sums().to(self.state.device)

    def prefill(self, prompt_ids: Tensor) -> Tensor:
        self.state.zero_()
        return self.model.prefill(prompt_ids, self.state)

    def step(self, ids: Tensor) -> Tensor:
        return self.model.step(ids.reshape(self.batch), self.state, self.token_sums)

    def rewind(self, position: int) -> None:
        """The recurrent state has no position: kept as it is (see StaticDecoder.rewind)."""
