"""The documented, stable column schema of measurements.csv, per command.

Every row starts with `status` (ok | oom | error), then the spec columns (what was measured),
then the metric columns (units in every name), then `note` (why a value is empty, or what failed).
Empty cells mean "not measured"; the note says why.
"""

from __future__ import annotations

STATUS_VALUES = ("ok", "oom", "error")

COMMON_HEAD = {"status": "ok | oom | error"}
COMMON_TAIL = {"note": "free text: why values are empty, the error message, or flags"}

SPEC_COLUMNS: dict[str, dict[str, str]] = {
    "train-memory": {
        "arch": "mmfree | transformer",
        "size": "size preset (tiny, 370m, 1.3b, 2.7b, 13b), or the --checkpoint given",
        "bitlinear": "vanilla | ref-fused | fused | naive: the BitLinear implementation of the whole model "
                     "(README table; empty for transformer)",
        "batch": "sequences per step",
        "seq": "tokens per sequence",
        "steps": "timed optimizer steps",
        "warmup": "untimed warm-up steps",
        "device": "cuda:N | cpu | meta",
        "precision": "bf16-autocast | bf16 | fp32 (fsdp on cuda: bf16-autocast is FSDP2 bf16 params, fp32 reduce)",
        "checkpointing": "none | layer (every block's activations recomputed in backward)",
        "shard": "none | fsdp (FSDP2 fully_shard, one process per GPU)",
        "world_size": "processes in the job",
        "rank": "rank of the row, or 'all' for a job summary (and for a sharded estimate)",
        "local_gpu": "CUDA index of the rank's GPU (empty on cpu/meta and in summaries)",
        "row_kind": "rank (one process) | summary (whole job: max memory, summed energy, job tokens/s)",
        "estimated": "1 if the memory figures are an estimate on fake/meta tensors",
    },
    "decode-power": {
        "arch": "mmfree | transformer",
        "size": "size preset, or the --checkpoint given (folder or Hub repo id)",
        "weights": "fake-quant | packed | bf16",
        "batch": "sequences decoded together",
        "prompt_len": "prompt tokens per sequence",
        "new_tokens": "tokens generated per sequence per repeat",
        "repeats": "energy windows measured (each one continuous run of generations, >= --min-window-s)",
        "device": "cuda:N | cpu",
        "precision": "bf16 | fp32",
        "cuda_graph": "1 if each decode step replayed a captured CUDA graph, 0 if launched eagerly",
        "shard": "none | replicate (torchrun: every rank decodes its own batch with a full replica)",
        "world_size": "processes in the job",
        "rank": "rank of the row, or 'all' for a job summary",
        "local_gpu": "CUDA index of the rank's GPU (empty on cpu and in summaries)",
        "row_kind": "rank (one process) | summary (whole job: summed tokens/s and energy)",
    },
    "profiler-check": {
        "check": "which profiler check this row is",
        "device": "cuda:N | cpu",
    },
}

_MEMORY = {
    "peak_alloc_gib": "CUDA allocator peak allocated during the measured phase, GiB",
    "peak_reserved_gib": "CUDA allocator peak reserved during the measured phase, GiB",
    "nvml_mem_used_gib": "peak NVML device memory used (includes the CUDA context), GiB",
}
_POWER = {
    "power_avg_w": "mean sampled GPU power over the energy window (decode-power: median over its windows), W",
    "power_peak_w": "highest sampled GPU power over the energy window, W",
    "idle_power_w": "GPU idle power: decode-power the mean of the idle windows before and after the row; train-memory the baseline before the sweep, W",
    "energy_window_s": "length of the energy window (decode-power: its windows summed), s",
    "energy_integral_j": "integral of sampled power over the span the counter's two readings cover (cross-check of the counter), J",
    "n_power_samples": "power samples taken in the window",
    "n_counter_updates": "NVML energy counter updates seen inside the window (fewest over windows and GPUs)",
    "counter_integral_diff_pct": "power integral minus counter energy, % of the counter (largest over windows)",
    "low_confidence": "1 if a window was shorter than --min-window-s, spanned fewer than 20 counter updates, or its counter and power integral differ by more than 5% (the note says which)",
}
_REPEATS = {
    "energy_window_min_s": "shortest energy window of the row, s",
    "j_per_token_min": "lowest J/token over the row's windows, J",
    "j_per_token_max": "highest J/token over the row's windows, J",
    "power_avg_min_w": "lowest mean power over the row's windows, W",
    "power_avg_max_w": "highest mean power over the row's windows, W",
    "idle_drift_w": "idle power after the row minus idle power before it, W",
}
_HOST = {
    "host_rss_peak_gib": "peak resident set size of the process, GiB",
    "cpu_util_pct": "mean CPU utilisation of the process over the window, % of one core",
    "cpu_energy_j": "CPU package energy from RAPL over the window, J (empty when unreadable)",
}

METRIC_COLUMNS: dict[str, dict[str, str]] = {
    "train-memory": {
        **_MEMORY,
        "param_gib": "parameters (master weights), GiB",
        "grad_gib": "gradients, GiB",
        "optim_gib": "optimizer state, GiB",
        "act_mem_gib": "peak allocated minus what was allocated before the step, GiB",
        "tracker_act_gib": "live-tensor tracker: activations saved for backward at the peak, GiB",
        "tracker_temp_gib": "live-tensor tracker: other temporaries at the peak, GiB",
        "est_peak_alloc_gib": "peak allocated estimated on fake tensors with no GPU, GiB",
        "est_error_pct": "estimate minus measured peak allocated, % of measured",
        "step_time_s": "median step time, s",
        "step_time_iqr_s": "interquartile range of step time, s",
        "n_steps": "timed steps behind the median",
        "tokens_per_s": "batch*seq / median step time",
        "mfu": "model FLOPs (6*N*tokens, plus attention) over the GPU's dense bf16 peak",
        "energy_per_step_j": "GPU energy per step from the NVML counter, J",
        "energy_above_idle_per_step_j": "energy per step minus idle power times step time, J",
        "j_per_token": "GPU energy per trained token, J",
        "j_per_token_above_idle": "GPU energy above idle per trained token, J",
        **_POWER,
        **_HOST,
    },
    "decode-power": {
        "ttft_s": "time to first token (prefill plus one sampling step), s",
        "prefill_s": "prefill time, s",
        "latency_p50_ms": "per-token decode latency, median, ms",
        "latency_p90_ms": "per-token decode latency, 90th percentile, ms",
        "latency_p99_ms": "per-token decode latency, 99th percentile, ms",
        "tokens_per_s": "generated tokens per second over the timed decode steps (all sequences)",
        "n_tokens_measured": "tokens decoded inside the energy windows, new_tokens - 1 decode steps per pass (all sequences)",
        **_MEMORY,
        "weights_gib": "bytes of model weights held on the device, GiB",
        "energy_j": "GPU energy of the energy windows (generations back to back) from the NVML counter, summed, J",
        "energy_above_idle_j": "energy_j minus the row's idle power times the windows, J",
        "j_per_token": "median over the windows of window energy / tokens generated in it, J",
        "j_per_token_above_idle": "median over the windows of energy above idle / tokens, J",
        **_POWER,
        **_REPEATS,
        "bytes_per_step_gib": "weight bytes a decode step reads (every weight but the embedding table, plus one embedding row per sequence), GiB",
        "bandwidth_gbps": "bytes_per_step_gib times steps per second, GB/s",
        "bandwidth_frac": "bandwidth_gbps over the GPU's measured copy bandwidth",
        "ternary_zero_frac": "MatMul-free --checkpoint: fraction of BitLinear weights quantised to 0 (mmprof inspect: per BitLinear)",
        **_HOST,
    },
    "profiler-check": {
        "value": "the measured figure",
        "unit": "unit of value",
        "reference": "the figure it is compared with",
        "diff_pct": "value against reference, %",
        "target": "the target the check is held to",
        "passed": "1 if the target was met",
    },
}

# Columns `export` puts on every row from the run's meta.json.
PROVENANCE_COLUMNS = {
    "run_id": "run folder name",
    "command": "mmprof command that wrote the run",
    "gpu": "GPU name (empty without one)",
    "driver": "NVIDIA driver version",
    "mmprof_version": "mmprof version that measured",
}


# Cell types read back from a CSV are checked against (mmprof.results.validate). Spec columns are
# text unless listed; metric columns are finite numbers unless listed. An empty cell always passes.
INT_COLUMNS = {"batch", "seq", "steps", "warmup", "world_size", "local_gpu", "prompt_len", "new_tokens",
               "repeats", "n_steps", "n_tokens_measured", "n_power_samples"}
FLAG_COLUMNS = {"estimated", "cuda_graph", "low_confidence", "passed"}   # 0 | 1
RANK_COLUMNS = {"rank"}                                                  # an integer or 'all'
TEXT_METRIC_COLUMNS = {"unit", "target"}


def column_type(column: str) -> str:
    """int | flag | rank | float | text: what a stored cell of `column` must parse as."""
    for kind, names in (("int", INT_COLUMNS), ("flag", FLAG_COLUMNS), ("rank", RANK_COLUMNS)):
        if column in names:
            return kind
    if column in TEXT_METRIC_COLUMNS:
        return "text"
    if any(column in cols for cols in METRIC_COLUMNS.values()):
        return "float"
    return "text"


def columns(command: str) -> list[str]:
    """Ordered CSV header of a command's measurements.csv."""
    if command not in SPEC_COLUMNS:
        raise KeyError(f"no schema for command {command!r}")
    return [*COMMON_HEAD, *SPEC_COLUMNS[command], *METRIC_COLUMNS[command], *COMMON_TAIL]


def spec_columns(command: str) -> list[str]:
    return list(SPEC_COLUMNS.get(command, {}))


def metric_columns(command: str) -> list[str]:
    return list(METRIC_COLUMNS.get(command, {}))


def describe(command: str) -> dict[str, str]:
    return {**COMMON_HEAD, **SPEC_COLUMNS[command], **METRIC_COLUMNS[command], **COMMON_TAIL}
