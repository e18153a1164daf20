"""What each BitLinear implementation keeps for backward, per token and layer, counted by the
live-tensor tracker on fake tensors under bf16 autocast (the estimate `train-memory --device meta`
makes). A change in what a path keeps changes these counts and fails here.

With hidden size d and GLU width I (bytes per token per layer, layers > 0):
- vanilla 44d + 8I + 36 (1.3B: 132.0 KiB; the reference's unfused model measured on an H200 keeps
  the same): fp32 residual and attn_norm output (8d), i/f/g_proj's bf16 quantised inputs (6d), the
  bf16 sigmoid, the fp32 forget gate and 1 - f, the bf16 i_proj output (12d), the fp32 recurrence
  output (4d), g_proj's output and the norm-gate output (4d), o_proj's quantised input (2d), the fp32
  residual after the attention (4d), mlp_norm's output and gate_proj's quantised input (4d), gate_proj's
  output (4I), the SiLU-multiply output and down_proj's quantised input (4I), nine fp32 rstd (36).
- ref-fused 34d + 6I + 36 (101.0 KiB): the same less the six quantised inputs (10d + 2I).
- fused 14d + 4I + 52 (50.1 KiB).
- naive 92d + 16I + 36 (272.0 KiB).
"""

import pytest
import torch

from mmprof.profiler import MemoryTracker, fake_tensor_mode
from mmprof.workloads import build_model, forward_context
from mmprof.workloads.presets import ModelConfig

D, I = 128, 256
EXPECTED = {
    "vanilla": 44 * D + 8 * I + 36,
    "ref-fused": 34 * D + 6 * I + 36,
    "fused": 14 * D + 4 * I + 52,
    "naive": 92 * D + 16 * I + 36,
}


def saved_after_forward(impl: str, layers: int, tokens: int) -> int:
    """Bytes live after the forward with the loss (what backward will read), minus before."""
    cfg = ModelConfig(vocab_size=64, hidden_size=D, num_layers=layers, intermediate_size=I, num_heads=4)
    with fake_tensor_mode():
        model = build_model("mmfree", cfg, bitlinear=impl, device="cpu")
        ids = torch.randint(0, 64, (1, tokens))
        with MemoryTracker(model, granularity_bytes=1) as tracker:
            before = tracker.current_bytes()
            with forward_context("bf16-autocast", torch.device("cpu")):
                loss = model(ids, labels=ids).loss
            after = tracker.current_bytes()
    del loss
    return after - before


@pytest.mark.parametrize("impl", list(EXPECTED))
def test_bytes_kept_per_token_per_layer(impl):
    """The difference of a third layer over the difference of 32 more tokens: per token and layer,
    free of what is kept once per layer (the quantised weight copies) or once per model (logits)."""
    def layer(tokens):
        return saved_after_forward(impl, 3, tokens) - saved_after_forward(impl, 2, tokens)

    per_token = (layer(64) - layer(32)) / 32
    assert per_token == EXPECTED[impl]


def test_the_order_of_the_implementations():
    assert EXPECTED["fused"] < EXPECTED["ref-fused"] < EXPECTED["vanilla"] < EXPECTED["naive"]
