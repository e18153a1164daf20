"""Checkpoint folders: config.json plus *.safetensors.

MatMul-free models use the reference HGRNBit config keys (model_type "hgrn_bit"); Transformer++ uses
Hugging Face LlamaConfig keys (model_type "llama"). Parameter names are the models' own, which are
the reference's and Hugging Face's, so published folders load without renaming.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from mmprof.errors import UserError
from mmprof.workloads.build import build_model
from mmprof.workloads.packed import PackedMMFreeLM
from mmprof.workloads.presets import ModelConfig, glu_intermediate_size

WEIGHTS_FILE = "model.safetensors"
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers older HF Llama checkpoints carry
_LIST_LIMIT = 20
# config.json's "quantization_config" of a packed MatMul-free checkpoint (layout: kernels/ternary_pack.py)
PACKED_QUANTIZATION = {"quant_method": "mmprof-ternary-2bit", "weights_per_int32": 16, "scale": "per tensor, fp32"}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def config_to_json_mmfree(cfg: ModelConfig, dtype: str) -> dict:
    return {
        "model_type": "hgrn_bit", "architectures": ["HGRNBitForCausalLM"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers, "intermediate_size": cfg.intermediate_size,
        "num_heads": cfg.num_heads, "expand_ratio": 1, "attn_mode": "fused_recurrent",
        "use_short_conv": False, "conv_size": 4, "share_conv_kernel": True,
        "use_lower_bound": cfg.use_lower_bound, "hidden_ratio": 4, "hidden_act": "swish",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.rms_norm_eps,
        "use_cache": True, "tie_word_embeddings": False, "initializer_range": 0.02,
        "fuse_cross_entropy": True, "torch_dtype": dtype,
    }  # fmt: skip


def config_to_json(model: nn.Module) -> dict:
    cfg: ModelConfig = model.config
    dtype = _dtype_name(next(model.parameters()).dtype)
    if getattr(model, "weights", None) == "packed":
        return {**config_to_json_mmfree(cfg, dtype), "quantization_config": PACKED_QUANTIZATION}
    if model.arch == "mmfree":
        return config_to_json_mmfree(cfg, dtype)
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": None, "max_position_embeddings": cfg.max_seq_len, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
        "initializer_range": 0.02, "torch_dtype": dtype,
    }  # fmt: skip


def _require(data: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if data.get(k) is None]
    if missing:
        raise UserError(f"{where}: missing keys {', '.join(missing)}")


def _unsupported(where: str, problems: list[str]) -> None:
    if problems:
        raise UserError(f"{where}: unsupported settings: {'; '.join(problems)}")


def config_from_json(data: dict, where: str = "config.json") -> tuple[str, ModelConfig]:
    """(arch, ModelConfig) from a reference HGRNBit or Hugging Face Llama config."""
    kind = data.get("model_type")
    if kind == "hgrn_bit":
        _require(data, ("vocab_size", "hidden_size", "num_hidden_layers"), where)
        _unsupported(where, [
            text for bad, text in (
                (data.get("expand_ratio", 1) not in (1, None), f"expand_ratio {data.get('expand_ratio')}"),
                (bool(data.get("use_short_conv")), "use_short_conv true"),
                (bool(data.get("tie_word_embeddings")), "tie_word_embeddings true"),
                (data.get("hidden_act", "swish") not in ("swish", "silu"), f"hidden_act {data.get('hidden_act')}"),
            ) if bad
        ])  # fmt: skip
        hidden = data["hidden_size"]
        intermediate = data.get("intermediate_size") or glu_intermediate_size(hidden, data.get("hidden_ratio") or 4)
        return "mmfree", ModelConfig(
            vocab_size=data["vocab_size"], hidden_size=hidden, num_layers=data["num_hidden_layers"],
            intermediate_size=intermediate, num_heads=data.get("num_heads") or 1,
            rms_norm_eps=data.get("rms_norm_eps", 1e-6), max_seq_len=data.get("max_position_embeddings", 2048),
            use_lower_bound=data.get("use_lower_bound", True),
        )  # fmt: skip
    if kind == "llama":
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        _require(data, keys, where)
        heads = data["num_attention_heads"]
        kv_heads = data.get("num_key_value_heads")
        head_dim = data.get("head_dim")
        _unsupported(where, [
            text for bad, text in (
                (data.get("rope_scaling") is not None, "rope_scaling"),
                (bool(data.get("attention_bias")), "attention_bias true"),
                (bool(data.get("mlp_bias")), "mlp_bias true"),
                (data.get("hidden_act", "silu") != "silu", f"hidden_act {data.get('hidden_act')}"),
                (head_dim is not None and head_dim * heads != data["hidden_size"], f"head_dim {head_dim}"),
            ) if bad
        ])  # fmt: skip
        return "transformer", ModelConfig(
            vocab_size=data["vocab_size"], hidden_size=data["hidden_size"],
            num_layers=data["num_hidden_layers"], intermediate_size=data["intermediate_size"],
            num_heads=heads, num_kv_heads=kv_heads if kv_heads and kv_heads != heads else None,
            rms_norm_eps=data.get("rms_norm_eps", 1e-6), rope_theta=data.get("rope_theta", 10000.0),
            max_seq_len=data.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        )  # fmt: skip
    raise UserError(f"{where}: model_type {kind!r} is not supported; expected 'hgrn_bit' or 'llama'")


def save_checkpoint(model: nn.Module, folder: str | Path) -> Path:
    """Write config.json and model.safetensors into `folder` (created if needed)."""
    if next(model.parameters()).device.type == "meta":
        raise UserError("cannot save a model on the meta device: it holds no weights")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config_to_json(model), indent=2) + "\n")
    return folder


def _listed(label: str, names: list[str]) -> str:
    shown = ", ".join(names[:_LIST_LIMIT])
    more = f" ... and {len(names) - _LIST_LIMIT} more" if len(names) > _LIST_LIMIT else ""
    return f"{label} ({len(names)}): {shown}{more}"


def _index_files(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    found = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    found[name] = (path, tuple(handle.get_slice(name).get_shape()))
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise UserError(f"cannot read {path}: {exc}") from exc
    return found


def _read_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"no config.json in {folder}")
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise UserError(f"{config_path} does not hold a JSON object")
    return data


def _check_tensors(folder: Path, arch: str, expected: dict, found: dict) -> None:
    """One UserError naming every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(
        f"{n} {list(found[n][1])} (expected {list(expected[n])})"
        for n in set(expected) & set(found)
        if found[n][1] != expected[n]
    )
    parts = [
        _listed(label, names)
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped))
        if names
    ]
    if parts:
        raise UserError(f"checkpoint {folder} does not match a {arch} model: " + "; ".join(parts))


def load_checkpoint(
    folder: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    bitlinear: str = "fused",
) -> nn.Module:
    """Load a checkpoint folder; arch from config.json; dtype None = the config's torch_dtype (else fp32).
    A packed MatMul-free checkpoint (config "quantization_config") loads as a `PackedMMFreeLM`."""
    folder = Path(folder)
    data = _read_config(folder)
    arch, cfg = config_from_json(data, str(folder / "config.json"))
    dtype = dtype or _DTYPE_NAMES.get(data.get("torch_dtype"), torch.float32)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"no *.safetensors files in {folder}")
    quant = data.get("quantization_config")
    if quant is not None and quant != PACKED_QUANTIZATION:
        raise UserError(f"{folder / 'config.json'}: quantization_config {quant} is not mmprof's packed ternary format")

    if quant is not None:  # packed weights keep their stored dtypes; only the embedding takes `dtype`
        model = PackedMMFreeLM(cfg, device="meta", embed_dtype=dtype)
    else:
        model = build_model(arch, cfg, bitlinear=bitlinear, device="meta", dtype=dtype)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    found = {n: v for n, v in _index_files(files).items() if not n.endswith(_IGNORED_SUFFIXES)}
    _check_tensors(folder, arch, expected, found)

    device = torch.device(device)
    if device.type == "meta":
        return model
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    tensors = {}
    for path in files:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            for name in handle.keys():
                if name in expected:
                    t = handle.get_tensor(name)
                    tensors[name] = t.to(dtype) if quant is None or name == "embeddings.weight" else t
    if cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    model.load_state_dict(tensors, strict=True, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model
