"""One training step (AdamW) with its forward, backward and optimizer phases visible to a profiler."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import torch

from mmprof.errors import UserError
from mmprof.workloads.build import build_model, resolve_config
from mmprof.workloads.precision import check_precision, forward_context, param_dtype
from mmprof.workloads.presets import ModelConfig, check_arch

Phase = Callable[[str], ContextManager]
TOKEN_FILE_DTYPES = {".bin": np.uint16, ".u16": np.uint16, ".uint16": np.uint16, ".i32": np.int32, ".int32": np.int32}


@dataclass(frozen=True)
class TrainSpec:
    arch: str
    size: str | ModelConfig   # a preset name, or a shape (e.g. a checkpoint's)
    bitlinear: str = "fused"
    batch: int = 1
    seq: int = 2048
    precision: str = "bf16-autocast"
    lr: float = 1e-3
    seed: int = 0
    token_file: str | None = None
    config: ModelConfig | None = None   # the model's shape; None: the preset `size`


class RandomTokens:
    """Seeded uniform random token ids, made on the device."""

    def __init__(self, vocab_size: int, batch: int, seq: int, seed: int, device: torch.device):
        self.shape, self.vocab_size, self.device = (batch, seq), vocab_size, device
        self.generator = None if device.type == "meta" else torch.Generator(device=device).manual_seed(seed)

    def next(self) -> torch.Tensor:
        return torch.randint(0, self.vocab_size, self.shape, device=self.device, generator=self.generator)


def open_token_file(path: str | Path) -> np.ndarray:
    """Memory-map a flat token file: .npy (uint16/int32/int64), or raw .bin/.u16 (uint16), .i32 (int32)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"token file not found: {path}")
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
        if tokens.dtype not in (np.uint16, np.int32, np.int64):
            raise UserError(f"token file {path}: dtype {tokens.dtype} is not uint16, int32 or int64")
        return tokens.reshape(-1)
    if path.suffix not in TOKEN_FILE_DTYPES:
        raise UserError(f"token file {path}: unknown suffix; use .npy or one of {', '.join(TOKEN_FILE_DTYPES)}")
    return np.memmap(path, dtype=TOKEN_FILE_DTYPES[path.suffix], mode="r")


class FileTokens:
    """Random windows of `seq` tokens from a memory-mapped token file (seeded)."""

    def __init__(self, path, vocab_size: int, batch: int, seq: int, seed: int, device: torch.device):
        self.tokens = open_token_file(path)
        if len(self.tokens) < seq:
            raise UserError(f"token file {path} holds {len(self.tokens)} tokens, fewer than seq {seq}")
        self.path, self.vocab_size, self.batch, self.seq, self.device = path, vocab_size, batch, seq, device
        self.rng = np.random.default_rng(seed)

    def next(self) -> torch.Tensor:
        starts = self.rng.integers(0, len(self.tokens) - self.seq + 1, size=self.batch)
        windows = np.stack([np.asarray(self.tokens[s : s + self.seq], dtype=np.int64) for s in starts])
        if windows.max() >= self.vocab_size or windows.min() < 0:
            raise UserError(f"token file {self.path} has ids outside the vocabulary [0, {self.vocab_size})")
        return torch.from_numpy(windows).to(self.device)


def _adamw_options(device: torch.device) -> dict:
    return {"fused": True} if device.type == "cuda" else {}


def _loss_value(loss: torch.Tensor) -> float | None:
    """The loss as a float; None on meta or fake tensors, where there is no value."""
    if loss.device.type == "meta":
        return None
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - very old torch
        is_fake = None
    if is_fake is not None and is_fake(loss):
        return None
    return float(loss.item())


def _no_phase(name: str) -> ContextManager:
    return contextlib.nullcontext()


class Trainer:
    """`step(phase=None, batch=None)` runs forward, backward and the optimizer; returns the loss."""

    def __init__(self, spec: TrainSpec, device: str | torch.device):
        check_arch(spec.arch)
        check_precision(spec.precision)
        if spec.batch < 1 or spec.seq < 2:
            raise UserError(f"training needs batch >= 1 and seq >= 2; got batch {spec.batch}, seq {spec.seq}")
        self.spec = spec
        self.device = torch.device(device)
        self.config = spec.config if spec.config is not None else resolve_config(spec.size)
        self.model = build_model(
            spec.arch, self.config, bitlinear=spec.bitlinear, device=self.device,
            dtype=param_dtype(spec.precision), seed=spec.seed,
        )  # fmt: skip
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=spec.lr, **_adamw_options(self.device))
        args = (self.config.vocab_size, spec.batch, spec.seq, spec.seed, self.device)
        self.tokens = FileTokens(spec.token_file, *args) if spec.token_file else RandomTokens(*args)
        self.tokens_per_step = spec.batch * spec.seq

    def next_batch(self) -> torch.Tensor:
        return self.tokens.next()

    def step(self, phase: Phase | None = None, batch: torch.Tensor | None = None) -> float | None:
        phase = phase or _no_phase
        input_ids = batch if batch is not None else self.next_batch()
        with phase("forward"):
            with forward_context(self.spec.precision, self.device):
                loss = self.model(input_ids, labels=input_ids).loss
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return _loss_value(loss.detach())


def make_trainer(spec: TrainSpec, device: str | torch.device) -> Trainer:
    return Trainer(spec, device)


def model_flops_per_token(cfg: str | ModelConfig, arch: str, seq: int) -> int:
    """Training FLOPs per token: 6 * N (N = parameters outside the embedding table, which does no
    matmul) plus, for Transformer++, 12 * layers * hidden * seq for attention scores and values
    (the PaLM convention; causal masking not discounted)."""
    cfg = resolve_config(cfg)
    model = build_model(check_arch(arch), cfg, device="meta")
    table = model.model.embeddings if arch == "mmfree" else model.model.embed_tokens
    matmul_params = model.num_params() - (0 if cfg.tie_word_embeddings else table.weight.numel())
    flops = 6 * matmul_params
    if arch == "transformer":
        flops += 12 * cfg.num_layers * cfg.hidden_size * seq
    return flops
