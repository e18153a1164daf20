"""The GPU's memory bandwidth ceiling, measured: a large device-to-device copy, bytes read plus written."""

from __future__ import annotations

import torch

from .timing import time_fn


def copy_bandwidth_gbps(device: str = "cuda", nbytes: int = 1 << 31, repeats: int = 10) -> float:
    """Median rate of a device-to-device copy of `nbytes`, counting bytes read and written, in GB/s."""
    median_s = _copy_time_s(device, nbytes, repeats)
    torch.cuda.empty_cache()  # the two buffers died with _copy_time_s
    return 2 * nbytes / median_s / 1e9


def _copy_time_s(device: str, nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return time_fn(lambda: dst.copy_(src), warmup=3, repeats=repeats, device=device).median_s
