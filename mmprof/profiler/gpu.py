"""The GPU device interface: one method per NVML reading, so tests can script the answers.

`NvmlGpu` (nvml.py) is the real implementation. Every method either returns the reading in the
unit its name carries or raises `NvmlUnavailable` saying why it cannot.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class Unavailable(Exception):
    """A reading that cannot be had here; `reason` is a short human explanation."""

    def __init__(self, reason: str, *, permanent: bool = True):
        super().__init__(reason)
        self.reason = reason
        # permanent: asking again will not help (not supported, no permission, no device).
        self.permanent = permanent


class NvmlUnavailable(Unavailable):
    """NVML cannot answer: no library, no driver, no device, permission denied, not supported."""


class GpuSource(ABC):
    """One GPU. `index` is the torch/CUDA index (after CUDA_VISIBLE_DEVICES); `nvml_index` NVML's."""

    index: int
    nvml_index: int

    @abstractmethod
    def name(self) -> str: ...

    @abstractmethod
    def uuid(self) -> str: ...

    @abstractmethod
    def driver_version(self) -> str: ...

    @abstractmethod
    def power_instant_w(self) -> float:
        """Instantaneous power (NVML_FI_DEV_POWER_INSTANT field)."""

    @abstractmethod
    def power_usage_w(self) -> float:
        """nvmlDeviceGetPowerUsage: a 1 s average on Ampere and newer (except GA100)."""

    @abstractmethod
    def energy_mj(self) -> int:
        """Total energy since the driver loaded (nvmlDeviceGetTotalEnergyConsumption), mJ."""

    @abstractmethod
    def memory_used_bytes(self) -> int: ...

    @abstractmethod
    def memory_total_bytes(self) -> int: ...

    @abstractmethod
    def utilization_pct(self) -> tuple[float, float]:
        """(gpu_util_pct, mem_util_pct) over NVML's last sample period."""

    @abstractmethod
    def sm_clock_mhz(self) -> float: ...

    @abstractmethod
    def temperature_c(self) -> float: ...

    @abstractmethod
    def power_limit_w(self) -> float: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}(index={self.index}, nvml_index={self.nvml_index})"
