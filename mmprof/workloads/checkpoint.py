"""Checkpoint folders: config.json plus weights (model.safetensors, shards named by
model.safetensors.index.json, or pytorch_model.bin where there are no safetensors).

MatMul-free models use the reference HGRNBit config keys (model_type "hgrn_bit"); Transformer++ uses
Hugging Face LlamaConfig keys (model_type "llama"); `config_json` reads and writes them. Parameter
names are the models' own, which are the reference's and Hugging Face's, so published folders load
without renaming. A folder may also be named by a Hub repo id already in the local cache.
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
from mmprof.workloads.config_json import (
    PACKED_QUANTIZATION,
    config_dtype,
    config_from_json,
    config_to_json_llama,
    config_to_json_mmfree,
)
from mmprof.workloads.presets import ModelConfig

__all__ = ["PACKED_QUANTIZATION", "config_from_json", "config_to_json", "load_checkpoint", "read_config",
           "resolve_checkpoint", "save_checkpoint", "weight_files"]

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TORCH_FILE, TORCH_INDEX_FILE = "pytorch_model.bin", "pytorch_model.bin.index.json"
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers older HF Llama checkpoints carry
_LIST_LIMIT = 20


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def config_to_json(model: nn.Module) -> dict:
    cfg: ModelConfig = model.config
    dtype = _dtype_name(next(model.parameters()).dtype)
    if getattr(model, "weights", None) == "packed":
        return config_to_json_mmfree(cfg, dtype, packed=True)
    if model.arch == "mmfree":
        return config_to_json_mmfree(cfg, dtype)
    return config_to_json_llama(cfg, dtype)


def resolve_checkpoint(ref: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A checkpoint folder: `ref` itself when it is a local path, else a Hugging Face Hub repo id
    looked up in the local cache only (`huggingface_hub`, local_files_only: nothing is downloaded)."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"checkpoint {ref} is a file; give the folder that holds config.json")
        return path
    text = str(ref)
    parts = text.split("/")
    if text.startswith((".", "/", "~")) or len(parts) > 2 or not all(parts):
        raise UserError(f"checkpoint {ref}: no such folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise UserError(f"checkpoint {ref}: no such folder (Hub repo ids need `pip install huggingface_hub`)") from exc
    try:
        return Path(snapshot_download(text, local_files_only=True, cache_dir=cache_dir))
    except Exception as exc:  # LocalEntryNotFoundError, or a malformed repo id (HFValidationError)
        raise UserError(
            f"checkpoint {ref}: no such folder, and not in the local Hugging Face cache "
            f"(download it first, e.g. `hf download {text}`; mmprof never downloads): {type(exc).__name__}"
        ) from exc


def weight_files(folder: Path) -> list[Path]:
    """The weight files to read: the shards an index names, else every *.safetensors, else
    pytorch_model.bin (or its shards), read with torch.load(weights_only=True)."""
    for index_name in (INDEX_FILE, TORCH_INDEX_FILE):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise UserError(f"{index}: not a weight index (no weight_map): {exc}") from exc
            files = sorted({folder / name for name in weight_map.values()})
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise UserError(_listed(f"{index}: shards not found", absent))
            return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if (folder / TORCH_FILE).is_file():
        return [folder / TORCH_FILE]
    raise UserError(f"no *.safetensors files (nor {TORCH_FILE}) in {folder}")


def _torch_file(path: Path) -> dict:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # pickle and zip errors of a damaged or non-weights file
        raise UserError(f"cannot read {path}: {exc}".splitlines()[0]) from exc
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise UserError(f"cannot read {path}: it does not hold a dict of tensors")
    return state


def _require(data: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if data.get(k) is None]
    if missing:
        raise UserError(f"{where}: missing keys {', '.join(missing)}")


def read_config(folder: str | Path) -> tuple[str, ModelConfig, dict]:
    """(arch, ModelConfig, the raw config.json) of a checkpoint folder."""
    folder = Path(folder)
    data = _read_config(folder)
    _require(data, ("model_type",), str(folder / "config.json"))
    arch, cfg = config_from_json(data, str(folder / "config.json"))
    return arch, cfg, data


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
    """Load a checkpoint folder (or a cached Hub repo id); arch from config.json; dtype None = the
    config's `dtype`/`torch_dtype` (else fp32). A packed MatMul-free checkpoint (config
    "quantization_config") loads as a `PackedMMFreeLM`."""
    folder = resolve_checkpoint(folder)
    arch, cfg, data = read_config(folder)
    dtype = dtype or _DTYPE_NAMES.get(config_dtype(data), torch.float32)
    files = weight_files(folder)
    quant = data.get("quantization_config")

    if quant is not None:  # packed weights keep their stored dtypes; only the embedding takes `dtype`
        model = PackedMMFreeLM(cfg, device="meta", embed_dtype=dtype)
    else:
        model = build_model(arch, cfg, bitlinear=bitlinear, device="meta", dtype=dtype)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    skipped = _IGNORED_SUFFIXES + (("lm_head.weight",) if cfg.tie_word_embeddings else ())  # tied: the table's
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    pickled = {path: _torch_file(path) for path in files if path.suffix == ".bin"}
    found = _index_files([f for f in files if f not in pickled])
    for path, state in pickled.items():
        found.update({name: (path, tuple(t.shape)) for name, t in state.items()})
    found = {n: v for n, v in found.items() if not n.endswith(skipped)}
    _check_tensors(folder, arch, expected, found)

    device = torch.device(device)
    if device.type == "meta":
        return model
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    def take(name: str, t: torch.Tensor) -> torch.Tensor:
        t = t.to(device)
        return t.to(dtype) if quant is None or name == "embeddings.weight" else t

    tensors = {}
    for path in files:
        if path in pickled:
            tensors.update({n: take(n, t) for n, t in pickled[path].items() if n in expected})
            continue
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            tensors.update({n: take(n, handle.get_tensor(n)) for n in handle.keys() if n in expected})
    if cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    model.load_state_dict(tensors, strict=True, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def encode_prompt(folder: str | Path, text: str, vocab_size: int) -> list[int]:
    """`text` as token ids through the folder's tokenizer.json (the `tokenizers` library; its
    post-processor adds the special tokens the model was trained with, e.g. Llama's BOS)."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"no tokenizer.json in {folder}: --prompt needs the checkpoint's tokenizer")
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise UserError("--prompt needs the tokenizers library: pip install tokenizers") from exc
    try:
        ids = Tokenizer.from_file(str(path)).encode(text).ids
    except Exception as exc:  # the Rust library raises a plain Exception for a malformed file
        raise UserError(f"cannot read {path}: {exc}".splitlines()[0]) from exc
    if not ids:
        raise UserError(f"--prompt {text!r} gives no tokens with {path}")
    if max(ids) >= vocab_size:
        raise UserError(f"{path} gives token id {max(ids)}, outside the model's vocab_size {vocab_size}")
    return ids
