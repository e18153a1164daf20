"""The sampling process's body: NVML readings at a fixed rate, appended as binary records to a file.

Run as a script by sampler_process.py (by path, CONFIG_JSON its last argument), so it imports only
the standard library and pynvml: no torch, no mmprof. It opens its own NVML handles (NVML handles
belong to the process that made them), pins itself to one CPU, and stops when its stdin reaches end
of file (the parent closed it, or died). It lowers its own priority (`nice`: a workload sharing its CPU
comes first). One record per GPU per tick, `RECORD` (little-endian
doubles): time on CLOCK_MONOTONIC (shared by every process of the host), GPU position, then the
fields of `FIELDS`, NaN where not read this tick or failed. A reading that fails for good is written
once to stderr as `position<TAB>field<TAB>NVML code` and not asked again. On leaving, it writes to
`stats_path` (JSON) how many times it made each NVML call and the seconds they took in all, so a
check can say which reading costs what.

Each field is read every `every[field]` ticks (1 where not named); a GPU at position p reads a field
on the ticks n with (n + p) % every == 0, so two GPUs' slow energy-counter reads fall on different ticks.
"""

from __future__ import annotations

import json
import math
import os
import select
import struct
import sys
import time

FIELDS = ("power_w", "mem_used_bytes", "gpu_util_pct", "mem_util_pct", "sm_clock_mhz", "temp_c", "energy_mj")
RECORD = struct.Struct("<" + "d" * (2 + len(FIELDS)))
INSTANT_POWER_FIELD = 186  # NVML_FI_DEV_POWER_INSTANT


def _readers(nvml, handle, power_source: str):
    def instant():
        (value,) = nvml.nvmlDeviceGetFieldValues(handle, [INSTANT_POWER_FIELD])
        if value.nvmlReturn != 0:
            raise nvml.NVMLError(value.nvmlReturn)
        member = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}
        return (float(getattr(value.value, member[value.valueType])) / 1000.0,)

    def utilization():
        rates = nvml.nvmlDeviceGetUtilizationRates(handle)
        return float(rates.gpu), float(rates.memory)

    power = {"instant": instant,
             "average": lambda: (nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,)}.get(power_source)
    return {
        ("power_w",): power,
        ("mem_used_bytes",): lambda: (float(nvml.nvmlDeviceGetMemoryInfo(handle).used),),
        ("gpu_util_pct", "mem_util_pct"): utilization,
        ("sm_clock_mhz",): lambda: (float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),),
        ("temp_c",): lambda: (float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),),
        ("energy_mj",): lambda: (float(nvml.nvmlDeviceGetTotalEnergyConsumption(handle)),),
    }


def main(config: dict) -> int:
    import pynvml as nvml

    if config.get("cpu") is not None and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {config["cpu"]})
        except OSError:
            pass
    if config.get("nice"):
        try:
            os.nice(config["nice"])
        except OSError:
            pass
    nvml.nvmlInit()
    every = {k: max(1, int(v)) for k, v in config["every"].items()}
    permanent = set(config["permanent_codes"])
    calls = {f: [0, 0.0] for f in FIELDS}   # first field of a reading -> [calls, seconds]
    gpus = []
    for pos, (index, source) in enumerate(zip(config["nvml_indices"], config["power_sources"])):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        gpus.append((pos, _readers(nvml, handle, source)))
    out = os.open(config["path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    period_s, n = 1.0 / config["hz"], 0
    next_t = time.monotonic()
    while True:
        chunk = []
        for pos, readers in gpus:
            t = time.monotonic()
            row = dict.fromkeys(FIELDS, math.nan)
            for names, read in readers.items():
                if read is None or (n + pos) % every.get(names[0], 1):
                    continue
                t_call = time.perf_counter()
                try:
                    row.update(zip(names, read()))
                except nvml.NVMLError as exc:
                    code = getattr(exc, "value", 999)
                    if code in permanent:
                        readers[names] = None
                        for name in names:
                            print(f"{pos}\t{name}\t{code}", file=sys.stderr, flush=True)
                finally:
                    spent = calls[names[0]]
                    spent[0] += 1
                    spent[1] += time.perf_counter() - t_call
            chunk.append(RECORD.pack(t, pos, *(row[f] for f in FIELDS)))
        os.write(out, b"".join(chunk))
        n += 1
        next_t += period_s
        delay = next_t - time.monotonic()
        if delay < 0:  # fell behind: do not burst
            next_t, delay = time.monotonic(), 0.0
        if select.select([sys.stdin], [], [], delay)[0] and not sys.stdin.buffer.read1(4096):
            break  # end of file on stdin: the parent asked us to stop (or is gone)
    os.close(out)
    if config.get("stats_path"):
        with open(config["stats_path"], "w") as f:
            json.dump({"ticks": n, "calls": {k: v for k, v in calls.items() if v[0]}}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[-1])))
