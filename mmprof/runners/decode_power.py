"""`decode-power`: prefill, then token-by-token decoding, metered over steady-state decode windows."""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from mmprof.errors import UserError
from mmprof.profiler import (
    GIB,
    MIN_POWER_UPDATES,
    MIN_WINDOW_S,
    Measurement,
    Profiler,
    copy_bandwidth_gbps,
    cuda_index,
    synchronize,
)
from mmprof.runners.sweep import guarded, pending, release_memory
from mmprof.workloads import PackedMMFreeLM, build_model, load_checkpoint, make_decoder, streamed_bytes, weight_bytes
from mmprof.workloads.ternary_stats import ternary_stats, zero_fraction

KEY_COLUMNS = ["arch", "size", "weights", "batch", "prompt_len", "new_tokens", "device", "precision", "cuda_graph"]


@dataclass(frozen=True)
class DecodeSpec:
    sizes: tuple[str, ...] = ("1.3b",)
    archs: tuple[str, ...] = ("mmfree", "transformer")
    weights: str = "fake-quant"
    batch: int = 1
    prompt_len: int = 32
    new_tokens: int = 256
    repeats: int = 3
    device: str = "cpu"
    min_window_s: float = 2.0      # decode windows are added (more repeats) until this long in total
    max_repeats: int = 1000
    idle_s: float = 2.0
    sample_hz: float = 100.0
    seed: int = 0
    graph: bool | None = None      # CUDA graph per decode step; None: on CUDA devices
    checkpoint: str | None = None  # a checkpoint folder: its real weights are decoded (sizes: its name)
    prompt_ids: tuple[int, ...] | None = None   # a tokenised --prompt (else random ids, prompt_len long)

    @property
    def precision(self) -> str:
        return "bf16" if self.device.startswith("cuda") else "fp32"

    @property
    def cuda_graph(self) -> bool:
        return self.device.startswith("cuda") if self.graph is None else self.graph


def weights_for(arch: str, weights: str) -> str:
    """The transformer always decodes bf16 weights; the MatMul-free model fake-quant or packed."""
    if arch == "transformer":
        return "bf16"
    if weights == "bf16":
        raise UserError("--weights bf16 applies to the transformer; the MatMul-free model is fake-quant or packed")
    return weights


@dataclass(frozen=True)
class Config:
    arch: str
    size: str
    weights: str

    def spec_row(self, spec: DecodeSpec) -> dict:
        return {"arch": self.arch, "size": self.size, "weights": self.weights, "batch": spec.batch,
                "prompt_len": spec.prompt_len, "new_tokens": spec.new_tokens, "repeats": spec.repeats,
                "device": spec.device, "precision": spec.precision, "cuda_graph": int(spec.cuda_graph),
                "shard": "none", "world_size": 1, "rank": 0, "local_gpu": cuda_index(spec.device), "row_kind": "rank"}

    @property
    def label(self) -> str:
        return f"{self.arch} {self.size} {self.weights}"


def configs(spec: DecodeSpec) -> list[Config]:
    if spec.graph and not spec.device.startswith("cuda"):
        raise UserError("--graph needs a CUDA device; on the CPU each decode step is launched eagerly")
    return [Config(a, s, weights_for(a, spec.weights)) for s in spec.sizes for a in spec.archs]


class _TokenClock:
    """Per-token latencies: CUDA events read once at the end on GPU, the host clock elsewhere."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def intervals_s(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def _one_decode(dec, prompt, spec: DecodeSpec, prof: Profiler | None, label: str):
    """Prefill, then new_tokens - 1 greedy steps; returns (prefill_s, ttft_s, latencies, Measurement).

    The energy window covers the token-by-token steps only (the steady state), not the prefill."""
    synchronize(spec.device)
    if prof is not None:
        prof.mark(f"prefill {label}")
    t0 = time.perf_counter()
    logits = dec.prefill(prompt)
    synchronize(spec.device)
    prefill_s = time.perf_counter() - t0
    token = logits.argmax(-1)
    synchronize(spec.device)
    ttft_s = time.perf_counter() - t0
    clock = _TokenClock(spec.device)
    if prof is not None:
        prof.mark(None)
        prof.begin(f"decode {label}")
    clock.mark()
    for _ in range(spec.new_tokens - 1):
        token = dec.greedy_step(token)
        clock.mark()
    m = prof.end(f"decode {label}") if prof is not None else None
    return prefill_s, ttft_s, clock.intervals_s(), m


def measure(cfg: Config, spec: DecodeSpec, prof: Profiler, copy_gbps: float | None) -> dict:
    cuda = spec.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    if spec.checkpoint:
        model = load_checkpoint(spec.checkpoint, spec.device, dtype).eval()
        if getattr(model, "weights", None) == "packed" and cfg.weights != "packed":
            raise UserError(f"checkpoint {spec.checkpoint} holds packed weights: decode it with --weights packed")
    else:
        model = build_model(cfg.arch, cfg.size, bitlinear="fused", device=spec.device, dtype=dtype).eval()
    zeros = zero_fraction(ternary_stats(model)) if spec.checkpoint else None   # of the real weights
    if cfg.weights == "packed" and not isinstance(model, PackedMMFreeLM):
        model = PackedMMFreeLM.from_model(model)   # the bf16 weights are freed before anything is measured
        release_memory(spec.device)
    gen = torch.Generator(device="cpu").manual_seed(spec.seed)
    vocab = model.config.vocab_size
    if spec.prompt_ids is not None:
        prompt = torch.tensor([list(spec.prompt_ids)] * spec.batch, dtype=torch.long, device=spec.device)
    else:
        prompt = torch.randint(0, vocab, (spec.batch, spec.prompt_len), generator=gen).to(spec.device)
    dec = make_decoder(model, spec.batch, spec.prompt_len + spec.new_tokens, spec.device, spec.cuda_graph)
    with torch.inference_mode():
        _one_decode(dec, prompt, spec, None, "warm-up")     # also captures the CUDA graph
        prefills, ttfts, lat, ms = [], [], [], []
        n = 0
        with prof.window(f"all {cfg.label}") as whole:      # peak memory over prefills and decodes
            while n < spec.repeats or (sum(m.duration_s for m in ms) < spec.min_window_s
                                       and n < spec.max_repeats):
                p, t, l, m = _one_decode(dec, prompt, spec, prof, f"{cfg.label} #{n}")
                prefills.append(p)
                ttfts.append(t)
                lat += l
                ms.append(m)
                n += 1
    total = combine(ms)
    steps = n * (spec.new_tokens - 1)
    tokens = steps * spec.batch
    wbytes, step_bytes = weight_bytes(model), streamed_bytes(model, spec.batch)
    # percentiles 1..99 of the per-token latencies, interpolated between the measured values
    pct = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
    row = {
        "prefill_s": statistics.median(prefills), "ttft_s": statistics.median(ttfts),
        "latency_p50_ms": pct[49] * 1e3, "latency_p90_ms": pct[89] * 1e3,
        "latency_p99_ms": pct[98] * 1e3, "tokens_per_s": tokens / total["duration_s"],
        "n_tokens_measured": tokens, "weights_gib": wbytes / GIB, "bytes_per_step_gib": step_bytes / GIB,
        "peak_alloc_gib": whole.measurement.peak_alloc_gib,
        "peak_reserved_gib": whole.measurement.peak_reserved_gib, "ternary_zero_frac": zeros,
        **{k: v for k, v in total.items() if k != "duration_s"},
    }
    if row.get("energy_j") is not None:
        row["j_per_token"] = row["energy_j"] / tokens
        if row.get("energy_above_idle_j") is not None:
            row["j_per_token_above_idle"] = row["energy_above_idle_j"] / tokens
    if cuda:
        row["bandwidth_gbps"] = step_bytes * steps / total["duration_s"] / 1e9
        if copy_gbps:
            row["bandwidth_frac"] = row["bandwidth_gbps"] / copy_gbps
    del model, dec
    return row


def combine(ms: list[Measurement]) -> dict:
    """Sum energies and durations over several windows; power averaged by time, peaks maxed."""
    dur = sum(m.duration_s for m in ms)
    rows = [m.row() for m in ms]

    def total(attr):
        vals = [getattr(m, attr) for m in ms]
        return None if any(v is None for v in vals) else sum(vals)

    def peak(key):
        vals = [r.get(key) for r in rows if r.get(key) is not None]
        return max(vals) if vals else None

    avg_w = [(r.get("power_avg_w"), m.duration_s) for r, m in zip(rows, ms)]
    out = {
        "duration_s": dur, "energy_window_s": dur, "energy_j": total("energy_j"),
        "energy_above_idle_j": total("energy_above_idle_j"), "energy_integral_j": total("energy_integral_j"),
        "power_avg_w": (sum(p * d for p, d in avg_w) / dur) if all(p is not None for p, _ in avg_w) and dur else None,
        "power_peak_w": peak("power_peak_w"), "idle_power_w": rows[0].get("idle_power_w") if rows else None,
        "n_power_samples": sum(r.get("n_power_samples") or 0 for r in rows),
        "low_confidence": int(dur < MIN_WINDOW_S or (total("energy_integral_j") is not None and
                                                     sum(m.n_power_updates for m in ms) < MIN_POWER_UPDATES)),
        "nvml_mem_used_gib": peak("nvml_mem_used_gib"), "host_rss_peak_gib": peak("host_rss_peak_gib"),
        "cpu_util_pct": (sum(m.cpu_util_pct * m.duration_s for m in ms) / dur)
        if dur and all(m.cpu_util_pct is not None for m in ms) else None,
        "cpu_energy_j": total("cpu_energy_j"),
    }
    out["note"] = "; ".join(dict.fromkeys(m.note() for m in ms if m.note()))   # distinct, in order
    return out


def run(spec: DecodeSpec, emit: Callable[[dict], None], *, skip: Iterable[tuple] = (),
        key: Callable[[dict], tuple] | None = None, trace_path=None,
        on_start: Callable[[Config], None] | None = None) -> list[dict]:
    rows = []
    # events and synchronisation go to the measured GPU, also when it is not the current one
    on_gpu = torch.cuda.device(spec.device) if spec.device.startswith("cuda") else contextlib.nullcontext()
    with on_gpu, Profiler(device=spec.device, sample_hz=spec.sample_hz, idle_s=spec.idle_s,
                          trace_path=trace_path) as prof:
        copy_gbps = copy_bandwidth_gbps(spec.device) if spec.device.startswith("cuda") else None
        for cfg, row in pending(configs(spec), lambda c: c.spec_row(spec), key=key, skip=skip, on_start=on_start):
            row.update(guarded(lambda: measure(cfg, spec, prof, copy_gbps), spec.device))
            emit(row)
            rows.append(row)
    return rows
