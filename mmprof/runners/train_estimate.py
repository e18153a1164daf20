"""The fast training-memory estimate: trace three blocks at batch 1 and 2, then compose any depth and batch.

A training step of a model whose blocks are alike is, allocation by allocation, the same sequence
for every block: block k's forward allocates what block 1's does, its backward frees and makes what
block 1's does, the optimizer walks its parameters alike. So one step is traced on meta tensors
with only three blocks (block 0 and the last, which may differ, and block 1, which stands for every
block between), each event of the timeline tagged with the block running (forward hooks on the
blocks, gradient hooks on their outputs in backward, the owner of the parameter an op touches in the
optimizer). Repeating block 1's runs of events L-2 times gives the timeline of the L-block step, and
replaying it gives the peak and what is alive at it (each storage freed in a repeated run was made by
a block like the one that frees it), exactly as a full trace would, not only the totals.

The timeline is traced at batch 1 and at batch 2: every storage's exact byte count is then a linear
function of the batch (the sequence of allocations is the same), so every batch of a sweep is one
replay, with the allocator's 512-byte rounding applied at the batch asked for. Timelines are cached
per (arch, shape, implementation, sequence, precision, checkpointing) for the whole process.

The per-rank FSDP2 estimate (`Shape.world` > 0, `compose_sharded`) goes the same way: one rank's
forward and backward in the compute dtype, each gradient dropped as it is made and the rank's shard
of it held from then on (TimelineTracker.hold), traced with three blocks at batch 1 and 2 and
composed; fsdp_estimate adds the shards, optimizer state and unsharded parameters in flight.

Generic over the model: the blocks are the model's longest `nn.ModuleList`; nothing here knows which
BitLinear implementation or architecture it runs. `full_trace` (the whole step on fake tensors) is the
reference that tests compare this against.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from mmprof.profiler import CATEGORIES, fake_tensor_mode
from mmprof.profiler.timeline import ROOT, Timeline, TimelineTracker
from mmprof.workloads import TrainSpec, make_trainer
from mmprof.workloads.checkpointing import apply_checkpointing
from mmprof.workloads.memory_kinds import KIND_LABELS, module_kind
from mmprof.workloads.presets import ModelConfig

BLOCK_BYTES = 512
TRACED_BLOCKS = 3   # block 0, block 1 (repeated: a block between two blocks), the last block
SHARD_BLOCK, SHARD_ROOT = "fsdp shard (block)", "fsdp shard (root)"   # kinds of an FSDP2 rank's gradient shards
_CACHE: dict[tuple, tuple[Timeline, Timeline]] = {}


@dataclass(frozen=True)
class Shape:
    arch: str
    config: ModelConfig
    bitlinear: str
    seq: int
    precision: str
    checkpointing: str
    world: int = 0       # > 0: one rank's forward and backward of a `world`-process FSDP2 job (compose_sharded)


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The model's repeated blocks: its longest ModuleList."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no ModuleList of blocks")
    return max(lists, key=len)


def _first_grad_tensor(obj):
    if isinstance(obj, torch.Tensor):
        return obj if obj.requires_grad else None
    if isinstance(obj, (list, tuple)):
        for x in obj:
            t = _first_grad_tensor(x)
            if t is not None:
                return t
    return None


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def kind_finder(model: nn.Module):
    """() -> the kind of the innermost module whose method is running (its `self` on the Python stack),
    so ops called from a module's helper methods (the fused paths) count as that module's."""
    kinds = {}
    for name, module in model.named_modules():
        kind = module_kind(name, module)
        if kind is not None:
            kinds[id(module)] = kind

    def find() -> str:
        frame = sys._getframe(1)
        while frame is not None:
            owner = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames[:1] else None
            if owner is not None and id(owner) in kinds:
                return kinds[id(owner)]
            frame = frame.f_back
        return "other"

    return find


@contextlib.contextmanager
def _labels(model: nn.Module, tracker: TimelineTracker):
    """Forward hooks setting the tracker's tag to the block running; gradient hooks setting it to the
    block whose backward starts (and to ROOT after block 0's)."""
    handles, tags = [], [ROOT]

    def block_hooks(k: int):
        def pre(module, args):
            tags.append(k)
            tracker.set_tag(k)
            t = _first_grad_tensor(args)
            if k == 0 and t is not None and not _in_backward():
                t.register_hook(lambda g: tracker.set_tag(ROOT))

        def post(module, args, out):
            tags.pop()
            tracker.set_tag(tags[-1])
            t = _first_grad_tensor(out)
            if t is not None and not _in_backward():
                t.register_hook(lambda g: tracker.set_tag(k))

        return pre, post

    for k, block in enumerate(blocks_of(model)):
        pre, post = block_hooks(k)
        handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def trace(shape: Shape, batch: int, blocks: int) -> Timeline:
    """The tagged timeline of one steady-state training step with `blocks` blocks, on meta tensors
    (on fake 'cpu' tensors with activation checkpointing: the recomputation in backward needs real
    autocast, which torch.utils.checkpoint restores and which meta does not have)."""
    if shape.checkpointing == "none":
        return _trace_on(shape, batch, blocks, "meta")
    with fake_tensor_mode():
        return _trace_on(shape, batch, blocks, "cpu")


def _trace_on(shape: Shape, batch: int, blocks: int, device: str) -> Timeline:
    cfg = shape.config.replace(num_layers=blocks)
    precision = _compute_precision(shape.precision) if shape.world else shape.precision
    trainer = make_trainer(TrainSpec(arch=shape.arch, size="custom", bitlinear=shape.bitlinear, batch=batch,
                                     seq=shape.seq, precision=precision, config=cfg), device)
    model, opt = trainer.model, trainer.optimizer
    apply_checkpointing(model, shape.checkpointing)
    if shape.world:
        return _trace_sharded(trainer, shape)
    for p in model.parameters():                  # the optimizer's state, as a first step leaves it
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    owners = {id(p): k for k, block in enumerate(blocks_of(model)) for p in block.parameters()}
    tracker = TimelineTracker(model, opt, owners=owners, kind_of=kind_finder(model))
    with _labels(model, tracker), tracker:
        trainer.step()
    return tracker.timeline()


def _compute_precision(precision: str) -> str:
    """The precision an FSDP2 rank computes in (fsdp_sizes.compute_dtype's)."""
    from mmprof.runners.fsdp_sizes import compute_dtype

    return "fp32" if compute_dtype(precision) == torch.float32 else "bf16"


def _trace_sharded(trainer, shape: Shape) -> Timeline:
    """One FSDP2 rank's forward and backward (no optimizer: its step is fsdp_estimate's arithmetic):
    each gradient dropped the moment it is made, as FSDP2 reduce-scatters it, and the rank's shard of
    it held from then on (kind SHARD_BLOCK or SHARD_ROOT, category grads)."""
    from mmprof.runners.fsdp_sizes import shard_bytes
    from mmprof.workloads.precision import param_dtype

    model = trainer.model
    master = torch.empty((), dtype=param_dtype(shape.precision)).element_size()
    in_blocks = {id(p) for block in blocks_of(model) for p in block.parameters()}
    # no owners: with no optimizer step nothing outside the blocks' runs is per block, and a dropped
    # gradient's storage address, reused by a later tensor, must not label that tensor's events
    tracker = TimelineTracker(model, kind_of=kind_finder(model))

    def on_grad(p: torch.Tensor) -> None:     # the shard is made before the full gradient goes
        tracker.hold(shard_bytes(p, shape.world, master), "grads",
                     SHARD_BLOCK if id(p) in in_blocks else SHARD_ROOT)
        p.grad = None

    with _labels(model, tracker), tracker:
        handles = [p.register_post_accumulate_grad_hook(on_grad) for p in model.parameters() if p.requires_grad]
        try:
            ids = trainer.next_batch()
            model(ids, labels=ids).loss.backward()
        finally:
            for h in handles:
                h.remove()
    return tracker.timeline()


def timelines(shape: Shape) -> tuple[Timeline, Timeline, int]:
    """Timelines at batch 1 and 2 (cached), and how many blocks they hold."""
    blocks = min(TRACED_BLOCKS, shape.config.num_layers)
    key = (shape, blocks)
    if key not in _CACHE:
        _CACHE[key] = _trace_pair(shape, blocks)
    one, two = _CACHE[key]
    return one, two, blocks


def _trace_pair(shape: Shape, blocks: int) -> tuple[Timeline, Timeline]:
    """Batch 1 here and batch 2 in a forked child at the same time, where there is a second core and
    no CUDA context (a fork must not inherit one); one after the other otherwise."""
    if (os.cpu_count() or 1) < 2 or torch.cuda.is_initialized() or not hasattr(os, "fork"):
        return trace(shape, 1, blocks), trace(shape, 2, blocks)
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_trace_into, args=(send, shape, 2, blocks), daemon=True)
    child.start()
    send.close()
    try:
        one = trace(shape, 1, blocks)
        ok, two = receive.recv()
    finally:
        child.join()
    if not ok:
        raise RuntimeError(f"tracing batch 2 failed: {two}")
    return one, two


def _trace_into(send, shape: Shape, batch: int, blocks: int) -> None:
    try:
        send.send((True, trace(shape, batch, blocks)))
    except BaseException as e:  # the parent raises it
        send.send((False, f"{type(e).__name__}: {e}"))
    finally:
        send.close()


def _runs(tags: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs (start, end, tag) of equal tags."""
    if len(tags) == 0:
        return []
    cuts = np.flatnonzero(np.diff(tags)) + 1
    starts = np.concatenate(([0], cuts))
    ends = np.concatenate((cuts, [len(tags)]))
    return [(int(s), int(e), int(tags[s])) for s, e in zip(starts, ends)]


def _compose(tl: Timeline, lo: int, hi: int, repeat_tag: int, times: int) -> np.ndarray:
    """Event indices of [lo, hi) with every run tagged `repeat_tag` repeated `times` times.

    A storage made in a repeated run and freed in the next block's run needs nothing more: each copy
    frees what the run before it made, as the template does. One freed in a run outside the blocks
    (autocast's weight casts, dropped when the forward ends) is freed once per copy there; one made
    outside the blocks and freed in a repeated run (shared by all blocks) is freed in its last copy.
    Frees in a repeated run of what the block before made are repeated with the copies: the totals
    are exact, though in the copies they carry the template's storage, so where a chained tensor's
    category or kind differs from its successor's, the breakdown at the peak moves that many bytes
    between two parts."""
    born = np.full(len(tl.raw_bytes), ROOT, dtype=np.int64)
    births = tl.sign > 0
    born[tl.storage[births]] = tl.tag[births]
    pieces = []
    for s, e, tag in _runs(tl.tag[lo:hi]):
        idx = np.arange(lo + s, lo + e)
        if tag == repeat_tag:
            # what the blocks share (made outside them) is freed by the last block using it: the last copy
            shared = (tl.sign[idx] < 0) & (born[tl.storage[idx]] == ROOT)
            pieces.append(np.concatenate([idx[~shared]] * (times - 1) + [idx]) if times > 1 else idx)
        elif tag == ROOT:
            copies = (tl.sign[idx] < 0) & (born[tl.storage[idx]] == repeat_tag)
            pieces.append(np.repeat(idx, np.where(copies, times, 1)))
        else:
            pieces.append(idx)
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def _check_alike(a: Timeline, b: Timeline) -> None:
    if (len(a.storage) != len(b.storage) or not np.array_equal(a.storage, b.storage)
            or not np.array_equal(a.tag, b.tag) or not np.array_equal(a.category, b.category)):
        raise RuntimeError("the traced step differs between batch 1 and 2; use --estimate full")


def _composed(shape: Shape, batch: int) -> tuple[Timeline, np.ndarray, np.ndarray, np.ndarray]:
    """The batch-1 timeline, every storage's bytes at `batch`, and the composed event indices before
    the step and of the step at the shape's depth."""
    one, two, blocks = timelines(shape)
    _check_alike(one, two)
    raw = one.raw_bytes + (batch - 1) * (two.raw_bytes - one.raw_bytes)
    times = shape.config.num_layers - blocks + 1
    middle = 1 if blocks == TRACED_BLOCKS else ROOT - 1     # fewer layers than that: traced in full
    entry = _compose(one, 0, one.step_start, middle, times)
    step = _compose(one, one.step_start, len(one.tag), middle, times)
    return one, rounded(raw), entry, step


def compose(shape: Shape, batch: int) -> dict:
    """Peak of one training step at `batch` and the shape's depth, from the cached three-block timelines.

    Returns bytes: peak, before (alive when the step starts), at_peak by category, max by category,
    end by category, and activations at the peak by module kind."""
    return replay(*_composed(shape, batch))


def compose_sharded(shape: Shape, batch: int) -> dict:
    """One FSDP2 rank's highest A + f*G over forward and backward (fsdp_estimate.fwd_bwd_peak's
    result, composed from three-block timelines): `value` bytes beyond what exists before the step,
    activations (`act`) and temporaries plus full-size gradients (`temp`) at that moment, the
    fraction `frac` of gradient shards made by then, and the `stage` it falls in (forward, blocks:
    backward still has blocks to go, tail)."""
    tl, sizes, _, step = _composed(shape, batch)
    st = tl.storage[step]
    delta = sizes[st] * tl.sign[step]
    cum = np.concatenate(([0], np.cumsum(delta)))
    at = int(np.argmax(cum))              # events [0, at) are in
    kinds = np.array(tl.kind, dtype=object)[st]
    shard = (kinds == SHARD_BLOCK) | (kinds == SHARD_ROOT)
    done, total = int(delta[:at][shard[:at]].sum()), int(delta[shard].sum())
    cats = np.bincount(tl.category[st[:at]], weights=delta[:at], minlength=len(CATEGORIES))
    blocks_left = int((kinds[at:] == SHARD_BLOCK).sum())
    stage = "forward" if not done else ("blocks" if blocks_left else "tail")
    return {"value": int(cum[at]), "act": int(cats[CATEGORIES.index("activations")]),
            "temp": int(cats[CATEGORIES.index("temporaries")] + cats[CATEGORIES.index("grads")]) - done,
            "frac": done / total if total else 0.0, "stage": stage}


def rounded(raw: np.ndarray) -> np.ndarray:
    return np.where(raw > 0, -(-raw // BLOCK_BYTES) * BLOCK_BYTES, 0)


def replay(tl: Timeline, sizes: np.ndarray, entry: np.ndarray, step: np.ndarray) -> dict:
    """Peak and breakdown of the events `entry` then `step` (indices into tl's events), storages of `sizes` bytes."""
    order = np.concatenate((entry, step))
    st = tl.storage[order]
    delta = sizes[st] * tl.sign[order]
    cum = np.cumsum(delta)
    at = int(np.argmax(cum)) if len(cum) else 0
    before = int(cum[len(entry) - 1]) if len(entry) else 0
    cats = tl.category[st]
    ncat = len(CATEGORIES)
    at_peak = np.bincount(cats[: at + 1], weights=delta[: at + 1], minlength=ncat)
    end = np.bincount(cats, weights=delta, minlength=ncat)
    most = [float(np.cumsum(np.where(cats == c, delta, 0)).max(initial=0)) for c in range(ncat)]
    kinds = sorted(set(tl.kind))
    kind_idx = np.array([kinds.index(k) for k in tl.kind], dtype=np.int64)[st[: at + 1]]
    act = cats[: at + 1] == CATEGORIES.index("activations")
    by_kind = np.bincount(kind_idx[act], weights=delta[: at + 1][act], minlength=len(kinds))
    return {
        "peak": int(cum[at]) if len(cum) else 0, "before": before,
        "at_peak": {c: int(at_peak[i]) for i, c in enumerate(CATEGORIES)},
        "max": {c: int(most[i]) for i, c in enumerate(CATEGORIES)},
        "end": {c: int(end[i]) for i, c in enumerate(CATEGORIES)},
        "activations_by_kind": {k: int(v) for k, v in zip(kinds, by_kind) if v},
    }


def breakdown(result: dict, tokens: int, layers: int) -> dict[str, tuple[int, float]]:
    """What is alive at the peak: part -> (bytes, bytes per token per layer); activations by module kind."""
    at = result["at_peak"]
    parts = {"parameters": at["params"], "gradients": at["grads"], "optimizer state": at["optim"]}
    for kind, nbytes in sorted(result["activations_by_kind"].items(), key=lambda kv: -kv[1]):
        parts[f"activations: {KIND_LABELS.get(kind, kind)}"] = nbytes
    parts["temporaries"] = at["temporaries"]
    return {k: (v, v / tokens / layers) for k, v in parts.items()}


def measured_breakdown(tracker: TimelineTracker, tokens: int, layers: int) -> dict[str, tuple[int, float]]:
    """The breakdown of a traced step on a real device (the tracker's own timeline, nothing composed)."""
    tl = tracker.timeline()
    n = len(tl.tag)
    result = replay(tl, rounded(tl.raw_bytes), np.arange(tl.step_start), np.arange(tl.step_start, n))
    return breakdown(result, tokens, layers)
