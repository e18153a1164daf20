"""Model shapes: one config dataclass and the named size presets of DESIGN.md."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mmprof.errors import UserError

ARCHS = ("mmfree", "transformer")


def glu_intermediate_size(hidden_size: int, ratio: float = 4.0) -> int:
    """256 * ceil(int(hidden * ratio * 2/3) / 256): the GLU width of the paper and of Llama."""
    width = int(hidden_size * ratio * 2 / 3)
    return 256 * ((width + 255) // 256)


@dataclass(frozen=True)
class ModelConfig:
    """Shape of either model; `num_heads`/`num_kv_heads`/`rope_theta` are used by Transformer++ only."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int | None = None  # None: as many as num_heads (no grouped-query attention)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_word_embeddings: bool = False
    use_lower_bound: bool = True
    # MatMul-free only: the BitLinear implementation of the whole model (vanilla | ref-fused | fused |
    # naive, see kernels/bitlinear.py) and its norm eps; None: the eps of the reference class it mirrors
    bitlinear: str = "fused"
    bitlinear_eps: float | None = None
    attn_head_dim: int | None = None  # None: hidden_size // num_heads (Llama's head_dim when it differs)
    # the config.json this shape was read from (JSON text, "" if none): its fields that mmprof does
    # not model (token ids, ...) are written back on save; not part of the shape (no compare)
    source_json: str = field(default="", compare=False, repr=False)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "intermediate_size", "num_heads"):
            if getattr(self, name) < 1:
                raise UserError(f"model config: {name} must be >= 1, got {getattr(self, name)}")
        if self.attn_head_dim is None and self.hidden_size % self.num_heads:
            raise UserError(f"model config: hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        from mmprof.kernels.bitlinear import IMPLS

        if self.bitlinear not in IMPLS:
            raise UserError(f"unknown BitLinear implementation {self.bitlinear!r}; valid: {', '.join(IMPLS)}")
        if self.num_heads % self.kv_heads:
            raise UserError(f"model config: num_heads {self.num_heads} not divisible by num_kv_heads {self.kv_heads}")

    @property
    def bitlinear_norm_eps(self) -> float:
        """The eps of every BitLinear's own RMSNorm: `bitlinear_eps`, else the implementation's."""
        from mmprof.kernels.bitlinear import DEFAULT_EPS

        return self.bitlinear_eps if self.bitlinear_eps is not None else DEFAULT_EPS[self.bitlinear]

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _preset(vocab: int, layers: int, hidden: int, heads: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        intermediate_size=glu_intermediate_size(hidden),
        num_heads=heads,
    )


PRESETS: dict[str, ModelConfig] = {
    "tiny": _preset(256, 2, 64, 4),
    "370m": _preset(32000, 24, 1024, 16),
    "1.3b": _preset(32000, 24, 2048, 32),
    "2.7b": _preset(32000, 32, 2560, 40),
    "13b": _preset(32000, 40, 5120, 40),
}


def get_config(size: str) -> ModelConfig:
    """The preset called `size` (case-insensitive)."""
    key = str(size).strip().lower()
    if key not in PRESETS:
        raise UserError(f"unknown model size {size!r}; valid sizes: {', '.join(PRESETS)}")
    return PRESETS[key]


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHS)}")
    return arch
