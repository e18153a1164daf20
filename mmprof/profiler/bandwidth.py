"""The GPU's memory bandwidth ceiling, measured: a large device-to-device copy, bytes read plus written."""

from __future__ import annotations

import torch


def copy_bandwidth_gbps(device: str = "cuda", nbytes: int = 1 << 31, repeats: int = 10) -> float:
    """Median rate of a device-to-device copy of `nbytes`, counting bytes read and written, in GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times_ms = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times_ms.append(start.elapsed_time(end))
    times_ms.sort()
    median_s = times_ms[len(times_ms) // 2] / 1e3
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / median_s / 1e9
