"""The MatMul-free LM ("HGRNBit" in the reference code), parameter names as its checkpoints.

Per block (residual stream x):  h = attn_norm(x);  x = x + MLGRU(h);  x = x + GLU(mlp_norm(x)).
MLGRU:  f = sigmoid(f_proj h), raised by the layer's lower bound for layers > 0;
        i = silu(i_proj h) * (1 - f);  c_t = f_t c_{t-1} + i_t;  o_proj(RMSNorm(g_proj h) * w_g * silu(c)).
GLU:    a, b = split(gate_proj h);  down_proj(silu(a) * b).
Every projection, lm_head included, is a ternary BitLinear; the embedding is a plain table.

Three paths compute the same function, chosen by the config's `bitlinear` field:
- `naive` runs every op one by one in plain PyTorch, autograd keeping what it keeps (the textbook cost).
- `vanilla` and `ref-fused` are the reference model as shipped (`forward_reference`): its fused
  RMSNorms keeping input and rstd, the gate arithmetic as separate ops, a SiLU-multiply keeping its
  two inputs, the recurrence keeping f and its output, the fused RMSNorm-SiLU output gate and a
  cross-entropy over the logits that writes its gradient into them (`kernels/reference_ops.py`);
  only the BitLinear differs: the reference's unfused class (`vanilla`, the paper's baseline) or
  its FusedBitLinear (`ref-fused`).
  While training on CUDA these ops run fused bodies saving the same tensors (torch.compile'd
  arithmetic, a Triton scan), as the reference's Triton kernels do; MMPROF_REFERENCE_FAST=0 turns
  them off.
- `fused` folds each BitLinear's preceding elementwise op
into its input pass (`bitlinear_prologue`: attn_norm into i/f/g_proj, the residual add and mlp_norm
into gate_proj, silu(a) * b into down_proj, the output gate into o_proj), runs the recurrence with
the gates computed inside the kernel (`mlgru`) and the loss as a chunked cross-entropy through the
ternary lm_head that never holds the logits. Per token and layer it keeps for backward only the
residual x (fp32), the i/f/g pre-activations, the MLGRU output, the o_proj output and gate_proj's
output; everything else is recomputed.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mmprof.kernels.bitlinear import BitLinear
from mmprof.kernels.ternary import matmul_dtype
from mmprof.kernels.bitlinear_prologue import bitlinear_prologue, quantized_input, ternary_weight
from mmprof.kernels.cross_entropy import cross_entropy_inplace, linear_cross_entropy
from mmprof.kernels.mlgru import mlgru
from mmprof.kernels.mlgru_scan import mlgru_gates, mlgru_scan
from mmprof.kernels.norm_gate import rms_norm_silu_gate, rms_norm_silu_gate_ref
from mmprof.kernels.reference_ops import rms_norm_keep_input, swiglu
from mmprof.workloads.layers import IGNORE_INDEX, ModelOutput, RMSNorm, lm_loss, next_token_targets
from mmprof.workloads.presets import ModelConfig


def layer_lower_bounds(lower_bounds: Tensor) -> Tensor:
    """[layers, d] parameter -> per-layer lower bounds: cumsum(softmax over layers) minus row 0."""
    s = lower_bounds.float().softmax(0)
    return s.cumsum(0) - s[0]


REFERENCE_BODY = ("vanilla", "ref-fused")  # implementations run through `forward_reference`


def bit_linear(cfg: ModelConfig, in_features: int, out_features: int) -> BitLinear:
    """A BitLinear of the config's implementation and norm eps."""
    return BitLinear(in_features, out_features, cfg.bitlinear, cfg.bitlinear_norm_eps)


class MLGRU(nn.Module):
    """The token mixer (`attn` in the reference names)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        d = cfg.hidden_size
        self.layer_idx = layer_idx
        self.i_proj = bit_linear(cfg, d, d)
        self.f_proj = bit_linear(cfg, d, d)
        self.g_proj = bit_linear(cfg, d, d)
        self.g_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.o_proj = bit_linear(cfg, d, d)

    def forward(self, h: Tensor, lower_bound: Tensor | None, state: Tensor | None) -> tuple[Tensor, Tensor]:
        lb = lower_bound if self.layer_idx > 0 else None
        f, i = mlgru_gates(self.f_proj(h), self.i_proj(h), lb)
        c, final_state = mlgru_scan(f, i, state)
        o = rms_norm_silu_gate_ref(self.g_proj(h), c, self.g_norm.weight, self.g_norm.eps)
        return self.o_proj(o), final_state

    def forward_reference(self, h: Tensor, lower_bound: Tensor | None, state: Tensor | None) -> tuple[Tensor, Tensor]:
        """As the reference's HGRNBitAttention: the gates as separate ops (for layers > 0 the fp32
        lower bound makes f, 1 - f and the recurrence fp32, as there), silu(i) * (1 - f) keeping its
        inputs, the recurrence keeping f and its output, the fused norm-gate keeping g_proj's output,
        the recurrence's output and rstd."""
        i = self.i_proj(h)
        f = self.f_proj(h).sigmoid()
        if lower_bound is not None and self.layer_idx > 0:
            f = lower_bound + (1 - lower_bound) * f
        i = swiglu(i, 1 - f)
        c, final_state = mlgru_scan(f, i, state)
        o = rms_norm_silu_gate(self.g_proj(h), c, self.g_norm.weight, self.g_norm.eps)
        return self.o_proj(o), final_state

    def forward_fused(
        self, x: Tensor, norm: RMSNorm, lower_bound: Tensor | None, state: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """The same on the residual stream x, with `norm` (attn_norm) folded into the projections."""
        projs = (self.i_proj, self.f_proj, self.g_proj)
        (i_pre, f_pre, g_pre), _ = bitlinear_prologue(
            "norm", x, [p.norm.weight for p in projs], [p.weight for p in projs],
            pre_weight=norm.weight, pre_eps=norm.eps, eps=self.i_proj.eps,
        )  # fmt: skip
        if lower_bound is None or self.layer_idx == 0:
            lower_bound = torch.zeros(x.shape[-1], device=x.device, dtype=torch.float32)
        c, final_state = mlgru(f_pre, i_pre, lower_bound, state)
        (out,), _ = bitlinear_prologue(
            "norm_gate", g_pre, [self.o_proj.norm.weight], [self.o_proj.weight], aux=c,
            pre_weight=self.g_norm.weight, pre_eps=self.g_norm.eps, eps=self.o_proj.eps,
        )  # fmt: skip
        return out, final_state


class GLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = bit_linear(cfg, cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = bit_linear(cfg, cfg.intermediate_size, cfg.hidden_size)

    def forward(self, h: Tensor) -> Tensor:
        a, b = self.gate_proj(h).chunk(2, dim=-1)
        return self.down_proj(F.silu(a) * b)

    def forward_reference(self, h: Tensor) -> Tensor:
        """As the reference's HGRNBitMLP: the SiLU-multiply keeps gate_proj's output."""
        a, b = self.gate_proj(h).chunk(2, dim=-1)
        return self.down_proj(swiglu(a, b))

    def forward_fused(self, x: Tensor, mixed: Tensor, norm: RMSNorm) -> Tensor:
        """x + mixed + GLU(norm(x + mixed)), with the add and `norm` (mlp_norm) folded into gate_proj."""
        (ab,), x2 = bitlinear_prologue(
            "add_norm", x, [self.gate_proj.norm.weight], [self.gate_proj.weight], aux=mixed,
            pre_weight=norm.weight, pre_eps=norm.eps, eps=self.gate_proj.eps,
        )  # fmt: skip
        (out,), _ = bitlinear_prologue(
            "glu", ab, [self.down_proj.norm.weight], [self.down_proj.weight], eps=self.down_proj.eps
        )
        return x2 + out


class MMFreeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.bitlinear = cfg.bitlinear
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLGRU(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GLU(cfg)

    def forward(self, x: Tensor, lower_bound: Tensor | None, state: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.bitlinear == "fused":
            mixed, new_state = self.attn.forward_fused(x, self.attn_norm, lower_bound, state)
            return self.mlp.forward_fused(x, mixed, self.mlp_norm), new_state
        if self.bitlinear in REFERENCE_BODY:  # the residual add is fused into mlp_norm, as there
            h = rms_norm_keep_input(x, self.attn_norm.weight, self.attn_norm.eps)
            mixed, new_state = self.attn.forward_reference(h, lower_bound, state)
            h, x = rms_norm_keep_input(mixed, self.mlp_norm.weight, self.mlp_norm.eps, residual=x)
            return x + self.mlp.forward_reference(h), new_state
        mixed, new_state = self.attn(self.attn_norm(x), lower_bound, state)
        x = x + mixed
        return x + self.mlp(self.mlp_norm(x)), new_state


class MMFreeBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.use_lower_bound:
            self.lower_bounds = nn.Parameter(torch.zeros(cfg.num_layers, cfg.hidden_size))
        self.layers = nn.ModuleList(MMFreeBlock(cfg, n) for n in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MMFreeLM(nn.Module):
    """`model(input_ids, labels=None, state=None) -> ModelOutput`; state: list of [B, d] fp32 per layer."""

    arch = "mmfree"

    def __init__(self, cfg: ModelConfig, bitlinear: str | None = None):
        """`bitlinear`, when given, replaces the config's `bitlinear` field (the one switch)."""
        super().__init__()
        cfg = cfg.replace(bitlinear=bitlinear) if bitlinear is not None else cfg
        self.config = cfg
        self.model = MMFreeBackbone(cfg)
        self.lm_head = bit_linear(cfg, cfg.hidden_size, cfg.vocab_size)

    def forward(
        self, input_ids: Tensor, labels: Tensor | None = None, state: list[Tensor] | None = None,
        last_only: bool = False,
    ) -> ModelOutput:
        """`last_only`: without labels, compute the logits of the last position only (decoding)."""
        body = self.model
        x = body.embeddings(input_ids)
        bounds = layer_lower_bounds(body.lower_bounds) if self.config.use_lower_bound else None
        new_state = []
        for n, layer in enumerate(body.layers):
            x, layer_state = layer(x, bounds[n] if bounds is not None else None, state[n] if state else None)
            new_state.append(layer_state)
        if last_only and labels is None:
            x = x[:, -1:]
        impl = self.config.bitlinear
        if impl in REFERENCE_BODY:
            logits = self.lm_head(rms_norm_keep_input(x, body.norm.weight, body.norm.eps))
            loss = None
            if labels is not None:
                targets = next_token_targets(labels).reshape(-1)
                loss = cross_entropy_inplace(logits.view(-1, logits.shape[-1]), targets, ignore_index=IGNORE_INDEX)
                logits = None  # its storage holds the gradient after backward
            return ModelOutput(logits=logits, loss=loss, state=new_state)
        if impl != "fused":
            logits = self.lm_head(body.norm(x))
            loss = lm_loss(logits, labels) if labels is not None else None
            return ModelOutput(logits=logits, loss=loss, state=new_state)
        head = self.lm_head
        if labels is None:
            (logits,), _ = bitlinear_prologue(
                "norm", x, [head.norm.weight], [head.weight], pre_weight=body.norm.weight, pre_eps=body.norm.eps,
                eps=head.eps,
            )  # fmt: skip
            return ModelOutput(logits=logits, state=new_state)
        mm = matmul_dtype(x, head.weight)
        xq = quantized_input(
            "norm", x, head.norm.weight, mm, pre_weight=body.norm.weight, pre_eps=body.norm.eps, eps=head.eps
        )
        targets = next_token_targets(labels)
        loss = linear_cross_entropy(xq, ternary_weight(head.weight, mm), targets, ignore_index=IGNORE_INDEX)
        return ModelOutput(logits=None, loss=loss, state=new_state)

    def init_state(self, batch: int, max_len: int | None = None, device=None) -> list[Tensor]:
        """Zero recurrent states (fp32); max_len is not needed, the state has a fixed size."""
        device = device if device is not None else self.lm_head.weight.device
        return [torch.zeros(batch, self.config.hidden_size, device=device) for _ in self.model.layers]

    def static_decoder(self, batch: int, max_len: int, device=None) -> "MMFreeStaticDecoder":
        return MMFreeStaticDecoder(self, batch, max_len, device)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class MMFreeStaticDecoder:
    """The static-decoder protocol of `workloads.decode` for the fake-quant model: the recurrent
    states live in fixed buffers updated in place, so a decoding step can be captured in a CUDA graph."""

    def __init__(self, model: MMFreeLM, batch: int, max_len: int, device=None):
        self.model, self.batch, self.max_len = model, batch, max_len
        self.state = model.init_state(batch, max_len, device)

    def _run(self, ids: Tensor) -> Tensor:
        out = self.model(ids, state=self.state, last_only=True)
        for buf, new in zip(self.state, out.state):
            buf.copy_(new)
        return out.logits[:, -1]

    def prefill(self, prompt_ids: Tensor) -> Tensor:
        for buf in self.state:
            buf.zero_()
        return self._run(prompt_ids)

    def step(self, ids: Tensor) -> Tensor:
        return self._run(ids.reshape(self.batch, 1))

    def rewind(self, position: int) -> None:
        """The recurrent state has no position: kept as it is (see StaticDecoder.rewind)."""
