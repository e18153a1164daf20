"""A scripted pynvml for the sampling process in tests: 250 W, a counter that steps every 100 ms of
the host's monotonic clock (at its multiples of 0.1 s, so the parent can compute the same counter:
`counter_mj`), temperature not supported. Put this folder on PYTHONPATH of the child only."""

import time
from types import SimpleNamespace

NVML_CLOCK_SM = 1
NVML_TEMPERATURE_GPU = 0
POWER_W = 250.0
STEP_S = 0.1


class NVMLError(Exception):
    def __init__(self, value):
        super().__init__(value)
        self.value = value


def nvmlInit():
    pass


def nvmlDeviceGetHandleByIndex(index):
    return index


def nvmlDeviceGetFieldValues(handle, fields):
    value = SimpleNamespace(dVal=POWER_W * 1000.0 + handle)
    return [SimpleNamespace(nvmlReturn=0, valueType=0, value=value)]


def nvmlDeviceGetPowerUsage(handle):
    return int(POWER_W * 1000)


def nvmlDeviceGetMemoryInfo(handle):
    return SimpleNamespace(used=3 * 2**30, total=80 * 2**30)


def nvmlDeviceGetUtilizationRates(handle):
    return SimpleNamespace(gpu=50, memory=20)


def nvmlDeviceGetClockInfo(handle, clock):
    return 1980


def nvmlDeviceGetTemperature(handle, sensor):
    raise NVMLError(3)


def nvmlDeviceGetTotalEnergyConsumption(handle):
    return counter_mj(time.monotonic())


def counter_mj(t_s: float) -> int:
    """The counter at monotonic time t_s: the energy at 250 W up to the last 100 ms step."""
    return int(int(t_s / STEP_S) * STEP_S * POWER_W * 1000)
