"""Fake tensors for memory estimates: shapes, dtypes and devices, but no memory behind them."""

from __future__ import annotations

from torch._subclasses.fake_tensor import FakeTensorMode


def fake_tensor_mode() -> FakeTensorMode:
    """A FakeTensorMode to build and run a model in without allocating anything.

    Enter it before a MemoryTracker (the tracker must sit inside it to see fake outputs). Real tensors
    made outside and used inside are converted to fake ones.
    """
    return FakeTensorMode(allow_non_fake_inputs=True)
