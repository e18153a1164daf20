"""config.json of a checkpoint folder, read and written field by field.

MatMul-free: the reference's `HGRNBitConfig` (model_type "hgrn_bit", ridgerchu/matmulfreellm), with
its defaults for every field left out. Transformer++: Hugging Face's `LlamaConfig`, in both the
transformers 4 spelling (`rope_theta`, `rope_scaling`, `torch_dtype`) and the transformers 5 one
(`rope_parameters`, `dtype`). A setting mmprof cannot compute faithfully is a one-line error naming
the field, never ignored. Fields that do not change the computation (token ids, initializer_range,
architectures, ...) are kept in `ModelConfig.source_json` and written back on save, so a round
trip keeps every field.
"""

from __future__ import annotations

import json

from mmprof.errors import UserError
from mmprof.workloads.presets import ModelConfig, glu_intermediate_size

# config.json's "quantization_config" of a packed MatMul-free checkpoint (layout: kernels/ternary_pack.py)
PACKED_QUANTIZATION = {"quant_method": "mmprof-ternary-2bit", "weights_per_int32": 16, "scale": "per tensor, fp32"}

# HGRNBitConfig.__init__'s defaults (mmfreelm/models/hgrn_bit/configuration_hgrn_bit.py)
HGRN_BIT_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 2048, "num_hidden_layers": 24, "attn_mode": "fused_recurrent",
    "num_heads": 1, "expand_ratio": 1, "use_short_conv": False, "conv_size": 4, "share_conv_kernel": True,
    "use_lower_bound": True, "hidden_ratio": 4, "intermediate_size": None, "hidden_act": "swish",
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "use_cache": True, "pad_token_id": None,
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "initializer_range": 0.02,
    "fuse_cross_entropy": True,
}  # fmt: skip
# LlamaConfig's defaults for the fields mmprof reads (transformers 4.x and 5.x agree on these)
LLAMA_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu",
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
    "mlp_bias": False,
}  # fmt: skip
DTYPE_KEYS = ("dtype", "torch_dtype")  # transformers 5, transformers 4


def _get(data: dict, key: str, defaults: dict):
    value = data.get(key, defaults.get(key))
    return defaults.get(key) if value is None and key not in ("intermediate_size", "head_dim") else value


def _unsupported(where: str, problems: list[str]) -> None:
    if problems:
        raise UserError(f"{where}: unsupported settings: {'; '.join(problems)}")


def _int(data: dict, key: str, defaults: dict, where: str) -> int:
    value = _get(data, key, defaults)
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{where}: {key} must be an integer, got {value!r}")
    return value


def config_dtype(data: dict) -> str | None:
    """The weights' dtype name as the config states it (`dtype`, else `torch_dtype`), or None."""
    return next((data[k] for k in DTYPE_KEYS if data.get(k) is not None), None)


def _hgrn_bit(data: dict, where: str) -> ModelConfig:
    get = lambda key: _get(data, key, HGRN_BIT_DEFAULTS)  # noqa: E731
    hidden = _int(data, "hidden_size", HGRN_BIT_DEFAULTS, where)
    heads = _int(data, "num_heads", HGRN_BIT_DEFAULTS, where)
    quant = data.get("quantization_config")
    _unsupported(where, [text for bad, text in (
        (get("attn_mode") != "fused_recurrent", f"attn_mode {get('attn_mode')!r} (the reference runs fused_recurrent only)"),
        (get("expand_ratio") != 1, f"expand_ratio {get('expand_ratio')} (mmprof's MLGRU is d -> d)"),
        (bool(get("use_short_conv")), "use_short_conv true (no short convolution in mmprof)"),
        (bool(get("tie_word_embeddings")), "tie_word_embeddings true (mmprof's lm_head is its own BitLinear)"),
        (get("hidden_act") not in ("swish", "silu"), f"hidden_act {get('hidden_act')!r} (swish only)"),
        (heads < 1 or hidden % heads != 0, f"num_heads {heads} does not divide hidden_size {hidden}"),
        (quant is not None and quant != PACKED_QUANTIZATION, f"quantization_config {quant} (not mmprof's packed ternary)"),
    ) if bad])  # fmt: skip
    ratio = get("hidden_ratio")
    intermediate = data.get("intermediate_size") or glu_intermediate_size(hidden, ratio)
    return ModelConfig(
        vocab_size=_int(data, "vocab_size", HGRN_BIT_DEFAULTS, where), hidden_size=hidden,
        num_layers=_int(data, "num_hidden_layers", HGRN_BIT_DEFAULTS, where), intermediate_size=intermediate,
        num_heads=heads, rms_norm_eps=float(get("rms_norm_eps")),
        max_seq_len=_int(data, "max_position_embeddings", HGRN_BIT_DEFAULTS, where),
        use_lower_bound=bool(get("use_lower_bound")), source_json=json.dumps(data, sort_keys=True),
    )  # fmt: skip


def _rope_theta(data: dict, where: str) -> tuple[float, str | None]:
    """(rotary base, what mmprof cannot run) from transformers 5's `rope_parameters` or 4's
    `rope_theta`/`rope_scaling`; only the plain ("default") rotation is implemented."""
    params = data.get("rope_parameters")
    scaling = data.get("rope_scaling")
    if params is not None:
        if not isinstance(params, dict) or "rope_theta" not in params:
            raise UserError(f"{where}: rope_parameters {params!r} has no rope_theta")
        kind, name, theta = params.get("rope_type", "default"), "rope_parameters.rope_type", params["rope_theta"]
        extra = sorted(set(params) - {"rope_type", "rope_theta"})
    else:
        theta = _get(data, "rope_theta", LLAMA_DEFAULTS)
        kind, name, extra = "default", "rope_scaling", []
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
            name = "rope_scaling.rope_type"
            extra = sorted(set(scaling) - {"rope_type", "type"}) if isinstance(scaling, dict) else []
    if kind != "default":
        return float(theta), f"{name} {kind!r} (mmprof implements the default rotary only)"
    if extra:
        return float(theta), f"{name} default with {', '.join(extra)}"
    return float(theta), None


def _llama(data: dict, where: str) -> ModelConfig:
    get = lambda key: _get(data, key, LLAMA_DEFAULTS)  # noqa: E731
    hidden = _int(data, "hidden_size", LLAMA_DEFAULTS, where)
    heads = _int(data, "num_attention_heads", LLAMA_DEFAULTS, where)
    kv_heads = data.get("num_key_value_heads") or heads
    head_dim = data.get("head_dim")
    theta, rope_problem = _rope_theta(data, where)
    _unsupported(where, [text for bad, text in (
        (rope_problem is not None, rope_problem),
        (bool(get("attention_bias")), "attention_bias true (mmprof's projections have no bias)"),
        (bool(get("mlp_bias")), "mlp_bias true (mmprof's projections have no bias)"),
        (get("hidden_act") != "silu", f"hidden_act {get('hidden_act')!r} (silu only)"),
        (data.get("sliding_window") is not None, f"sliding_window {data.get('sliding_window')} (full attention only)"),
        (bool(data.get("use_sliding_window")), "use_sliding_window true (full attention only)"),
        (float(get("attention_dropout")) != 0.0, f"attention_dropout {get('attention_dropout')} (no dropout in mmprof)"),
        (data.get("quantization_config") is not None, "quantization_config (mmprof reads unquantised Llama weights)"),
        (not isinstance(kv_heads, int) or heads % kv_heads != 0, f"num_key_value_heads {kv_heads} does not divide num_attention_heads {heads}"),
        (head_dim is not None and (not isinstance(head_dim, int) or head_dim % 2), f"head_dim {head_dim} (an even integer)"),
        (head_dim is None and hidden % heads != 0, f"num_attention_heads {heads} does not divide hidden_size {hidden}"),
    ) if bad])  # fmt: skip
    return ModelConfig(
        vocab_size=_int(data, "vocab_size", LLAMA_DEFAULTS, where), hidden_size=hidden,
        num_layers=_int(data, "num_hidden_layers", LLAMA_DEFAULTS, where),
        intermediate_size=_int(data, "intermediate_size", LLAMA_DEFAULTS, where), num_heads=heads,
        num_kv_heads=kv_heads if kv_heads != heads else None,
        attn_head_dim=head_dim if head_dim is not None and head_dim * heads != hidden else None,
        rms_norm_eps=float(get("rms_norm_eps")), rope_theta=theta,
        max_seq_len=_int(data, "max_position_embeddings", LLAMA_DEFAULTS, where),
        tie_word_embeddings=bool(get("tie_word_embeddings")), source_json=json.dumps(data, sort_keys=True),
    )  # fmt: skip


def config_from_json(data: dict, where: str = "config.json") -> tuple[str, ModelConfig]:
    """(arch, ModelConfig) from a reference HGRNBit or a Hugging Face Llama config."""
    kind = data.get("model_type")
    if kind == "hgrn_bit":
        return "mmfree", _hgrn_bit(data, where)
    if kind == "llama":
        return "transformer", _llama(data, where)
    raise UserError(f"{where}: unsupported settings: model_type {kind!r} (expected 'hgrn_bit' or 'llama')")


def _source(cfg: ModelConfig) -> dict:
    return json.loads(cfg.source_json) if cfg.source_json else {}


def config_to_json_mmfree(cfg: ModelConfig, dtype: str, packed: bool = False) -> dict:
    """The reference's own fields; `num_heads` is the source's (the MLGRU's head split, which does not
    change its elementwise recurrence) or the reference's default 1, never the Transformer++ preset's."""
    src = _source(cfg)
    ratio = src.get("hidden_ratio") or HGRN_BIT_DEFAULTS["hidden_ratio"]
    derived = glu_intermediate_size(cfg.hidden_size, ratio) == cfg.intermediate_size
    heads = src.get("num_heads") if src.get("model_type") == "hgrn_bit" else None
    out = {"model_type": "hgrn_bit", "architectures": ["HGRNBitForCausalLM"], **HGRN_BIT_DEFAULTS}
    out.update({k: v for k, v in src.items() if k not in DTYPE_KEYS and k != "quantization_config"})
    out.update({
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_heads": heads or HGRN_BIT_DEFAULTS["num_heads"], "hidden_ratio": ratio,
        "intermediate_size": None if derived else cfg.intermediate_size,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.rms_norm_eps,
        "use_lower_bound": cfg.use_lower_bound, "tie_word_embeddings": False,
    })  # fmt: skip
    out["dtype" if "dtype" in src else "torch_dtype"] = dtype
    if packed:
        out["quantization_config"] = PACKED_QUANTIZATION
    return out


def config_to_json_llama(cfg: ModelConfig, dtype: str) -> dict:
    """LlamaConfig's fields, in the source's spelling (transformers 5's `rope_parameters`/`dtype` if
    it had them, else transformers 4's, which transformers 5 reads too)."""
    src = _source(cfg)
    out = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **LLAMA_DEFAULTS, "pretraining_tp": 1}
    out.update({k: v for k, v in src.items() if k not in DTYPE_KEYS})
    out.update({
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_word_embeddings,
    })  # fmt: skip
    if "rope_parameters" in src:
        out["rope_parameters"] = {**src["rope_parameters"], "rope_theta": cfg.rope_theta}
        out.pop("rope_theta", None)
        out.pop("rope_scaling", None)
    else:
        out["rope_theta"] = cfg.rope_theta
    out["dtype" if "dtype" in src else "torch_dtype"] = dtype
    return out
