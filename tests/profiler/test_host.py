"""Host readings: RAPL from a scripted powercap tree (wrap, unreadable), RSS and CPU time."""

import random
from pathlib import Path

import pytest

from mmprof.profiler import HostSource, RaplUnavailable


def _zone(root: Path, name: str, label: str, energy_uj: int, max_uj: int) -> Path:
    z = root / name
    z.mkdir(parents=True)
    (z / "name").write_text(label + "\n")
    (z / "energy_uj").write_text(f"{energy_uj}\n")
    (z / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return z


def test_rapl_sums_packages_and_unwraps(tmp_path):
    rng = random.Random()
    max_uj = rng.randint(10**9, 10**11)
    start0, start1 = max_uj - rng.randint(1, 10**6), rng.randint(0, 10**6)
    z0 = _zone(tmp_path, "intel-rapl:0", "package-0", start0, max_uj)
    z1 = _zone(tmp_path, "intel-rapl:1", "package-1", start1, max_uj)
    _zone(tmp_path, "intel-rapl:0:0", "core", 5, max_uj)  # a sub-zone: inside package-0 already
    _zone(tmp_path, "intel-rapl-mmio:0", "package-0", 7, max_uj)  # the same package via MMIO
    host = HostSource(powercap_root=tmp_path)
    assert host.rapl_reason is None and host.rapl_zones == ["intel-rapl:0", "intel-rapl:1"]
    assert host.rapl_energy_j() == 0.0
    d0, d1 = rng.randint(2 * 10**6, 10**8), rng.randint(1, 10**8)
    (z0 / "energy_uj").write_text(str((start0 + d0) % max_uj))  # wraps past max_energy_range_uj
    (z1 / "energy_uj").write_text(str(start1 + d1))
    assert host.rapl_energy_j() == pytest.approx((d0 + d1) / 1e6)
    (z0 / "energy_uj").write_text(str((start0 + d0 + 1_000_000) % max_uj))
    assert host.rapl_energy_j() == pytest.approx((d0 + d1 + 1_000_000) / 1e6)


def test_rapl_permission_denied(tmp_path, monkeypatch):
    z = _zone(tmp_path, "intel-rapl:0", "package-0", 10, 10**9)
    real = Path.read_text

    def guarded(self, *a, **k):
        if self == z / "energy_uj":
            raise PermissionError(13, "Permission denied")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", guarded)
    host = HostSource(powercap_root=tmp_path)
    assert "permission denied" in host.rapl_reason
    with pytest.raises(RaplUnavailable, match="permission denied"):
        host.rapl_energy_j()


def test_rapl_absent(tmp_path):
    assert "no powercap" in HostSource(powercap_root=tmp_path / "missing").rapl_reason
    assert "no RAPL package zone" in HostSource(powercap_root=tmp_path).rapl_reason


def test_rss_and_cpu_time_move_with_work():
    host = HostSource(powercap_root="/nonexistent")
    rss0, cpu0 = host.rss_bytes(), host.cpu_time_s()
    block = bytearray(64 * 2**20)
    for k in range(0, len(block), 4096):
        block[k] = 1
    sum(i * i for i in range(300_000))
    assert host.rss_bytes() > rss0 + 32 * 2**20
    assert host.cpu_time_s() > cpu0
    peak = host.rss_lifetime_peak_bytes()
    assert peak is None or peak >= host.rss_bytes() - 2**20
    del block
