"""What machine this is: GPUs as NVML sees them, CPU, RAPL, library versions (for `mmprof env`, meta.json)."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import psutil

from mmprof.settings import int8_forward_enabled, mmprof_environment

from .gpu import GpuSource, Unavailable
from .host import HostSource
from .nvml import open_gpus
from .sampler import probe_power
from .measurement import GIB


def _safe(fn, default=None):
    try:
        return fn()
    except Unavailable:
        return default


def gpu_info(gpu: GpuSource) -> dict:
    power_source, power_reason = probe_power(gpu)
    total = _safe(gpu.memory_total_bytes)
    return {
        "index": gpu.index,
        "nvml_index": gpu.nvml_index,
        "name": _safe(gpu.name),
        "uuid": _safe(gpu.uuid),
        "driver": _safe(gpu.driver_version),
        "total_mem_gib": None if total is None else round(total / GIB, 3),
        "power_limit_w": _safe(gpu.power_limit_w),
        "instant_power_field": power_source == "instant",
        "power_reading": power_source,
        "power_note": power_reason,
        **_energy_counter(gpu),
    }


def _energy_counter(gpu: GpuSource) -> dict:
    """Whether the total-energy counter answers, and why not when it does not."""
    try:
        gpu.energy_mj()
    except Unavailable as exc:
        return {"energy_counter": False, "energy_counter_note": exc.reason}
    return {"energy_counter": True, "energy_counter_note": None}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    import torch

    from mmprof import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "nvidia_ml_py": _version("nvidia-ml-py"),
        "mmprof": __version__,
    }


def system_info(gpu_sources: list[GpuSource] | None = None, host: HostSource | None = None) -> dict:
    """A JSON-ready description of this machine. `gpus` is empty when `gpu_unavailable` says why."""
    gpus, reason = gpu_sources, None
    if gpus is None:
        try:
            gpus = open_gpus(None)
        except Unavailable as exc:
            gpus, reason = [], exc.reason
    host = host or HostSource()
    return {
        "gpus": [gpu_info(g) for g in gpus],
        "gpu_unavailable": reason,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "mmprof_environment": mmprof_environment(),
        "int8_forward": int8_forward_enabled(),
        "cpu": {
            "model": _cpu_model(),
            "cores_logical": os.cpu_count(),
            "cores_physical": psutil.cpu_count(logical=False),
            "ram_gib": round(psutil.virtual_memory().total / GIB, 2),
        },
        "rapl": {"readable": host.rapl_reason is None, "reason": host.rapl_reason, "zones": host.rapl_zones},
        "platform": platform.platform(),
        "python_executable": sys.executable,
        "versions": versions(),
    }
