"""A live-tensor memory tracker that attributes the peak to params, grads, optim, activations, temporaries.

It watches every aten op through a TorchDispatchMode and counts each tensor storage once (views
share it) from the op that creates it until the storage dies, rounded up the way the CUDA caching
allocator rounds (512 bytes), so on cpu, meta or fake tensors it predicts the GPU's peak allocated
memory. Storages saved for backward (seen through saved-tensor hooks) are activations; model
parameters and buffers, their .grad, and optimizer state are recognised by identity; the rest are
temporaries. Tensors that existed before entering are counted only if they are model or optimizer
state. With fake tensors, enter FakeTensorMode first and the tracker inside it.

With `allocator_gaps=True` on a CUDA device (a real step; not with fake tensors): the dispatch mode cannot see what is allocated and freed inside a custom op or a
compiled region (Triton launches, Inductor buffers): only their outputs. So at every op boundary the
tracker also reads the CUDA allocator's peak since the last boundary; where it rose above both the
last boundary's level and the present one, the difference is counted as a temporary born and freed
there (one event, `kind` "inside an op"), and the tracker's peak reaches the allocator's.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch.utils._python_dispatch import TorchDispatchMode

CATEGORIES = ("params", "grads", "optim", "activations", "temporaries")
CUDA_BLOCK_BYTES = 512
_FRESH_OPS = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}


@dataclass
class _Storage:
    nbytes: int
    category: str
    born: int
    died: int | None = None
    ref: weakref.ref | None = None


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


def _has_plain_storage(t: torch.Tensor) -> bool:
    """Strided tensors own one storage whose bytes the allocator holds; sparse and nested tensors
    (several storages behind one tensor) do not, and are counted in `untracked_tensors` instead."""
    return t.layout == torch.strided and not t.is_nested


class _Spy(TorchDispatchMode):
    def __init__(self, tracker: MemoryTracker):
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        gaps = self.tracker._gaps
        if gaps is not None:
            gaps.settle(self.tracker)          # what ran between the last op and this one
        out = func(*args, **kwargs)
        self.tracker._on_op(func, args, kwargs, out)
        if gaps is not None:
            gaps.settle(self.tracker)          # what this op freed again before returning
        return out


class _AllocatorGaps:
    """The CUDA allocator's peak between two op boundaries, above what the tracker could see."""

    def __init__(self, device: torch.device):
        self.device = device
        self.level = None

    def start(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)
        self.level = torch.cuda.memory_allocated(self.device)

    def settle(self, tracker: MemoryTracker) -> None:
        stats = torch.cuda.memory_stats(self.device)
        now, peak = stats.get("allocated_bytes.all.current", 0), stats.get("allocated_bytes.all.peak", 0)
        if self.level is not None and peak > max(self.level, now):
            tracker._transient(peak - now)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.level = now


class MemoryTracker:
    """`with MemoryTracker(model, optimizer) as mt: ...`, then `mt.peak_bytes`, `mt.peak_bytes_by_category`.

    device: count only tensors on this device (default: the model's device, else every device).
    granularity_bytes: allocation rounding (512 models the CUDA caching allocator; 1 counts exact bytes).
    allocator_gaps: on CUDA, also count what the allocator held between op boundaries unseen (module
    docstring); it resets the device's peak memory statistics at every op, so not inside a timed window.
    """

    def __init__(self, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                 *, device: str | torch.device | None = None, granularity_bytes: int = CUDA_BLOCK_BYTES,
                 allocator_gaps: bool = False):
        self.model = model
        self.optimizer = optimizer
        if device is None and model is not None:
            first = next(iter(model.parameters()), None)
            device = first.device if first is not None else None
        self.device = torch.device(device) if device is not None else None
        self.granularity_bytes = granularity_bytes
        self.start_bytes = 0
        self._lock = threading.RLock()
        self._live: dict[int, _Storage] = {}
        self._dead_since_peak: list[_Storage] = []
        self._by_category = dict.fromkeys(CATEGORIES, 0)
        self._max_by_category = dict.fromkeys(CATEGORIES, 0)
        self._seq = 0
        self._current = 0
        self._peak = 0
        self._peak_seq = 0
        self._handles: list = []
        self._contexts: list = []
        self._depth = 0  # > 0 while this tracker is updating its books
        self._pending: list[tuple[int, _Storage]] = []  # deaths seen mid-update, applied after it
        self.untracked_tensors = 0  # sparse or nested tensors made while tracking, whose bytes are not counted
        on_cuda = self.device is not None and self.device.type == "cuda"
        self._gaps = _AllocatorGaps(self.device) if allocator_gaps and on_cuda else None

    def _storage(self, t: torch.Tensor, *, new: bool = False):
        """The storage to count t by; None for sparse or nested t (counted once, where it appears)."""
        if _has_plain_storage(t):
            return t.untyped_storage()
        if new:
            self.untracked_tensors += 1
        return None

    # ----- results -----
    def current_bytes(self) -> int:
        """Bytes of the tracked storages alive now."""
        return self._current

    @property
    def peak_bytes(self) -> int:
        return self._peak

    @property
    def peak_bytes_by_category(self) -> dict[str, int]:
        """The live bytes at the moment of the peak, by what each storage turned out to be."""
        self._refresh()
        out = dict.fromkeys(CATEGORIES, 0)
        with self._critical():
            for rec in [*self._live.values(), *self._dead_since_peak]:
                if rec.born <= self._peak_seq and (rec.died is None or rec.died > self._peak_seq):
                    out[rec.category] += rec.nbytes
        return out

    @property
    def max_bytes_by_category(self) -> dict[str, int]:
        """Each category's own highest live total (reached at different moments, so no sum)."""
        self._refresh()
        with self._critical():
            return dict(self._max_by_category)

    def current_bytes_by_category(self) -> dict[str, int]:
        self._refresh()
        with self._critical():
            return dict(self._by_category)

    def reset_peak(self) -> None:
        with self._critical():
            self._peak, self._peak_seq = self._current, self._seq
            self._dead_since_peak.clear()

    # ----- session -----
    def __enter__(self) -> MemoryTracker:
        self._refresh()
        self.start_bytes = self._current
        for p in self._params():
            if p.requires_grad and hasattr(p, "register_post_accumulate_grad_hook"):
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_post_hook(lambda *_: self._mark_optim()))
        if self._gaps is not None:
            self._gaps.start()
        hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        mode = _Spy(self)
        for ctx in (hooks, mode):
            ctx.__enter__()
            self._contexts.append(ctx)
        return self

    def __exit__(self, *exc) -> None:
        while self._contexts:
            self._contexts.pop().__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._refresh()

    # ----- what is what -----
    def _params(self) -> list[torch.Tensor]:
        seen, out = set(), []
        tensors = list(self.model.parameters()) + list(self.model.buffers()) if self.model is not None else []
        if self.optimizer is not None:
            tensors += [p for g in self.optimizer.param_groups for p in g["params"]]
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        return out

    def _refresh(self) -> None:
        """(Re)label model and optimizer state; registers it if it is not tracked yet."""
        for p in self._params():
            self._label(p, "params")
            if p.grad is not None:
                self._label(p.grad, "grads")
        self._mark_optim()

    def _mark_optim(self) -> None:
        if self.optimizer is None:
            return
        for state in self.optimizer.state.values():
            for t in _tensors(state):
                self._label(t, "optim")

    def _on_grad(self, p: torch.Tensor) -> None:
        if p.grad is not None:
            self._label(p.grad, "grads")

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        st = self._storage(t)
        if st is not None:
            with self._critical():
                rec = self._live.get(st._cdata)
                if rec is not None and rec.category == "temporaries":
                    self._relabel(rec, "activations")
        return t.detach()

    def _counts(self, t: torch.Tensor) -> bool:
        d = self.device
        return d is None or (t.device.type == d.type and (d.index is None or t.device.index == d.index))

    def _round(self, nbytes: int) -> int:
        g = self.granularity_bytes
        return 0 if nbytes <= 0 else -(-nbytes // g) * g

    # ----- bookkeeping -----
    def _label(self, t: torch.Tensor, category: str) -> None:
        st = self._storage(t)
        if st is None or not self._counts(t):
            return
        with self._critical():
            rec = self._live.get(st._cdata)
            if rec is None:
                self._add(st, category)
            elif rec.category != category:
                self._relabel(rec, category)

    def _relabel(self, rec: _Storage, category: str) -> None:
        self._by_category[rec.category] -= rec.nbytes
        rec.category = category
        self._count_in(rec)

    def _count_in(self, rec: _Storage) -> None:
        total = self._by_category[rec.category] + rec.nbytes
        self._by_category[rec.category] = total
        if total > self._max_by_category[rec.category]:
            self._max_by_category[rec.category] = total

    def _on_op(self, func, args, kwargs, out) -> None:
        inputs = None
        for t in _tensors(out):
            st = self._storage(t, new=True)
            if st is None or not self._counts(t):
                continue
            with self._critical():
                rec = self._live.get(st._cdata)
                if rec is not None:
                    if rec.nbytes != self._round(int(st.nbytes())):
                        self._resize(st, rec)
                    continue
            if func not in _FRESH_OPS:
                if inputs is None:
                    inputs = {s._cdata for s in map(self._storage, _tensors((args, kwargs))) if s is not None}
                if st._cdata in inputs:
                    continue  # in place on a tensor that existed before tracking: not ours
            with self._critical():
                if st._cdata not in self._live:
                    self._add(st, "temporaries")

    def _transient(self, nbytes: int) -> None:
        """`nbytes` allocated and freed again where the dispatch mode could not see (a temporary)."""
        with self._critical():
            rec = _Storage(nbytes, "temporaries", born=0)
            self._grow(rec)
            self._registered(rec, nbytes, "inside an op")
            self._shrink(rec)

    def _registered(self, rec: _Storage, raw: int, kind: str) -> None:
        """A storage the tracker made up itself was counted in (the timeline keeps it)."""

    def _add(self, st, category: str) -> None:
        key = st._cdata
        rec = _Storage(self._round(int(st.nbytes())), category, born=0)
        rec.ref = weakref.ref(st, partial(self._on_death, key, rec))
        self._live[key] = rec
        self._grow(rec)

    def _grow(self, rec: _Storage) -> None:
        self._seq += 1
        rec.born = self._seq
        self._current += rec.nbytes
        self._count_in(rec)
        if self._current > self._peak:
            self._peak, self._peak_seq = self._current, self._seq
            self._dead_since_peak.clear()

    def _shrink(self, rec: _Storage) -> None:
        self._seq += 1
        rec.died = self._seq
        self._current -= rec.nbytes
        self._by_category[rec.category] -= rec.nbytes
        if rec.born <= self._peak_seq:
            self._dead_since_peak.append(rec)

    def _resize(self, st, old: _Storage) -> None:
        """A storage resized in place: the allocator takes the new block before freeing the old."""
        new = _Storage(self._round(int(st.nbytes())), old.category, born=0)
        self._live[st._cdata] = new
        self._grow(new)
        self._shrink(old)
        new.ref = weakref.ref(st, partial(self._on_death, st._cdata, new))

    @contextmanager
    def _critical(self):
        """The lock, plus a guard: a storage can die (and its callback run) on this very thread in the
        middle of an update, when an allocation triggers the garbage collector; such deaths wait in
        `_pending` until the update is complete."""
        with self._lock:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._pending:
                    self._depth = 1
                    try:
                        while self._pending:
                            key, rec = self._pending.pop()
                            if self._live.get(key) is rec:
                                del self._live[key]
                                self._shrink(rec)
                    finally:
                        self._depth = 0

    def _on_death(self, key: int, rec: _Storage, _ref) -> None:
        with self._critical():
            self._pending.append((key, rec))
