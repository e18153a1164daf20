"""Small helpers shared by the workload tests."""

import torch


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMS of (a - b) relative to the RMS of b."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp(min=1e-30)).item()


def saved_activation_bytes(fn, params=()):
    """Run fn() and return (its result, bytes of distinct non-parameter storages saved for backward)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(saved.values())
