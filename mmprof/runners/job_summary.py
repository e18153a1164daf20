"""A torchrun job's summary row from its rank rows, and one power trace from every rank's.

train-memory summaries: memory (peak allocated/reserved, NVML used, shards, activations) is the
highest rank's; step time the slowest rank's median; energy, average and idle power, the power
integral, samples, host RSS and CPU use are summed over the ranks (GPUs); tokens_per_s, j_per_token
and MFU are the whole job's. decode-power summaries: tokens, tokens/s, energy and bandwidth summed
(the replicas decode at the same time), latencies and memory the worst rank's. In both, power_peak_w
is the highest single GPU's and cpu_energy_j the highest rank's reading (RAPL counts the whole host's
packages, which every rank on one host reads over the same window).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

_HOST_SUM = ("power_avg_w", "idle_power_w", "energy_integral_j", "n_power_samples", "host_rss_peak_gib",
             "cpu_util_pct")
_HOST_MAX = ("peak_alloc_gib", "peak_reserved_gib", "nvml_mem_used_gib", "energy_window_s", "power_peak_w",
             "low_confidence", "cpu_energy_j")
TRAIN_MAX = (*_HOST_MAX, "param_gib", "grad_gib", "optim_gib", "act_mem_gib", "step_time_s", "step_time_iqr_s")
TRAIN_SUM = (*_HOST_SUM, "energy_per_step_j", "energy_above_idle_per_step_j")
DECODE_MAX = (*_HOST_MAX, "ttft_s", "prefill_s", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms",
              "weights_gib", "bytes_per_step_gib")
DECODE_SUM = (*_HOST_SUM, "tokens_per_s", "n_tokens_measured", "energy_j", "energy_above_idle_j", "bandwidth_gbps")


def aggregate(rank_rows: list[dict], spec_row: dict, max_cols, sum_cols) -> dict:
    """spec_row's columns, then each max column's highest value and each sum column's total over ranks.
    A sum that some rank lacks is left empty: a total over part of the GPUs would mislead."""
    out = {**spec_row, "status": "ok"}
    for col in max_cols:
        vals = [r[col] for r in rank_rows if r.get(col) is not None]
        out[col] = max(vals) if vals else None
    for col in sum_cols:
        vals = [r[col] for r in rank_rows if r.get(col) is not None]
        out[col] = sum(vals) if vals and len(vals) == len(rank_rows) else None
    return out


def summarize(rank_rows: list[dict], spec_row: dict, tokens_per_rank_step: int,
              flops: tuple[float, float | None]) -> dict:
    """The train-memory `all` row of one configuration."""
    n = len(rank_rows)
    out = aggregate(rank_rows, spec_row, TRAIN_MAX, TRAIN_SUM)
    out["n_steps"] = rank_rows[0].get("n_steps")
    job_tokens = n * tokens_per_rank_step
    if out["step_time_s"]:
        out["tokens_per_s"] = job_tokens / out["step_time_s"]
        flops_per_token, peak_tflops = flops
        if peak_tflops:
            out["mfu"] = flops_per_token * out["tokens_per_s"] / (n * peak_tflops * 1e12)
    if out["energy_per_step_j"] is not None:
        out["j_per_token"] = out["energy_per_step_j"] / job_tokens
    if out["energy_above_idle_per_step_j"] is not None:
        out["j_per_token_above_idle"] = out["energy_above_idle_per_step_j"] / job_tokens
    out["note"] = (f"job of {n} ranks: memory of the highest rank, energy and power summed over {n} GPUs, "
                   "tokens_per_s of every rank together, step time of the slowest rank")
    return out


def summarize_decode(rank_rows: list[dict], spec_row: dict, copy_gbps: float | None) -> dict:
    """The decode-power `all` row: N replicas decoding side by side."""
    n = len(rank_rows)
    out = aggregate(rank_rows, spec_row, DECODE_MAX, DECODE_SUM)
    tokens = out["n_tokens_measured"]
    if out["energy_j"] is not None and tokens:
        out["j_per_token"] = out["energy_j"] / tokens
    if out["energy_above_idle_j"] is not None and tokens:
        out["j_per_token_above_idle"] = out["energy_above_idle_j"] / tokens
    if out["bandwidth_gbps"] is not None and copy_gbps:
        out["bandwidth_frac"] = out["bandwidth_gbps"] / (n * copy_gbps)
    out["note"] = (f"job of {n} replicas: tokens, tokens/s, energy and power summed over {n} GPUs, "
                   "latency and memory of the worst rank")
    return out


def merge_traces(path: Path, texts: list[list[str]]) -> None:
    """Write every rank's power trace as one file (rows by time, then GPU) and rank 0's phases beside it.

    `texts[r]` is rank r's [power_trace.csv, phases.csv]; each rank's times count from its own
    Profiler's start, which every rank entered right after the same barrier."""
    header, rows = None, []
    for trace, _ in texts:
        reader = csv.reader(io.StringIO(trace))
        head = next(reader, None)
        if head is None:
            continue
        header = header or head
        rows += [r for r in reader if r]
    rows.sort(key=lambda r: (float(r[0]), int(r[1])))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    phases = texts[0][1] if texts else ""
    name = path.name.replace("power_trace", "phases") if "power_trace" in path.name else "phases.csv"
    path.with_name(name).write_text(phases)
