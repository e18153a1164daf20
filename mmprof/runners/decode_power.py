"""`decode-power`: prefill, then token-by-token decoding; timed generations for latency and speed, and
`repeats` continuous energy windows of decode steps only (each >= min_window_s) for energy: the
steps of positions prompt_len..prompt_len + new_tokens - 1 replayed back to back, the decoder rewound
to the end of the prompt between passes (no prefill, no gap, no counter read inside a window)."""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from mmprof.errors import UserError
from mmprof.profiler import (
    GIB,
    MIN_WINDOW_S,
    Profiler,
    RowIdle,
    Timer,
    copy_bandwidth_gbps,
    cuda_index,
    row_energy,
    synchronize,
)
from mmprof.runners.sweep import guarded, pending, release_memory
from mmprof.workloads import PackedMMFreeLM, build_model, load_checkpoint, make_decoder, streamed_bytes, weight_bytes
from mmprof.workloads.ternary_stats import ternary_stats, zero_fraction

KEY_COLUMNS = ["arch", "size", "weights", "batch", "prompt_len", "new_tokens", "device", "precision", "cuda_graph"]
SWEPT = {"sizes", "archs", "batch"}   # spec lists a --resume may extend
LEAD_IN_S = 0.5  # decode steps run before each energy window opens, so it opens at working power


@dataclass(frozen=True)
class DecodeSpec:
    sizes: tuple[str, ...] = ("1.3b",)
    archs: tuple[str, ...] = ("mmfree", "transformer")
    weights: str = "fake-quant"
    batch: int | tuple[int, ...] = 1   # one batch or a list of them: a row per batch
    prompt_len: int = 32
    new_tokens: int = 256
    repeats: int = 3               # energy windows per row (and timed generations)
    device: str = "cpu"
    min_window_s: float = MIN_WINDOW_S  # each energy window runs generations until at least this long
    max_window_tokens: int | None = None  # stop a window after this many tokens even if shorter
    idle_s: float = 2.0
    sample_hz: float = 100.0
    seed: int = 0
    graph: bool | None = None      # CUDA graph per decode step; None: on CUDA devices
    checkpoint: str | None = None  # a checkpoint folder: its real weights are decoded (sizes: its name)
    prompt_ids: tuple[int, ...] | None = None   # a tokenised --prompt (else random ids, prompt_len long)

    @property
    def batches(self) -> tuple[int, ...]:
        return (self.batch,) if isinstance(self.batch, int) else tuple(self.batch)

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
    batch: int = 1

    def spec_row(self, spec: DecodeSpec) -> dict:
        return {"arch": self.arch, "size": self.size, "weights": self.weights, "batch": self.batch,
                "prompt_len": spec.prompt_len, "new_tokens": spec.new_tokens, "repeats": spec.repeats,
                "device": spec.device, "precision": spec.precision, "cuda_graph": int(spec.cuda_graph),
                "shard": "none", "world_size": 1, "rank": 0, "local_gpu": cuda_index(spec.device), "row_kind": "rank"}

    @property
    def label(self) -> str:
        return f"{self.arch} {self.size} {self.weights} b{self.batch}"


def configs(spec: DecodeSpec) -> list[Config]:
    if spec.graph and not spec.device.startswith("cuda"):
        raise UserError("--graph needs a CUDA device; on the CPU each decode step is launched eagerly")
    return [Config(a, s, weights_for(a, spec.weights), b) for s in spec.sizes for b in spec.batches for a in spec.archs]


def _timed_generation(dec, prompt, spec: DecodeSpec, prof: Profiler, label: str):
    """Prefill, then new_tokens - 1 greedy steps, timed: (prefill_s, ttft_s, per-step latencies).

    Prefill and TTFT are what a caller waits for (host clock around synchronised calls, launch work
    included); the steps are timed on the device by the profiler's Timer."""
    synchronize(spec.device)
    prof.mark(f"prefill {label}")
    t0 = time.perf_counter()
    logits = dec.prefill(prompt)
    synchronize(spec.device)
    prefill_s = time.perf_counter() - t0
    token = logits.argmax(-1)
    synchronize(spec.device)
    ttft_s = time.perf_counter() - t0
    prof.mark(f"steps {label}")
    timer = Timer(spec.device)
    timer.mark()
    for _ in range(spec.new_tokens - 1):
        token = dec.greedy_step(token)
        timer.mark()
    latencies = timer.intervals_s()
    prof.mark(None)
    return prefill_s, ttft_s, latencies


def _generation(dec, prompt, spec: DecodeSpec) -> None:
    """One generation with no wait on the device: prefill, greedy choice, new_tokens - 1 steps."""
    token = dec.prefill(prompt).argmax(-1)
    for _ in range(spec.new_tokens - 1):
        token = dec.greedy_step(token)


def _decode_pass(dec, token, start: int, spec: DecodeSpec):
    """new_tokens - 1 greedy steps from position `start` (the end of the prompt), the decoder rewound
    there first: the energy windows replay these steps back to back, with no prefill and no wait."""
    dec.rewind(start)
    for _ in range(spec.new_tokens - 1):
        token = dec.greedy_step(token)
    return token


def measure(cfg: Config, spec: DecodeSpec, prof: Profiler, copy_gbps: float | None) -> dict:
    """Warm up; timed generations (TTFT, latency percentiles, tokens/s); idle; `repeats` energy windows
    of decode-step passes back to back (rewound between passes), each at least min_window_s after a
    LEAD_IN_S lead-in; idle again. J/token is decode steps only. The arithmetic is row_energy's."""
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
        prompt = torch.tensor([list(spec.prompt_ids)] * cfg.batch, dtype=torch.long, device=spec.device)
    else:
        prompt = torch.randint(0, vocab, (cfg.batch, spec.prompt_len), generator=gen).to(spec.device)
    dec = make_decoder(model, cfg.batch, spec.prompt_len + spec.new_tokens, spec.device, spec.cuda_graph)
    per_pass = (spec.new_tokens - 1) * cfg.batch          # tokens of one energy-window pass (decode steps)
    max_calls = -(-spec.max_window_tokens // per_pass) if spec.max_window_tokens else None
    with torch.inference_mode():
        _generation(dec, prompt, spec)                      # warm-up; also captures the CUDA graph
        with prof.window(f"all {cfg.label}") as whole:      # peak memory over everything decoded
            timed = [_timed_generation(dec, prompt, spec, prof, f"{cfg.label} #{k}") for k in range(spec.repeats)]
            before = prof.measure_idle(f"idle before {cfg.label}")
            token = dec.prefill(prompt).argmax(-1)          # the windows decode from the end of this prompt
            carry = {"token": token}

            def decode_pass():
                carry["token"] = _decode_pass(dec, carry["token"], prompt.shape[1], spec)

            windows = [prof.continuous_window(f"decode {cfg.label} #{k}", decode_pass, spec.min_window_s,
                                              max_calls, lead_in_s=LEAD_IN_S) for k in range(spec.repeats)]
            after = prof.measure_idle(f"idle after {cfg.label}")
    lat = [x for _, _, steps in timed for x in steps]
    energy = row_energy([m for m, _ in windows], {"token": [n * per_pass for _, n in windows]},
                        RowIdle(before, after), spec.min_window_s)
    wbytes, step_bytes = weight_bytes(model), streamed_bytes(model, cfg.batch)
    # percentiles 1..99 of the per-token latencies, interpolated between the measured values
    pct = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
    steps_per_s = len(lat) / math.fsum(lat)
    row = {
        "repeats": len(windows),
        "prefill_s": statistics.median(p for p, _, _ in timed), "ttft_s": statistics.median(t for _, t, _ in timed),
        "latency_p50_ms": pct[49] * 1e3, "latency_p90_ms": pct[89] * 1e3,
        "latency_p99_ms": pct[98] * 1e3, "tokens_per_s": steps_per_s * cfg.batch,
        "n_tokens_measured": sum(n for _, n in windows) * per_pass,
        "weights_gib": wbytes / GIB, "bytes_per_step_gib": step_bytes / GIB,
        "peak_alloc_gib": whole.measurement.peak_alloc_gib,
        "peak_reserved_gib": whole.measurement.peak_reserved_gib, "ternary_zero_frac": zeros,
        **energy,
    }
    if cuda:
        row["bandwidth_gbps"] = step_bytes * steps_per_s / 1e9
        if copy_gbps:
            row["bandwidth_frac"] = row["bandwidth_gbps"] / copy_gbps
    del model, dec
    return row


def run(spec: DecodeSpec, emit: Callable[[dict], None], *, skip: Iterable[tuple] = (),
        key: Callable[[dict], tuple] | None = None, trace_path=None,
        on_start: Callable[[Config], None] | None = None) -> list[dict]:
    rows = []
    # events and synchronisation go to the measured GPU, also when it is not the current one
    on_gpu = torch.cuda.device(spec.device) if spec.device.startswith("cuda") else contextlib.nullcontext()
    with on_gpu, Profiler(device=spec.device, sample_hz=spec.sample_hz, idle_s=spec.idle_s,
                          trace_path=trace_path, min_window_s=spec.min_window_s) as prof:
        copy_gbps = copy_bandwidth_gbps(spec.device) if spec.device.startswith("cuda") else None
        for cfg, row in pending(configs(spec), lambda c: c.spec_row(spec), key=key, skip=skip, on_start=on_start):
            row.update(guarded(lambda: measure(cfg, spec, prof, copy_gbps), spec.device))
            emit(row)
            rows.append(row)
    return rows
