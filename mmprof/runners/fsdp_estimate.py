"""Per-rank peak memory of FSDP2 training with N processes, estimated with no GPU.

The model of one rank (every rank holds the same padded shards, so one figure stands for all):

    persistent  P + O            master-weight shards; AdamW's exp_avg, exp_avg_sq and step
    optimizer   P + O + G        at the optimizer step every gradient shard exists
    fwd/bwd     P + O + max over time (A + f*G) + U
    peak        max(optimizer, fwd/bwd)

- Shards: FSDP2 splits each parameter on dim 0 into N pieces of ceil(dim0 / N) rows (the last ones
  padded), so a rank holds ceil(dim0 / N) * (numel / dim0) elements of each, every tensor rounded up
  to the CUDA allocator's 512-byte blocks. G (gradient shards) has P's size and dtype.
- A: activations and temporaries of one rank's batch, on fake tensors, in the dtype FSDP2 computes
  in (bf16 for bf16-autocast and bf16: the MixedPrecisionPolicy hands the blocks bf16 parameters,
  so the forward is the bf16 model's), with the same activation checkpointing. Each gradient is
  dropped the moment it is made (FSDP2 reduce-scatters it) and f*G counts the shards of those made
  so far; the highest A + f*G over the step is the forward/backward term.
- U: unsharded parameters and gradients in flight, in the compute dtype, by where that peak falls:
  in forward, the root group (embedding, lm_head, final norm, lower bounds: FSDP2 keeps the root
  unsharded from forward to the end of backward) and two blocks (the one computing, the one
  prefetched); in backward through the blocks, also the root's gradients (reduce-scattered only when
  backward ends), a block's unsharded gradients and their fp32 reduce-scatter input; at the end of
  backward, the root's parameters, gradients and fp32 reduce-scatter input only.
The forward/backward term comes from the fast path (train_estimate.compose_sharded: three blocks
traced at batch 1 and 2, composed to the model's depth and batch) unless `--estimate full`, which
traces the whole forward and backward here (fwd_bwd_peak, the reference the tests compare with).
Not modelled: NCCL's own buffers and allocator fragmentation (they show in peak_reserved_gib).
"""

from __future__ import annotations

import functools
import math

import torch

from mmprof.profiler import GIB, MemoryTracker, fake_tensor_mode
from mmprof.workloads import TrainSpec, build_model, make_trainer
from mmprof.workloads.build import resolve_config
from mmprof.workloads.checkpointing import apply_checkpointing
from mmprof.workloads.precision import param_dtype

from .fsdp_sizes import BLOCK, compute_dtype, shard_bytes

def _padded_numel(p: torch.Tensor, world: int) -> int:
    if p.dim() == 0:
        return 1
    return math.ceil(p.shape[0] / world) * world * (p.numel() // p.shape[0])


@functools.lru_cache(maxsize=None)
def sharded_state(arch: str, size, bitlinear: str, precision: str, world: int) -> dict:
    """Per-rank bytes of parameter shards, AdamW state, and unsharded root/block sizes (compute dtype).

    Cached per argument tuple: a sweep asks for the same one at every batch (the whole model is built
    on meta: not every parameter outside the blocks has a size independent of the depth)."""
    model = build_model(arch, resolve_config(size), bitlinear=bitlinear or "fused", device="meta")
    master = torch.empty((), dtype=param_dtype(precision)).element_size()
    comp = torch.empty((), dtype=compute_dtype(precision)).element_size()
    params = list(model.parameters())
    p_bytes = sum(shard_bytes(p, world, master) for p in params)
    steps = len(params) * BLOCK        # AdamW's `step`: one device scalar per parameter (fused AdamW)
    block = list(model.model.layers[0].parameters())
    in_blocks = {id(p) for layer in model.model.layers for p in layer.parameters()}
    root = [p for p in params if id(p) not in in_blocks]
    return {
        "param": p_bytes, "optim": 2 * p_bytes + steps,
        "root": sum(_padded_numel(p, world) * comp for p in root),
        "block": sum(_padded_numel(p, world) * comp for p in block),
        "block_fp32": sum(_padded_numel(p, world) * 4 for p in block),
        "root_fp32": sum(_padded_numel(p, world) * 4 for p in root),
    }


def fwd_bwd_peak(arch: str, size: str, bitlinear: str, precision: str, batch: int, seq: int,
                 checkpointing: str, world: int) -> dict:
    """Highest A + f*G of one rank's forward and backward, on fake tensors in the compute dtype.

    Each gradient is dropped as soon as it is made (FSDP2 reduce-scatters it and keeps a shard), and
    the rank's shard of it counted from then on: the tracker's peak is read between consecutive
    gradients, plus the shards of the gradients made so far. Returns bytes beyond the parameters
    (`value`), the activations and temporaries within it, and f."""
    compute_precision = "fp32" if precision == "fp32" else "bf16"
    tspec = TrainSpec(arch=arch, size=str(size), bitlinear=bitlinear or "fused", batch=batch, seq=seq,
                      precision=compute_precision, config=resolve_config(size))
    master = torch.empty((), dtype=param_dtype(precision)).element_size()
    best = {"value": -1, "act": 0, "temp": 0, "frac": 0.0, "stage": "forward"}
    with fake_tensor_mode():
        trainer = make_trainer(tspec, "cpu")
        apply_checkpointing(trainer.model, checkpointing)
        params = list(trainer.model.parameters())
        shard_total = sum(shard_bytes(p, world, master) for p in params)
        in_blocks = {id(p) for layer in trainer.model.model.layers for p in layer.parameters()}
        done, blocks_left = [0], [len(in_blocks)]
        with MemoryTracker(trainer.model) as tracker:
            base = tracker.current_bytes()

            def close_interval() -> None:
                value = tracker.peak_bytes - base + done[0]
                if value > best["value"]:
                    cats = tracker.peak_bytes_by_category
                    stage = "forward" if not done[0] else ("blocks" if blocks_left[0] else "tail")
                    best.update(value=value, act=cats["activations"], temp=cats["temporaries"] + cats["grads"],
                                frac=done[0] / shard_total, stage=stage)
                tracker.reset_peak()

            def on_grad(p: torch.Tensor) -> None:
                close_interval()
                p.grad = None
                done[0] += shard_bytes(p, world, master)
                blocks_left[0] -= id(p) in in_blocks

            handles = [p.register_post_accumulate_grad_hook(on_grad) for p in params]
            ids = trainer.next_batch()
            trainer.model(ids, labels=ids).loss.backward()
            close_interval()
            for h in handles:
                h.remove()
    return best


def estimate_sharded(cfg, spec) -> dict:
    """The train-memory row of a sharded estimate (cfg: train_memory.Config, spec: TrainMemorySpec)."""
    from mmprof.runners.options import model_config

    n = spec.world_size
    shape = model_config(spec)
    state = sharded_state(cfg.arch, shape, cfg.bitlinear, spec.precision, n)
    if spec.estimate_method == "fast":
        from mmprof.runners.train_estimate import Shape, compose_sharded

        fb = compose_sharded(Shape(cfg.arch, shape, cfg.bitlinear or "fused", spec.seq, spec.precision,
                                   cfg.checkpointing, world=n), cfg.batch)
    else:
        fb = fwd_bwd_peak(cfg.arch, shape, cfg.bitlinear, spec.precision, cfg.batch, spec.seq,
                          cfg.checkpointing, n)
    act, temp, frac = fb["act"], fb["temp"], fb["frac"]
    p, o = state["param"], state["optim"]
    unsharded = {                      # what is unsharded besides the fake run's own tensors
        "forward": state["root"] + 2 * state["block"],
        "blocks": 2 * state["root"] + 3 * state["block"] + state["block_fp32"],
        "tail": 2 * state["root"] + state["root_fp32"],
    }[fb["stage"]]
    fwd_bwd = p + o + fb["value"] + unsharded
    optimizer = p + o + p
    peak = max(fwd_bwd, optimizer)
    where = "optimizer step" if optimizer >= fwd_bwd else {
        "forward": "end of forward", "blocks": "backward through the blocks", "tail": "end of backward"}[fb["stage"]]
    row = {
        "peak_alloc_gib": peak / GIB, "act_mem_gib": (peak - p - o) / GIB,
        "param_gib": p / GIB, "grad_gib": p / GIB, "optim_gib": o / GIB,
        "tracker_act_gib": act / GIB, "tracker_temp_gib": temp / GIB,
        "note": (f"per-rank FSDP2 estimate for {n} processes (every rank alike); peak at the {where}; "
                 f"unsharded parameters/gradients in flight {unsharded / GIB:.2f} GiB, "
                 f"{frac * 100:.0f}% of the gradient shards made by the forward/backward peak"),
    }
    if spec.breakdown:
        row["_breakdown"] = sharded_breakdown(peak, p, o, fb, unsharded, optimizer >= fwd_bwd,
                                              cfg.batch * spec.seq, shape.num_layers)
    return row


def sharded_breakdown(peak: int, p: int, o: int, fb: dict, unsharded: int, at_optimizer: bool, tokens: int,
                      layers: int) -> dict[str, tuple[int, float]]:
    """What one rank holds at its peak: part -> (bytes, bytes per token per layer), adding up to `peak`."""
    if at_optimizer:
        parts = {"parameter shards": p, "optimizer state": o, "gradient shards": p}
    else:
        shards = round(fb["frac"] * p)
        parts = {"parameter shards": p, "optimizer state": o, "gradient shards": shards,
                 "unsharded parameters/gradients in flight": unsharded, "activations": fb["act"]}
        parts["temporaries and full-size gradients"] = peak - sum(parts.values())
    return {k: (v, v / tokens / layers) for k, v in parts.items()}
