"""What one measured window produced: a plain dataclass with units in every field name."""

from __future__ import annotations

from dataclasses import dataclass, field

from .row_energy import counter_integral_diff_pct

GIB = 2**30  # bytes in a GiB: every *_gib figure is bytes / GIB


@dataclass
class Measurement:
    name: str
    duration_s: float
    energy_j: float | None = None  # NVML counter, summed over GPUs
    energy_j_by_gpu: dict[int, float] = field(default_factory=dict)
    energy_integral_j: float | None = None  # integral of sampled power, summed over GPUs
    energy_above_idle_j: float | None = None
    idle_power_w: float | None = None
    power_avg_w: float | None = None
    power_peak_w: float | None = None
    n_samples: int = 0
    n_power_updates: int = 0
    n_counter_updates: int | None = None  # counter changes seen by the sampler inside the window (fewest GPU)
    low_confidence: bool = True
    confidence_reasons: list[str] = field(default_factory=list)  # why low_confidence (row_energy's rule)
    peak_alloc_gib: float | None = None
    peak_reserved_gib: float | None = None
    nvml_mem_used_gib: float | None = None  # peak over samples, highest GPU
    host_rss_peak_gib: float | None = None
    cpu_util_pct: float | None = None  # % of one core
    cpu_energy_j: float | None = None
    t_start_s: float = 0.0  # window edges on the profiler's clock (0 = profiler start)
    t_end_s: float = 0.0
    unavailable: dict[str, str] = field(default_factory=dict)  # field -> why it is empty
    notes: list[str] = field(default_factory=list)  # caveats about fields that do have values

    def row(self) -> dict[str, float | int | None]:
        """The power, memory and host columns of mmprof.results.schema (None = empty cell)."""
        return {
            "peak_alloc_gib": self.peak_alloc_gib,
            "peak_reserved_gib": self.peak_reserved_gib,
            "nvml_mem_used_gib": self.nvml_mem_used_gib,
            "power_avg_w": self.power_avg_w,
            "power_peak_w": self.power_peak_w,
            "idle_power_w": self.idle_power_w,
            "energy_window_s": self.duration_s,
            "energy_integral_j": self.energy_integral_j,
            "n_power_samples": self.n_samples,
            "n_counter_updates": self.n_counter_updates,
            "counter_integral_diff_pct": counter_integral_diff_pct(self.energy_j, self.energy_integral_j),
            "low_confidence": int(self.low_confidence) if self.power_measured else None,
            "host_rss_peak_gib": self.host_rss_peak_gib,
            "cpu_util_pct": self.cpu_util_pct,
            "cpu_energy_j": self.cpu_energy_j,
        }

    @property
    def power_measured(self) -> bool:
        """Whether the window has any GPU energy or power reading (low_confidence is empty without)."""
        return self.energy_j is not None or self.energy_integral_j is not None

    def note(self) -> str:
        """One line for the CSV `note` column: caveats, then why fields are empty."""
        by_reason: dict[str, list[str]] = {}
        for key, reason in self.unavailable.items():
            by_reason.setdefault(reason, []).append(key)
        parts = [*self.notes, *(f"{', '.join(keys)} empty: {why}" for why, keys in by_reason.items())]
        return "; ".join(parts)
