"""Pieces every sweep shares: parsing list options, device choice, OOM detection and clean-up."""

from __future__ import annotations

import gc
import re
from typing import Callable, Iterable, Iterator, TypeVar

import torch

from mmprof.errors import UserError

T = TypeVar("T")
C = TypeVar("C")

# Datasheet dense bf16 peaks (TFLOP/s, no sparsity) for MFU. MFU is empty for a GPU not listed here,
# unless --peak-tflops is given. Power and energy are never derived from a table.
DENSE_BF16_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.0,
}


MAX_LIST = 64     # values in one list option: more is a typo, not a sweep


def parse_list(text: str, name: str, cast: Callable[[str], T], allowed: tuple | None = None) -> list[T]:
    items = [p.strip() for p in str(text).split(",")]
    if not items or any(p == "" for p in items):
        raise UserError(f"--{name}: malformed list {text!r}; use comma-separated values like 1,2,4")
    out = []
    for p in items:
        try:
            v = cast(p)
        except ValueError:
            raise UserError(f"--{name}: {p!r} is not a valid value") from None
        if allowed is not None and v not in allowed:
            raise UserError(f"--{name}: unknown value {p!r}; choose from {', '.join(map(str, allowed))}")
        if v in out:
            raise UserError(f"--{name}: {p!r} is given twice")
        out.append(v)
    if len(out) > MAX_LIST:
        raise UserError(f"--{name}: {len(out)} values; a sweep takes at most {MAX_LIST}")
    return out


def positive_int(text: str) -> int:
    if not re.fullmatch(r"\s*\d+\s*", text) or int(text) <= 0:
        raise ValueError(text)
    return int(text)


def resolve_device(device: str, gpus: str | None) -> str:
    """auto -> cuda:<first of --gpus> when CUDA is present, else meta (an estimate on fake tensors).

    A --gpus index that no visible GPU has is an error whatever the device."""
    indices = parse_list(gpus, "gpus", _gpu_index) if gpus else [0]
    if len(indices) != 1:
        raise UserError("--gpus: a single-process run measures one GPU; use torchrun for several")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and indices[0] >= n:
        raise UserError(f"--gpus: GPU index {indices[0]} does not exist ({n} visible)")
    if device == "auto":
        device = "cuda" if n else "meta"
    if device == "cuda":
        if not n:
            raise UserError("--device cuda: no CUDA device is visible")
        return f"cuda:{indices[0]}"
    if device in ("cpu", "meta"):
        return device
    raise UserError(f"--device: unknown device {device!r}; choose auto, cuda, cpu or meta")


def _gpu_index(text: str) -> int:
    if not re.fullmatch(r"\d+", text.strip()):
        raise ValueError(text)
    return int(text)


def is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    if isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def release_memory(device: str) -> None:
    """Free everything a failed or finished configuration left, so the next row starts clean."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_tflops(name: str | None, override: float | None) -> float | None:
    if override:
        return override
    if not name:
        return None
    for key, tflops in DENSE_BF16_TFLOPS.items():
        if key in name:
            return tflops
    return None


def one_line(exc: BaseException) -> str:
    """The exception's name and its message's first line, and its last where they differ (a
    compiler's message opens with the place and ends with the cause); at most 300 characters."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(lines) > 1 and lines[-1] != lines[0]:
        text = f"{text} ... {lines[-1]}"
    return f"{type(exc).__name__}: {text}"[:300]



def pending(todo: Iterable[C], make_row: Callable[[C], dict], *, key: Callable[[dict], tuple] | None = None,
            skip: Iterable[tuple] = (), on_start: Callable[[C], None] | None = None) -> Iterator[tuple[C, dict]]:
    """(config, spec row) for each configuration not already in the run being resumed."""
    skip = set(skip)
    for cfg in todo:
        if on_start:
            on_start(cfg)
        row = make_row(cfg)
        if key and key(row) in skip:
            continue
        yield cfg, row


def guarded(fn: Callable[[], dict], device: str) -> dict:
    """Run one configuration; out-of-memory and other failures become a row, never a crash.

    The exception (and the frames holding its tensors) is dropped before the memory is released."""
    failure: str | None = None
    status = "ok"
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row with its message
        status = "oom" if is_oom(exc) else "error"
        failure = one_line(exc)
        result = None
    release_memory(device)
    if result is None:
        return {"status": status, "note": failure}
    return {"status": "ok", **result}
