"""Measuring: NVML and host sampling, energy windows, memory tracking, timing.

    from mmprof.profiler import Profiler
"""

from .bandwidth import copy_bandwidth_gbps
from .device import cuda_index, synchronize
from .fake import fake_tensor_mode
from .gpu import GpuSource, NvmlUnavailable, Unavailable
from .host import HostSource, RaplUnavailable
from .measurement import GIB, Measurement
from .nvml import NvmlGpu, open_gpus
from .profiler import Profiler, WindowHandle
from .sysinfo import system_info
from .row_energy import MIN_COUNTER_UPDATES, MIN_WINDOW_S, IdleReading, RowIdle, row_energy
from .timing import Timer, TimingStats, time_fn
from .tracker import CATEGORIES, MemoryTracker
from .trace import Phase

__all__ = [
    "GIB", "MIN_COUNTER_UPDATES", "MIN_WINDOW_S", "IdleReading", "RowIdle", "Timer", "row_energy", "CATEGORIES", "GpuSource", "HostSource", "Measurement", "MemoryTracker", "NvmlGpu", "NvmlUnavailable",
    "Phase", "Profiler", "RaplUnavailable", "TimingStats", "Unavailable", "WindowHandle", "copy_bandwidth_gbps", "cuda_index",
    "fake_tensor_mode", "open_gpus", "synchronize", "system_info", "time_fn",
]
