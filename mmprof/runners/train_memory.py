"""`train-memory`: training memory, time and energy per (arch, BitLinear impl, batch), or an estimate."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from mmprof.profiler import GIB, MemoryTracker, Profiler, cuda_index, fake_tensor_mode, row_energy, time_fn
from mmprof.results.schema import columns
from mmprof.runners.options import fit_note, model_config, train_unfit
from mmprof.runners.sweep import gpu_peak_tflops, guarded, pending
from mmprof.workloads import ModelConfig, TrainSpec, make_trainer, model_flops_per_token
from mmprof.workloads.checkpointing import apply_checkpointing

KEY_COLUMNS = ["arch", "size", "bitlinear", "batch", "seq", "precision", "checkpointing", "device", "shard",
               "world_size", "rank"]
SWEPT = {"archs", "bitlinears", "batches", "checkpointings"}   # spec lists a --resume may extend


@dataclass(frozen=True)
class TrainMemorySpec:
    size: str
    archs: tuple[str, ...] = ("mmfree", "transformer")
    bitlinears: tuple[str, ...] = ("vanilla", "ref-fused", "fused")
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    seq: int = 2048
    steps: int = 5
    warmup: int = 2
    device: str = "meta"          # resolved: cuda:N | cpu | meta
    precision: str = "bf16-autocast"
    estimate: bool = False        # on a real device, add the fake-tensor estimate beside the measurement
    min_window_s: float = 5.0     # the energy window is stretched (more steps) to at least this long
    idle_s: float = 2.0
    sample_hz: float = 100.0
    peak_tflops: float | None = None
    gpu_name: str | None = None
    checkpointings: tuple[str, ...] = ("none",)   # none | layer (each block recomputed in backward)
    shard: str = "none"           # none | fsdp (FSDP2 under torchrun, or its per-rank estimate on meta)
    world_size: int = 1           # processes of the job (the estimate's N on meta)
    model: ModelConfig | None = None   # the shape of --checkpoint (then `size` is its name)
    estimate_method: str = "fast"   # fast: two-block timelines composed (train_estimate) | full: whole step traced
    overrides: tuple[tuple[str, int], ...] = ()   # --set key=value on the size's shape
    breakdown: bool = False       # rows carry `_breakdown` (bytes by part at the peak), not written to the CSV


@dataclass(frozen=True)
class Config:
    arch: str
    bitlinear: str   # "" for the transformer
    batch: int       # sequences per step (per rank under FSDP)
    checkpointing: str = "none"

    def spec_row(self, spec: TrainMemorySpec) -> dict:
        """Spec columns of this configuration's row; a sharded estimate stands for every rank (`all`)."""
        sharded = spec.shard != "none"
        return {
            "arch": self.arch, "size": spec.size, "bitlinear": self.bitlinear, "batch": self.batch,
            "seq": spec.seq, "steps": spec.steps, "warmup": spec.warmup, "device": spec.device,
            "precision": spec.precision, "checkpointing": self.checkpointing, "shard": spec.shard,
            "world_size": spec.world_size, "rank": "all" if sharded else 0,
            "local_gpu": None if sharded else cuda_index(spec.device),
            "row_kind": "summary" if sharded else "rank", "estimated": 1 if spec.device == "meta" else 0,
        }

    @property
    def impl(self) -> tuple[str, str, str]:
        """What a sweep stops at its first out-of-memory batch."""
        return self.arch, self.bitlinear, self.checkpointing

    @property
    def label(self) -> str:
        ckpt = " ckpt" if self.checkpointing != "none" else ""
        return f"{self.arch}{'-' + self.bitlinear if self.bitlinear else ''}{ckpt} b{self.batch}"


def configs(spec: TrainMemorySpec) -> list[Config]:
    """Every arch x implementation over the batch list, in the order the sweep runs them."""
    out = []
    for arch in spec.archs:
        impls = spec.bitlinears if arch == "mmfree" else ("",)
        for impl in impls:
            for ckpt in spec.checkpointings:
                out += [Config(arch, impl, b, ckpt) for b in spec.batches]
    return out


def _train_spec(cfg: Config, spec: TrainMemorySpec) -> TrainSpec:
    return TrainSpec(arch=cfg.arch, size=spec.size, bitlinear=cfg.bitlinear or "fused", batch=cfg.batch,
                     seq=spec.seq, precision=spec.precision, config=model_config(spec))


def estimate_fast(cfg: Config, spec: TrainMemorySpec) -> dict:
    """The estimate from cached two-batch, three-block timelines (runners/train_estimate.py)."""
    from mmprof.runners.train_estimate import Shape, breakdown, compose

    shape = Shape(cfg.arch, model_config(spec), cfg.bitlinear or "fused", spec.seq, spec.precision, cfg.checkpointing)
    r = compose(shape, cfg.batch)
    row = {
        "peak_alloc_gib": r["peak"] / GIB, "act_mem_gib": (r["peak"] - r["before"]) / GIB,
        "param_gib": r["end"]["params"] / GIB, "grad_gib": r["max"]["grads"] / GIB,
        "optim_gib": r["end"]["optim"] / GIB, "tracker_act_gib": r["at_peak"]["activations"] / GIB,
        "tracker_temp_gib": r["at_peak"]["temporaries"] / GIB, "note": "",
    }
    if spec.breakdown:
        row["_breakdown"] = breakdown(r, cfg.batch * spec.seq, shape.config.num_layers)
    return row


def estimate(cfg: Config, spec: TrainMemorySpec) -> dict:
    """Peak memory of one training step on fake tensors: no GPU, no real memory, seconds.

    With `spec.shard == "fsdp"`, the peak of one rank of a `spec.world_size`-process FSDP2 job."""
    if spec.shard == "fsdp":
        from mmprof.runners.fsdp_estimate import estimate_sharded

        return estimate_sharded(cfg, spec)
    if spec.estimate_method == "fast":
        return estimate_fast(cfg, spec)
    with fake_tensor_mode():
        trainer = make_trainer(_train_spec(cfg, spec), "cpu")
        apply_checkpointing(trainer.model, cfg.checkpointing)
        trainer.step()                      # the first step allocates the optimizer state
        with MemoryTracker(trainer.model, trainer.optimizer) as tracker:
            before = tracker.current_bytes()
            trainer.step()
    row = _tracker_row(tracker, before)
    row["note"] = tracker_note(tracker)
    return row


def full_trace(cfg: Config, spec: TrainMemorySpec) -> dict:
    """The estimate from the whole step traced on fake tensors (`--estimate full`; the fast path's reference)."""
    import dataclasses

    return estimate(cfg, dataclasses.replace(spec, estimate_method="full"))


def tracker_note(tracker: MemoryTracker) -> str:
    n = tracker.untracked_tensors
    return f"{n} sparse or nested tensor(s) not counted by the tracker" if n else ""


def _tracker_row(tracker: MemoryTracker, before: int) -> dict:
    cats = tracker.peak_bytes_by_category
    current = tracker.current_bytes_by_category()
    return {
        "peak_alloc_gib": tracker.peak_bytes / GIB,
        "act_mem_gib": (tracker.peak_bytes - before) / GIB,
        "param_gib": current.get("params", 0) / GIB,
        "grad_gib": tracker.max_bytes_by_category.get("grads", 0) / GIB,
        "optim_gib": current.get("optim", 0) / GIB,
        "tracker_act_gib": cats.get("activations", 0) / GIB,
        "tracker_temp_gib": cats.get("temporaries", 0) / GIB,
    }


def energy_columns(m, steps: int, tokens_per_step: int, min_window_s: float) -> dict:
    """The energy columns of one window of `steps` steps (profiler.row_energy's arithmetic) that the
    train-memory schema has, and the note."""
    out = row_energy([m], {"token": [steps * tokens_per_step], "step": [steps]}, None, min_window_s)
    keep = set(columns("train-memory")) | {"note"}
    return {k: v for k, v in out.items() if k in keep}


def window_steps(probe_s: float, steps: int, min_window_s: float) -> int:
    """Steps in the energy window: at least `steps`, and enough for `min_window_s` at the step time
    `probe_s` of one step timed after the warm-up (not the warm-up itself: its first step compiles and
    autotunes), with 20% headroom."""
    return max(steps, math.ceil(1.2 * min_window_s / probe_s)) if probe_s > 0 else steps


def measure(cfg: Config, spec: TrainMemorySpec, prof: Profiler) -> dict:
    """Warm up, then time and meter a window of steps; then one step under the live-tensor tracker."""
    trainer = make_trainer(_train_spec(cfg, spec), spec.device)
    apply_checkpointing(trainer.model, cfg.checkpointing)
    cuda = spec.device.startswith("cuda")
    if spec.warmup:
        time_fn(trainer.step, warmup=0, repeats=spec.warmup, device=spec.device)
    # one more step, timed after the warm-up, sizes the window: the first warm-up step (compiling,
    # autotuning) can be many times slower than the steady state, and with --warmup 1 it was all there was
    probe_s = time_fn(trainer.step, warmup=0, repeats=1, device=spec.device).samples_s[0]
    steps = window_steps(probe_s, spec.steps, spec.min_window_s)
    before = torch.cuda.memory_allocated(spec.device) if cuda else None
    with prof.window(cfg.label) as win:
        timing = time_fn(trainer.step, warmup=0, repeats=steps, device=spec.device)
    m = win.measurement
    tracker = _measuring_tracker(trainer, spec)
    with tracker:
        tracker_before = tracker.current_bytes()
        trainer.step()
    tokens = cfg.batch * spec.seq
    row = _tracker_row(tracker, tracker_before)
    # the window's columns, except where it has none and the tracker's figure stands (no CUDA allocator)
    row.update({k: v for k, v in m.row().items() if v is not None or k not in row})
    if cuda:
        row["act_mem_gib"] = m.peak_alloc_gib - before / GIB
    row.update({
        "step_time_s": timing.median_s, "step_time_iqr_s": timing.iqr_s, "n_steps": timing.n,
        "tokens_per_s": tokens / timing.median_s,
    })
    tflops = gpu_peak_tflops(spec.gpu_name, spec.peak_tflops) if cuda else spec.peak_tflops
    if tflops:
        flops = model_flops_per_token(model_config(spec), cfg.arch, spec.seq) * row["tokens_per_s"]
        row["mfu"] = flops / (tflops * 1e12)
    energy = energy_columns(m, timing.n, tokens, spec.min_window_s)
    if spec.breakdown:
        from mmprof.runners.train_estimate import measured_breakdown

        row["_breakdown"] = measured_breakdown(tracker, tokens, trainer.config.num_layers)
    if not cuda:
        m.unavailable.pop("peak_alloc_gib", None)   # the tracker's peak fills it
    notes = [energy.pop("note"), m.note(), tracker_note(tracker)]
    row.update(energy)
    if not cuda:
        notes.append("no CUDA allocator: peak_alloc_gib and act_mem_gib are the live-tensor tracker's")
    row["note"] = _join(*notes)
    del trainer
    return row


def _measuring_tracker(trainer, spec: TrainMemorySpec) -> MemoryTracker:
    """The live-tensor tracker of a measured step; with --breakdown one that keeps its timeline."""
    gaps = spec.device.startswith("cuda")   # a real CUDA step, after its timed window
    if not spec.breakdown:
        return MemoryTracker(trainer.model, trainer.optimizer, allocator_gaps=gaps)
    from mmprof.profiler.timeline import TimelineTracker
    from mmprof.runners.train_estimate import kind_finder

    return TimelineTracker(trainer.model, trainer.optimizer, kind_of=kind_finder(trainer.model), allocator_gaps=gaps)


def run(spec: TrainMemorySpec, emit: Callable[[dict], None], *, skip: Iterable[tuple] = (),
        key: Callable[[dict], tuple] | None = None, trace_path=None,
        on_start: Callable[[Config], None] | None = None) -> list[dict]:
    """Run the sweep; `emit` gets each finished row (the caller appends it to the run folder)."""
    rows: list[dict] = []
    todo = pending(configs(spec), lambda c: c.spec_row(spec), key=key, skip=skip, on_start=on_start)
    if spec.device == "meta":
        for cfg, row in todo:
            row.update(guarded(lambda: estimate(cfg, spec), spec.device))
            row["note"] = _join(row.get("note"), fit_note(row.get("peak_alloc_gib")),
                                "estimated on fake tensors: time, energy and power not measured")
            emit(row)
            rows.append(row)
        return rows
    stopped: set[tuple[str, str, str]] = set()
    with Profiler(device=spec.device, sample_hz=spec.sample_hz, idle_s=spec.idle_s,
                  trace_path=trace_path, min_window_s=spec.min_window_s) as prof:
        for cfg, row in todo:
            if cfg.impl in stopped:
                continue
            unfit = train_unfit(model_config(spec), cfg.batch, spec.seq, spec.precision, spec.device, spec.world_size)
            row.update({"status": "oom", "note": unfit} if unfit else
                       guarded(lambda: measure(cfg, spec, prof), spec.device))
            if row["status"] == "ok" and spec.estimate:
                est = guarded(lambda: estimate(cfg, spec), "cpu")
                if est["status"] == "ok" and row.get("peak_alloc_gib"):
                    row["est_peak_alloc_gib"] = est["peak_alloc_gib"]
                    row["est_error_pct"] = (est["peak_alloc_gib"] / row["peak_alloc_gib"] - 1) * 100
            if row["status"] == "oom":
                stopped.add(cfg.impl)
            emit(row)
            rows.append(row)
    return rows


def _join(*parts: str | None) -> str:
    return "; ".join(p for p in parts if p)
