"""The real NVML code paths against a scripted pynvml: errors, fallbacks, CUDA_VISIBLE_DEVICES."""

import sys
import time
from types import SimpleNamespace

import pynvml
import pytest

from mmprof.errors import UserError
from mmprof.profiler import NvmlUnavailable, Profiler, open_gpus, system_info
from mmprof.profiler import nvml as nvml_mod
from mmprof.profiler.visible import visible_nvml_indices

UUIDS = ["GPU-11111111-aaaa", "GPU-22222222-bbbb", "GPU-33333333-cccc"]


def _err(code):
    return pynvml.NVMLError(code)


class FakeNvml:
    """Scripted answers for the pynvml functions NvmlGpu uses; handles are NVML indices."""

    def __init__(self, monkeypatch, uuids=UUIDS, init_error=None, fail=None, instant_return=0):
        self.uuids, self.fail, self.instant_return = uuids, fail or {}, instant_return
        self.energy_mj = [1_000_000 * (k + 1) for k in range(len(uuids))]
        self.t0 = time.monotonic()

        def init():
            if init_error is not None:
                raise _err(init_error)

        def guarded(name, fn):
            def call(*args):
                if name in self.fail:
                    raise _err(self.fail[name])
                return fn(*args)
            return call

        api = {
            "nvmlInit": init,
            "nvmlDeviceGetCount": lambda: len(self.uuids),
            "nvmlDeviceGetHandleByIndex": lambda k: k,
            "nvmlDeviceGetUUID": lambda h: self.uuids[h],
            "nvmlDeviceGetName": lambda h: "Fake H200",
            "nvmlSystemGetDriverVersion": lambda: "580.1",
            "nvmlDeviceGetFieldValues": self._fields,
            "nvmlDeviceGetPowerUsage": lambda h: 180_000,
            "nvmlDeviceGetTotalEnergyConsumption": self._energy,
            "nvmlDeviceGetMemoryInfo": lambda h: SimpleNamespace(used=5 * 2**30, total=141 * 2**30),
            "nvmlDeviceGetUtilizationRates": lambda h: SimpleNamespace(gpu=97, memory=40),
            "nvmlDeviceGetClockInfo": lambda h, kind: 1980,
            "nvmlDeviceGetTemperature": lambda h, sensor: 51,
            "nvmlDeviceGetEnforcedPowerLimit": lambda h: 700_000,
        }
        for name, fn in api.items():
            monkeypatch.setattr(pynvml, name, guarded(name, fn))
        monkeypatch.setattr(nvml_mod, "_INITIALISED", False)

    def _fields(self, handle, ids):
        value = SimpleNamespace(uiVal=250_000, dVal=250_000.0)
        return [SimpleNamespace(nvmlReturn=self.instant_return, valueType=1, value=value)]

    def _energy(self, handle):
        # 250 W since creation, like a counter that has run since the driver loaded
        return self.energy_mj[handle] + int(250_000 * (time.monotonic() - self.t0))


@pytest.fixture(autouse=True)
def _no_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_missing_binding(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(nvml_mod, "_INITIALISED", False)
    with pytest.raises(NvmlUnavailable, match="nvidia-ml-py is not installed"):
        open_gpus([0])
    with Profiler(device="cuda:0", idle_s=0.5) as prof:
        with prof.window("w") as w:
            pass
    assert "not installed" in w.measurement.unavailable["energy_j"]
    assert "not installed" in prof.gpu_unavailable


@pytest.mark.parametrize("code, text", [
    (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "no NVML library"),
    (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "driver is not loaded"),
    (pynvml.NVML_ERROR_NO_PERMISSION, "permission denied"),
], ids=["no-library", "no-driver", "no-permission"])
def test_init_failures_map_to_reasons(monkeypatch, code, text):
    FakeNvml(monkeypatch, init_error=code)
    with pytest.raises(NvmlUnavailable, match=text):
        open_gpus(None)
    info = system_info()
    assert info["gpus"] == [] and text in info["gpu_unavailable"]


def test_no_device(monkeypatch):
    FakeNvml(monkeypatch, uuids=[])
    with pytest.raises(NvmlUnavailable, match="no NVIDIA GPU"):
        open_gpus(None)


def test_readings_and_units(monkeypatch):
    FakeNvml(monkeypatch)
    (gpu,) = open_gpus([1])
    assert (gpu.index, gpu.nvml_index) == (1, 1)
    assert gpu.power_instant_w() == 250.0
    assert gpu.power_usage_w() == 180.0
    assert gpu.memory_used_bytes() == 5 * 2**30
    assert gpu.utilization_pct() == (97.0, 40.0)
    assert gpu.sm_clock_mhz() == 1980.0 and gpu.temperature_c() == 51.0
    assert gpu.power_limit_w() == 700.0
    info = system_info()
    assert [g["index"] for g in info["gpus"]] == [0, 1, 2]
    assert info["gpus"][0]["instant_power_field"] is True and info["gpus"][0]["energy_counter"] is True
    assert info["gpus"][0]["total_mem_gib"] == pytest.approx(141.0)


def test_instant_field_not_supported_falls_back_to_power_usage(monkeypatch):
    FakeNvml(monkeypatch, instant_return=pynvml.NVML_ERROR_NOT_SUPPORTED)
    (gpu,) = open_gpus([0])
    with pytest.raises(NvmlUnavailable, match="not supported"):
        gpu.power_instant_w()
    with Profiler(device="cuda:0", sample_hz=200, idle_s=0) as prof:
        with prof.window("w") as w:
            time.sleep(0.1)
    assert prof.power_sources == {0: "average"}
    assert w.measurement.power_avg_w == pytest.approx(180.0)
    assert system_info()["gpus"][0]["instant_power_field"] is False


def test_counter_permission_denied_keeps_the_integral(monkeypatch):
    FakeNvml(monkeypatch, fail={"nvmlDeviceGetTotalEnergyConsumption": pynvml.NVML_ERROR_NO_PERMISSION})
    with Profiler(device="cuda:0", sample_hz=200, idle_s=0.1) as prof:
        with prof.window("w") as w:
            time.sleep(0.2)
    m = w.measurement
    assert m.energy_j is None and "permission denied" in m.unavailable["energy_j"]
    assert m.energy_integral_j == pytest.approx(250.0 * m.duration_s, rel=1e-6)
    assert m.nvml_mem_used_gib == pytest.approx(5.0)
    assert prof.idle_power_w == pytest.approx(250.0)


def test_counter_energy_through_nvml(monkeypatch):
    FakeNvml(monkeypatch)
    with Profiler(device="cuda:0", sample_hz=100, idle_s=0) as prof:
        with prof.window("w") as w:
            time.sleep(0.2)
    assert w.measurement.energy_j == pytest.approx(250.0 * w.measurement.duration_s, rel=0.05)


def test_permission_denied_on_memory_is_reported(monkeypatch):
    FakeNvml(monkeypatch, fail={"nvmlDeviceGetMemoryInfo": pynvml.NVML_ERROR_NO_PERMISSION})
    with Profiler(device="cuda:0", sample_hz=200, idle_s=0) as prof:
        with prof.window("w") as w:
            time.sleep(0.05)
    assert "permission denied" in w.measurement.unavailable["nvml_mem_used_gib"]


@pytest.mark.parametrize("env, want", [
    (None, [0, 1, 2]),
    ("2,0", [2, 0]),
    ("1, 2", [1, 2]),
    ("1,foo,0", [1]),          # CUDA stops at the first invalid entry
    ("0,7,1", [0]),            # ... and at an ordinal that does not exist
    ("GPU-3333,GPU-1", [2, 0]),  # unique UUID prefixes
    ("GPU-,1", []),            # an ambiguous prefix is invalid
    ("1,1", [1]),
    ("", []),
], ids=repr)
def test_visible_devices_mapping(env, want):
    assert visible_nvml_indices(env, UUIDS) == want


def test_mig_instances_are_refused():
    with pytest.raises(NvmlUnavailable, match="MIG"):
        visible_nvml_indices("MIG-1234", UUIDS)


def test_open_gpus_honours_cuda_visible_devices(monkeypatch):
    FakeNvml(monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-33333333,0")
    gpus = open_gpus(None)
    assert [(g.index, g.nvml_index) for g in gpus] == [(0, 2), (1, 0)]
    assert open_gpus([1])[0].uuid() == UUIDS[0]
    with pytest.raises(UserError, match="not visible"):
        open_gpus([2])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(NvmlUnavailable, match="hides every GPU"):
        open_gpus(None)


@pytest.mark.parametrize("value, enabled", [(None, True), ("1", True), ("0", False), (" 0 ", False)])
def test_meta_records_the_int8_forward_switch_and_every_mmprof_variable(monkeypatch, value, enabled):
    FakeNvml(monkeypatch)
    monkeypatch.delenv("MMPROF_INT8_FORWARD", raising=False)
    if value is not None:
        monkeypatch.setenv("MMPROF_INT8_FORWARD", value)
    info = system_info()
    assert info["int8_forward"] is enabled
    assert info["mmprof_environment"].get("MMPROF_INT8_FORWARD") == value


def test_a_malformed_int8_forward_switch_is_a_user_error(monkeypatch):
    from mmprof.errors import UserError

    FakeNvml(monkeypatch)
    monkeypatch.setenv("MMPROF_INT8_FORWARD", "yes")
    with pytest.raises(UserError, match="MMPROF_INT8_FORWARD='yes': must be 0 or 1"):
        system_info()
