"""The host source: process RSS and CPU time (psutil), CPU package energy from Linux RAPL.

RAPL energy comes only from /sys/class/powercap; where it cannot be read the reading raises
RaplUnavailable with the reason. Nothing is ever estimated from a TDP figure.
"""

from __future__ import annotations

import re
import resource
import sys
import threading
from pathlib import Path

import psutil

from .gpu import Unavailable

_PACKAGE_ZONE = re.compile(r"^(intel|amd)-rapl:\d+$")


class RaplUnavailable(Unavailable):
    """CPU package energy cannot be read here."""


def unwrap_delta(start: int, end: int, max_range: int) -> int:
    """Counter increase from start to end for a counter that wraps to 0 after max_range."""
    return end - start if end >= start else end + max_range - start


class HostSource:
    """Readings about this process and this machine's CPU packages.

    RAPL counters wrap (every few minutes to an hour, depending on load); `rapl_energy_j` keeps a
    running total that is correct as long as it is polled more often than one wrap period.
    """

    def __init__(self, powercap_root: Path | str = "/sys/class/powercap", pid: int | None = None):
        self._process = psutil.Process(pid)
        self._root = Path(powercap_root)
        self._lock = threading.Lock()
        self._last_uj: dict[Path, int] = {}
        self._max_uj: dict[Path, int] = {}
        self._total_uj = 0
        self._zones, self._rapl_reason = self._find_zones()

    def rss_bytes(self) -> int:
        return int(self._process.memory_info().rss)

    def rss_lifetime_peak_bytes(self) -> int | None:
        """The kernel's high-water mark of this process's RSS (this process only), if known."""
        if self._process.pid != psutil.Process().pid or sys.platform != "linux":
            return None
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux

    def cpu_time_s(self) -> float:
        times = self._process.cpu_times()
        return float(times.user + times.system)

    @property
    def rapl_reason(self) -> str | None:
        """Why RAPL cannot be read (None if it can)."""
        return self._rapl_reason

    @property
    def rapl_zones(self) -> list[str]:
        return [z.name for z in self._zones]

    def rapl_energy_j(self) -> float:
        """CPU package energy (all packages) since this source first read it, J."""
        if self._rapl_reason is not None:
            raise RaplUnavailable(self._rapl_reason)
        with self._lock:
            for zone in self._zones:
                now = self._read_uj(zone, "energy_uj")
                if zone in self._last_uj:
                    self._total_uj += unwrap_delta(self._last_uj[zone], now, self._max_range(zone))
                self._last_uj[zone] = now
            return self._total_uj / 1e6

    def _find_zones(self) -> tuple[list[Path], str | None]:
        if not self._root.is_dir():
            if sys.platform != "linux":
                return [], f"RAPL is read through Linux powercap; this is {sys.platform}"
            return [], (f"no powercap interface at {self._root}: this kernel exposes no RAPL "
                        "(intel_rapl driver not loaded, or a virtual machine)")
        zones = []
        for d in sorted(self._root.iterdir()):
            if not _PACKAGE_ZONE.match(d.name):
                continue
            try:
                name = (d / "name").read_text().strip()
            except OSError:
                continue
            if name.startswith("package"):
                zones.append(d)
        if not zones:
            return [], f"no RAPL package zone under {self._root}"
        for zone in zones:
            try:
                self._read_uj(zone, "energy_uj")
                self._max_range(zone)
            except RaplUnavailable as exc:
                return [], exc.reason
        return zones, None

    def _max_range(self, zone: Path) -> int:
        if zone not in self._max_uj:
            self._max_uj[zone] = self._read_uj(zone, "max_energy_range_uj")
        return self._max_uj[zone]

    @staticmethod
    def _read_uj(zone: Path, name: str) -> int:
        path = zone / name
        try:
            return int(path.read_text().strip())
        except PermissionError:
            raise RaplUnavailable(f"permission denied reading {path} (root only on most kernels)") from None
        except (OSError, ValueError) as exc:
            raise RaplUnavailable(f"cannot read {path}: {exc}") from None
