"""`--set key=value` overrides of a model shape (layers, hidden, intermediate, heads, kv_heads, vocab)."""

from __future__ import annotations

from mmprof.errors import UserError
from mmprof.workloads.presets import ModelConfig, glu_intermediate_size

KEYS = {"layers": "num_layers", "hidden": "hidden_size", "intermediate": "intermediate_size",
        "heads": "num_heads", "kv_heads": "num_kv_heads", "vocab": "vocab_size"}


def parse_overrides(items: tuple[str, ...] | list[str]) -> tuple[tuple[str, int], ...]:
    """('layers=12', 'hidden=1024') -> (('layers', 12), ('hidden', 1024)); a bad item is a UserError."""
    out = []
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.strip().lower()
        if not sep or key not in KEYS:
            raise UserError(f"--set {item!r}: use KEY=VALUE with KEY one of {', '.join(KEYS)}")
        try:
            number = int(value)
        except ValueError:
            raise UserError(f"--set {item!r}: {value.strip()!r} is not an integer") from None
        if number < 1:
            raise UserError(f"--set {item!r}: {key} must be >= 1")
        out.append((key, number))
    return tuple(out)


def apply_overrides(cfg: ModelConfig, overrides) -> ModelConfig:
    """cfg with the overrides; a new hidden size without an intermediate one takes the GLU rule's width."""
    changes = {KEYS[k]: v for k, v in overrides}
    if "hidden_size" in changes and "intermediate_size" not in changes:
        changes["intermediate_size"] = glu_intermediate_size(changes["hidden_size"])
    return cfg.replace(**changes) if changes else cfg
