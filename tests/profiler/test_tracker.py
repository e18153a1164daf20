"""The live-tensor tracker on cpu, meta and fake tensors: exact state bytes, categories, peaks."""

import functools
import random
from contextlib import nullcontext

import pytest
import torch
from torch import nn

from mmprof.profiler import CATEGORIES, MemoryTracker, fake_tensor_mode


def _round(nbytes, g):
    return 0 if nbytes == 0 else -(-nbytes // g) * g


def _model(rng, device):
    d_in, d_h, vocab = rng.randint(3, 40), rng.randint(3, 64), rng.randint(5, 50)
    return nn.ModuleDict({
        "emb": nn.Embedding(vocab, d_in, device=device),
        "mlp": nn.Sequential(nn.Linear(d_in, d_h, device=device), nn.GELU(), nn.LayerNorm(d_h, device=device),
                             nn.Linear(d_h, d_in, bias=False, device=device)),
    }), vocab


def _step(model, vocab, rng, device):
    ids = torch.randint(0, vocab, (rng.randint(1, 4), rng.randint(2, 9)), device=device)
    h = model["emb"](ids)
    return (model["mlp"](h) - h).square().mean()


def _expected(model, granularity, step_counted):
    params = sum(_round(p.numel() * p.element_size(), granularity) for p in model.parameters())
    n = len(list(model.parameters()))
    optim = 2 * params + (n * _round(4, granularity) if step_counted else 0)
    return params, optim


@pytest.mark.parametrize("where", ["cpu", "meta", "fake-cpu"])
@pytest.mark.parametrize("granularity", [512, 1])
def test_adamw_step_state_bytes_are_exact(where, granularity):
    rng = random.Random()
    device = "meta" if where == "meta" else "cpu"
    with fake_tensor_mode() if where == "fake-cpu" else nullcontext():
        model, vocab = _model(rng, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with MemoryTracker(model, opt, granularity_bytes=granularity) as mt:
            assert mt.start_bytes == _expected(model, granularity, False)[0]
            loss = _step(model, vocab, rng, device)
            act_forward = mt.current_bytes_by_category()["activations"]
            loss.backward()
            opt.step()
    params, optim = _expected(model, granularity, step_counted=where != "meta")  # AdamW's step lives on cpu
    now = mt.current_bytes_by_category()
    assert now["params"] == params
    assert now["grads"] == params
    assert now["optim"] == optim
    assert act_forward > 0
    peak = mt.peak_bytes_by_category
    assert mt.max_bytes_by_category["optim"] == optim
    assert all(mt.max_bytes_by_category[c] >= peak[c] for c in CATEGORIES)
    assert set(peak) == set(CATEGORIES)
    assert sum(peak.values()) == mt.peak_bytes
    assert peak["params"] == params
    assert mt.peak_bytes >= 2 * params + optim


def test_second_step_starts_from_existing_state():
    rng = random.Random()
    model, vocab = _model(rng, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _step(model, vocab, rng, "cpu").backward()
    opt.step()
    params, optim = _expected(model, 512, True)
    with MemoryTracker(model, opt) as mt:
        assert mt.start_bytes == 2 * params + optim
        opt.zero_grad(set_to_none=True)
        assert mt.current_bytes_by_category()["grads"] == 0  # freed when the storage died
        _step(model, vocab, rng, "cpu").backward()
        opt.step()
    assert mt.current_bytes_by_category()["grads"] == params
    assert mt.peak_bytes > mt.start_bytes


def test_grads_freed_before_the_query_still_count_as_grads_at_the_peak():
    n = random.randint(200, 300)
    model = nn.Linear(n, n)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with MemoryTracker(model, opt, granularity_bytes=1) as mt:
        model(torch.randn(1, n)).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)  # the grads die before anyone asks
    assert mt.current_bytes_by_category()["grads"] == 0
    assert mt.peak_bytes_by_category["grads"] == (n * n + n) * 4
    assert mt.max_bytes_by_category["grads"] == (n * n + n) * 4
    assert mt.max_bytes_by_category["params"] == (n * n + n) * 4


def test_activations_are_the_tensors_saved_for_backward():
    w = torch.randn(64, 64, requires_grad=True)
    with MemoryTracker(device="cpu", granularity_bytes=1) as mt:
        x = torch.randn(32, 64)
        h = torch.tanh(x @ w)  # tanh saves its output; mm saves x (and w, pre-existing)
        loss = h.sum()
        cats = mt.current_bytes_by_category()
        assert cats["activations"] == 2 * 32 * 64 * 4
        del h, loss  # the graph dies with the last reference
        assert mt.current_bytes_by_category()["activations"] == 32 * 64 * 4  # x is still held here
        del x
        assert mt.current_bytes() == 0


def test_views_count_once_and_free_with_the_last_one():
    n = random.randint(1000, 5000)
    with MemoryTracker(device="cpu") as mt:
        a = torch.empty(n)
        views = [a[::2], a.view(-1, 1), a.unsqueeze(0).expand(3, n), a.detach()]
        assert mt.current_bytes() == _round(4 * n, 512)
        del a
        assert mt.current_bytes() == _round(4 * n, 512)
        del views
        assert mt.current_bytes() == 0
    assert mt.peak_bytes == _round(4 * n, 512)


def test_inplace_on_old_tensors_is_free_and_fresh_tensors_count():
    old = torch.zeros(1000)
    with MemoryTracker(device="cpu", granularity_bytes=1) as mt:
        old.add_(1)
        old.mul_(2)
        assert mt.current_bytes() == 0
        lit = torch.tensor([1.0, 2.0, 3.0])  # built from Python data (lift_fresh)
        grown = torch.empty(0)
        grown.resize_(250)
        assert mt.current_bytes() == 12 + 1000
        del lit, grown
    assert mt.current_bytes() == 0 and mt.peak_bytes >= 1012


def test_random_alloc_free_sequence_matches_brute_force():
    rng = random.Random()
    g = rng.choice([1, 512])
    live, peak = {}, 0
    with MemoryTracker(device="cpu", granularity_bytes=g) as mt:
        for k in range(300):
            if live and rng.random() < 0.45:
                del live[rng.choice(list(live))]
            else:
                live[k] = torch.empty(rng.randint(0, 3000), dtype=rng.choice([torch.float32, torch.int8]))
            total = sum(_round(t.numel() * t.element_size(), g) for t in live.values())
            peak = max(peak, total)
            assert mt.current_bytes() == total
    assert mt.peak_bytes == peak
    assert sum(mt.peak_bytes_by_category.values()) == peak


def test_device_filter_ignores_other_devices():
    with MemoryTracker(device="meta", granularity_bytes=1) as mt:
        a = torch.empty(100, device="meta")
        b = torch.empty(100)
        assert mt.current_bytes() == 400
        del a, b


def test_sparse_tensors_are_counted_as_untracked_not_as_bytes():
    from mmprof.profiler import MemoryTracker

    dense = torch.randn(64, 64)
    with MemoryTracker(granularity_bytes=1) as mt:
        sp = dense.to_sparse()
        kept = dense * 2
    assert mt.untracked_tensors >= 1
    assert mt.peak_bytes >= kept.numel() * 4
    del sp


class _ScriptedAllocator:
    """The two CUDA allocator statistics the tracker reads, moved by hand: `current`, and `peak` since reset."""

    def __init__(self, monkeypatch):
        self.current = self.peak = 0
        monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: {
            "allocated_bytes.all.current": self.current, "allocated_bytes.all.peak": self.peak})
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: setattr(self, "peak", self.current))
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: self.current)

    def run(self, nbytes_held, nbytes_freed):
        self.current += nbytes_held + nbytes_freed
        self.peak = max(self.peak, self.current)
        self.current -= nbytes_freed


def test_allocator_gaps_count_what_rose_unseen_and_not_what_was_freed(monkeypatch):
    from mmprof.profiler.tracker import _AllocatorGaps

    alloc = _ScriptedAllocator(monkeypatch)
    alloc.current = 1 << 20                        # held before tracking: not the tracker's
    mt = MemoryTracker(granularity_bytes=1)
    gaps = _AllocatorGaps(torch.device("cuda", 0))
    gaps.start()
    alloc.run(4096, 0)                             # an op's output, still held: no gap
    gaps.settle(mt)
    assert mt.peak_bytes == 0
    alloc.run(0, 8192)                             # inside an op: 8 KiB made and freed
    gaps.settle(mt)
    assert mt.peak_bytes == 8192 and mt.current_bytes() == 0
    alloc.current -= 4096                          # a free only: the level falls, nothing counted
    gaps.settle(mt)
    alloc.run(1024, 2048)                          # 1 KiB kept and 2 KiB freed: the gap is the 2 KiB
    gaps.settle(mt)
    assert mt.peak_bytes == 8192 and mt.peak_bytes_by_category["temporaries"] == 8192


@functools.cache
def _hidden_scratch_op():
    @torch.library.custom_op("mmprof_test::hidden_scratch", mutates_args=())
    def hidden_scratch(x: torch.Tensor) -> torch.Tensor:
        scratch = torch.empty(64 << 20, device=x.device, dtype=torch.float32)   # 256 MiB, freed inside
        scratch.fill_(1.0)
        return x * scratch[: x.numel()].view_as(x)

    return hidden_scratch


@pytest.mark.gpu
@pytest.mark.parametrize("gaps", [False, True])
def test_a_custom_ops_hidden_temporary_reaches_the_peak_only_with_allocator_gaps(gaps):
    """A custom op's internal allocations are below the dispatch mode; the allocator gaps see them
    (the tracker resets the allocator's peak at every op, so the allocator's own figure is taken first)."""
    op = _hidden_scratch_op()
    x = torch.randn(1024, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    y = op(x)
    seen = torch.cuda.max_memory_allocated() - base
    del y
    assert seen >= 256 << 20
    with MemoryTracker(device="cuda:0", allocator_gaps=gaps) as mt:
        y = op(x)
    if gaps:
        assert mt.peak_bytes == pytest.approx(seen, abs=2 << 20)
        assert mt.peak_bytes_by_category["temporaries"] >= 256 << 20
    else:
        assert mt.peak_bytes < seen - (250 << 20)
    del y
