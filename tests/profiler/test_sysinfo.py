"""system_info: what `mmprof env` and meta.json report."""

import json

from mmprof.profiler import HostSource, system_info

from .fakes import ScriptedGpu


def test_system_info_with_scripted_gpus_is_json_ready(tmp_path):
    gpus = [ScriptedGpu(0), ScriptedGpu(1, instant=False, counter=False)]
    info = system_info(gpu_sources=gpus, host=HostSource(powercap_root=tmp_path))
    json.dumps(info)
    g0, g1 = info["gpus"]
    assert (g0["instant_power_field"], g0["energy_counter"]) == (True, True)
    assert (g1["instant_power_field"], g1["energy_counter"]) == (False, False)
    assert g1["power_reading"] == "average" and "not supported" in g1["power_note"]
    assert g0["total_mem_gib"] == 80.0 and g0["power_limit_w"] == 700.0
    assert info["gpu_unavailable"] is None
    assert info["rapl"]["readable"] is False and "no RAPL package zone" in info["rapl"]["reason"]
    assert info["cpu"]["cores_logical"] >= 1 and info["cpu"]["ram_gib"] > 0
    assert set(info["versions"]) >= {"python", "torch", "triton", "cuda", "mmprof"}
