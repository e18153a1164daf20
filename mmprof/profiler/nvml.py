"""The real GPU source: NVML through pynvml (nvidia-ml-py), with errors mapped to NvmlUnavailable."""

from __future__ import annotations

import os
import sys
import threading

from ..errors import UserError
from .gpu import GpuSource, NvmlUnavailable
from .visible import visible_nvml_indices

_INIT_LOCK = threading.Lock()
_INITIALISED = False

# NVML return codes (nvml.h) and what they mean to a user; True marks a lasting condition.
_REASONS = {
    2: ("invalid argument", True),
    3: ("not supported on this GPU or driver", True),
    4: ("permission denied", True),
    6: ("not found", True),
    9: ("the NVIDIA driver is not loaded", True),
    10: ("NVML timed out", False),
    12: ("no NVML library (libnvidia-ml.so.1 not found): is the NVIDIA driver installed?", True),
    13: ("the installed driver's NVML lacks this function", True),
    15: ("the GPU is lost (fell off the bus)", True),
    18: ("NVML and driver versions do not match", True),
    21: ("no data yet", False),
    27: ("not ready", False),
    28: ("no such GPU", True),
    999: ("unknown NVML error", False),
}
_INSTANT_POWER_FIELD = 186  # NVML_FI_DEV_POWER_INSTANT, in older bindings too
_VALUE_MEMBERS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}


def _pynvml():
    try:
        import pynvml
    except ImportError as exc:
        raise NvmlUnavailable(f"no NVML binding: nvidia-ml-py is not installed ({exc})") from None
    return pynvml


def _unavailable(code: int, what: str) -> NvmlUnavailable:
    text, permanent = _REASONS.get(code, (f"NVML error {code}", False))
    return NvmlUnavailable(f"{what}: {text}", permanent=permanent)


def _call(what: str, fn, *args):
    pynvml = sys.modules.get("pynvml") or _pynvml()
    try:
        return fn(*args)
    except pynvml.NVMLError as exc:
        raise _unavailable(getattr(exc, "value", 999), what) from None
    except OSError as exc:  # the shared library failed to load in some other way
        raise NvmlUnavailable(f"{what}: {exc}") from None


def init_nvml():
    """Load and initialise NVML once per process; returns the pynvml module."""
    global _INITIALISED
    pynvml = _pynvml()
    with _INIT_LOCK:
        if not _INITIALISED:
            _call("NVML init", pynvml.nvmlInit)
            _INITIALISED = True
    return pynvml


def _torch_order(uuids: list[str]) -> list[int] | None:
    """NVML indices in torch's order from the UUIDs CUDA reports, if torch has CUDA initialised."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    order = []
    for i in range(torch.cuda.device_count()):
        uuid = getattr(torch.cuda.get_device_properties(i), "uuid", None)
        key = f"GPU-{uuid}".lower()
        match = [k for k, u in enumerate(uuids) if u.lower() == key]
        if uuid is None or len(match) != 1:
            return None
        order.append(match[0])
    return order


def open_gpus(indices: list[int] | None = None) -> list[NvmlGpu]:
    """NVML handles for torch GPU indices (all visible GPUs if None), CUDA_VISIBLE_DEVICES honoured.

    Raises NvmlUnavailable if NVML cannot be used here, UserError for an index that is not visible.
    Without torch's CUDA initialised, integer entries of CUDA_VISIBLE_DEVICES are taken as NVML
    (PCI bus) order, which is CUDA's order unless CUDA_DEVICE_ORDER=FASTEST_FIRST reorders
    different GPU models.
    """
    pynvml = init_nvml()
    count = _call("counting GPUs", pynvml.nvmlDeviceGetCount)
    if count == 0:
        raise NvmlUnavailable("NVML sees no NVIDIA GPU")
    handles = [_call(f"GPU {k}", pynvml.nvmlDeviceGetHandleByIndex, k) for k in range(count)]
    uuids = [_call(f"GPU {k} UUID", pynvml.nvmlDeviceGetUUID, h) for k, h in enumerate(handles)]
    visible = _torch_order(uuids)
    if visible is None:
        visible = visible_nvml_indices(os.environ.get("CUDA_VISIBLE_DEVICES"), uuids)
    if not visible:
        raise NvmlUnavailable("CUDA_VISIBLE_DEVICES hides every GPU")
    wanted = range(len(visible)) if indices is None else indices
    for i in wanted:
        if not 0 <= i < len(visible):
            raise UserError(f"GPU index {i} is not visible: {len(visible)} GPU(s) visible")
    return [NvmlGpu(i, visible[i], handles[visible[i]]) for i in wanted]


class NvmlGpu(GpuSource):
    def __init__(self, index: int, nvml_index: int, handle):
        self.index = index
        self.nvml_index = nvml_index
        self._handle = handle
        self._nvml = _pynvml()

    def _get(self, what: str, fn, *args):
        return _call(f"GPU {self.index} {what}", fn, self._handle, *args)

    def name(self) -> str:
        return str(self._get("name", self._nvml.nvmlDeviceGetName))

    def uuid(self) -> str:
        return str(self._get("UUID", self._nvml.nvmlDeviceGetUUID))

    def driver_version(self) -> str:
        return str(_call("driver version", self._nvml.nvmlSystemGetDriverVersion))

    def power_instant_w(self) -> float:
        field = getattr(self._nvml, "NVML_FI_DEV_POWER_INSTANT", _INSTANT_POWER_FIELD)
        (value,) = self._get("instant power field", self._nvml.nvmlDeviceGetFieldValues, [field])
        if value.nvmlReturn != 0:
            raise _unavailable(value.nvmlReturn, f"GPU {self.index} instant power field")
        member = _VALUE_MEMBERS.get(value.valueType)
        if member is None:
            raise NvmlUnavailable(f"GPU {self.index} instant power field: value type {value.valueType}")
        return float(getattr(value.value, member)) / 1000.0  # mW

    def power_usage_w(self) -> float:
        return self._get("power usage", self._nvml.nvmlDeviceGetPowerUsage) / 1000.0

    def energy_mj(self) -> int:
        return int(self._get("energy counter", self._nvml.nvmlDeviceGetTotalEnergyConsumption))

    def memory_used_bytes(self) -> int:
        return int(self._get("memory info", self._nvml.nvmlDeviceGetMemoryInfo).used)

    def memory_total_bytes(self) -> int:
        return int(self._get("memory info", self._nvml.nvmlDeviceGetMemoryInfo).total)

    def utilization_pct(self) -> tuple[float, float]:
        rates = self._get("utilization", self._nvml.nvmlDeviceGetUtilizationRates)
        return float(rates.gpu), float(rates.memory)

    def sm_clock_mhz(self) -> float:
        return float(self._get("SM clock", self._nvml.nvmlDeviceGetClockInfo, self._nvml.NVML_CLOCK_SM))

    def temperature_c(self) -> float:
        sensor = self._nvml.NVML_TEMPERATURE_GPU
        return float(self._get("temperature", self._nvml.nvmlDeviceGetTemperature, sensor))

    def power_limit_w(self) -> float:
        return self._get("power limit", self._nvml.nvmlDeviceGetEnforcedPowerLimit) / 1000.0
