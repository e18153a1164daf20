"""A MemoryTracker that also keeps its timeline: every allocation and free, in order, with labels.

Each storage it sees is kept with its exact byte count (before allocator rounding), its final
category, a `kind` (a label the caller sets, or `kind_of()` returns, when it is first saved for
backward: the training-memory estimate gives the kind of the innermost module running) and a `tag` on each of its events (a
segment label the caller sets: the estimate passes the block being run, so that a timeline traced
with a few blocks can be repeated into one with many). Where the caller's tag is the root (None),
events take the tag of the owned storage (parameter, gradient or optimizer state) the op last
touched, so an optimizer's per-parameter loop is labelled by the parameters' owners too.

`timeline()` returns the events as arrays (storage index, +1 / -1, tag) and the storages' sizes,
categories and kinds, which `replay_peak` turns back into a peak and its breakdown.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from .tracker import CATEGORIES, MemoryTracker, _Storage, _tensors

ROOT = -1


@dataclass
class Timeline:
    """Events (storage, sign, tag) and per-storage raw bytes, category index and kind label."""

    storage: np.ndarray      # int64 [events]
    sign: np.ndarray         # int64 [events], +1 born / -1 died
    tag: np.ndarray          # int64 [events], ROOT or the caller's segment label
    raw_bytes: np.ndarray    # int64 [storages], exact bytes
    category: np.ndarray     # int64 [storages], index into CATEGORIES
    kind: list[str]          # [storages]
    step_start: int          # events before this index existed before the step (the tracker's start)


class TimelineTracker(MemoryTracker):
    """`MemoryTracker` keeping every event. Set `tag` and `kind` while it runs; `owners` maps the
    storages of tensors that belong to a segment (parameters, their optimizer state) to its tag."""

    def __init__(self, *args, owners: dict[int, int] | None = None, kind_of=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tag: int = ROOT
        self.kind: str = "other"
        self._kind_of = kind_of                   # () -> str, asked when a tensor is saved for backward
        self._sticky = ROOT
        self._owners = dict(owners or {})        # id(tensor) -> tag, resolved to storages on entry
        self._owner_of_storage: dict[int, int] = {}
        self._events: list[tuple[int, int, int]] = []
        self._recs: list[_Storage] = []
        self._index: dict[int, int] = {}          # id(_Storage) -> index
        self._step_start = 0
        self._held: list[_Storage] = []           # what `hold` counts, alive to the end

    # ----- labels -----
    def set_tag(self, tag: int) -> None:
        self.tag = tag
        self._sticky = ROOT

    def _effective_tag(self, rec: _Storage | None = None) -> int:
        if self.tag != ROOT:
            return self.tag
        owner = getattr(rec, "owner", ROOT) if rec is not None else ROOT
        return owner if owner != ROOT else self._sticky

    def __enter__(self):
        for t in self._owned_tensors():
            if t is not None and t.layout == torch.strided:
                self._owner_of_storage[t.untyped_storage()._cdata] = self._owners.get(id(t), ROOT)
        super().__enter__()
        self._step_start = len(self._events)
        return self

    def _owned_tensors(self):
        for p in self._params():
            yield p
            if self.optimizer is not None and p in self.optimizer.state:
                for t in _tensors(self.optimizer.state[p]):
                    self._owners.setdefault(id(t), self._owners.get(id(p), ROOT))
                    yield t

    def _counts(self, t: torch.Tensor) -> bool:
        """On meta, every device: on meta, an optimizer's host-side step counters stand for the device tensors
        a GPU's fused optimizer keeps (a fake-tensor trace on 'cpu' counts them too)."""
        return self.device is None or self.device.type == "meta" or super()._counts(t)

    def hold(self, nbytes: int, category: str, kind: str) -> None:
        """Count `nbytes` from now to the end as a storage of `category` and `kind` that the traced
        program does not allocate but the program it models holds (FSDP2's gradient shards)."""
        with self._critical():
            rec = _Storage(self._round(nbytes), category, born=0)
            self._held.append(rec)
            self._grow(rec)
            self._registered(rec, nbytes, kind)

    # ----- bookkeeping hooks -----
    def _on_op(self, func, args, kwargs, out) -> None:
        if self.tag == ROOT and self._owner_of_storage:
            for t in _tensors((args, kwargs)):
                if t.layout == torch.strided:
                    owner = self._owner_of_storage.get(t.untyped_storage()._cdata)
                    if owner is not None:
                        self._sticky = owner
                        break
        super()._on_op(func, args, kwargs, out)

    def _on_grad(self, p: torch.Tensor) -> None:
        super()._on_grad(p)
        if p.grad is not None and p.grad.layout == torch.strided:
            owner = self._owners.get(id(p), ROOT)
            key = p.grad.untyped_storage()._cdata
            self._owner_of_storage[key] = owner
            rec = self._live.get(key)
            if rec is not None:
                rec.owner = owner

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        st = self._storage(t)
        if st is not None:
            rec = self._live.get(st._cdata)
            if rec is not None and rec.category == "temporaries":
                rec.kind = self._kind_of() if self._kind_of else self.kind   # the module that saves it
        return super()._pack(t)

    def _add(self, st, category: str) -> None:
        super()._add(st, category)
        rec = self._live[st._cdata]
        rec.kind = self.kind
        rec.owner = self._owner_of_storage.get(st._cdata, ROOT)
        self._register(rec, st.nbytes())

    def _registered(self, rec: _Storage, raw: int, kind: str) -> None:
        rec.kind, rec.owner = kind, ROOT
        self._register(rec, raw)

    def _register(self, rec: _Storage, raw: int) -> None:
        rec.raw = int(raw)
        self._index[id(rec)] = len(self._recs)
        self._recs.append(rec)
        self._events.append((len(self._recs) - 1, 1, self._effective_tag(rec)))

    def _resize(self, st, old: _Storage) -> None:
        new = _Storage(self._round(int(st.nbytes())), old.category, born=0)
        new.kind, new.owner = old.kind, getattr(old, "owner", ROOT)
        self._live[st._cdata] = new
        self._grow(new)
        self._register(new, st.nbytes())
        self._shrink(old)
        new.ref = weakref.ref(st, partial(self._on_death, st._cdata, new))

    def _shrink(self, rec: _Storage) -> None:
        super()._shrink(rec)
        idx = self._index.get(id(rec))
        if idx is not None:
            self._events.append((idx, -1, self._effective_tag(rec)))

    # ----- results -----
    def timeline(self) -> Timeline:
        ev = _sorted_deaths(np.array(self._events, dtype=np.int64).reshape(-1, 3))
        return Timeline(
            storage=ev[:, 0], sign=ev[:, 1], tag=ev[:, 2],
            raw_bytes=np.array([getattr(r, "raw", r.nbytes) for r in self._recs], dtype=np.int64),
            category=np.array([CATEGORIES.index(r.category) for r in self._recs], dtype=np.int64),
            kind=[getattr(r, "kind", "other") for r in self._recs],
            step_start=self._step_start,
        )


def _sorted_deaths(ev: np.ndarray) -> np.ndarray:
    """Frees that follow one another with one tag, in storage order: storages freed together (a
    dict of saved tensors dropped, a garbage collection) die in no fixed order, and their order
    changes no total between two allocations."""
    if len(ev) == 0:
        return ev
    key = np.cumsum(np.concatenate(([1], (ev[1:, 1] != ev[:-1, 1]) | (ev[1:, 2] != ev[:-1, 2]) | (ev[1:, 1] > 0))))
    order = np.lexsort((ev[:, 0], key))
    return ev[order]
