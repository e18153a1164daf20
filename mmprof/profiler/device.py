"""Device helpers shared by windows and timing: which CUDA device, and waiting for it."""

from __future__ import annotations

import torch


def cuda_device(device: str | torch.device) -> torch.device | None:
    """The torch CUDA device meant by `device`, or None for anything that is not a usable GPU."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)


def cuda_index(device: str | torch.device) -> int | None:
    """The CUDA index `device` names (current device or 0 when it names none); None if not cuda."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    if dev.index is not None:
        return dev.index
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def synchronize(device: str | torch.device) -> None:
    """Wait until all queued work on `device` has finished (a no-op for cpu and meta)."""
    dev = torch.device(device)
    if dev.type in ("cpu", "meta"):
        return
    if dev.type == "cuda":
        if torch.cuda.is_available():
            torch.cuda.synchronize(cuda_device(dev))
        return
    backend = getattr(torch, dev.type, None)
    if backend is not None and hasattr(backend, "synchronize"):
        backend.synchronize()
