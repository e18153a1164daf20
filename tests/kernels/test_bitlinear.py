"""BitLinear: every implementation (vanilla, ref-fused, fused) against the naive one, the quantizers
against their definition, and the bytes each saves for backward."""

import os

import pytest
import torch

from tests.workloads.helpers import saved_activation_bytes
from mmprof.kernels.ternary import weight_quant
from mmprof.kernels.bitlinear import (
    BitLinear,
    _backward_reference,
    _forward_reference,
    bitlinear,
    register_bodies,
)

SHAPES = {"3d-small": (2, 7, 32, 48), "2d-wide-out": (1, 5, 64, 200), "tall": (4, 33, 96, 24), "one-row": (1, 1, 16, 8)}


@pytest.fixture
def seed():
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    return value


def rel_rms(a, b):
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp(min=1e-30)).item()


def inputs(batch, steps, k, n, dtype=torch.float32):
    x = torch.randn(batch, steps, k) * (0.5 + torch.rand(batch, steps, 1) * 3)
    g = 0.5 + torch.rand(k)
    w = torch.randn(n, k) * 0.02
    return x.to(dtype), g.to(dtype), w.to(dtype)


def run(impl, x, g, w, grad_y=None, autocast=None):
    """Output, grads of x, g, w and the bytes of non-parameter tensors saved for backward."""
    x, g, w = (t.detach().clone().requires_grad_() for t in (x, g, w))

    def forward():  # one eps for all: the same function
        if autocast is None:
            return bitlinear(x, g, w, impl, eps=1e-8)
        with torch.autocast("cpu", dtype=autocast):
            return bitlinear(x, g, w, impl, eps=1e-8)

    y, saved_bytes = saved_activation_bytes(forward, params=(g, w))
    grad_y = torch.randn_like(y) if grad_y is None else grad_y
    y.backward(grad_y)
    return y.detach(), x.grad, g.grad, w.grad, saved_bytes, grad_y


IMPLS = ["vanilla", "ref-fused", "fused"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_naive_fp32(impl, shape, seed):
    x, g, w = inputs(*shape)
    ref = run("naive", x, g, w)
    got = run(impl, x, g, w, grad_y=ref[-1])
    for name, a, b in zip(("y", "dx", "dg", "dw"), got[:4], ref[:4]):
        assert a.dtype == b.dtype, name
        assert rel_rms(a, b) < 1e-5, f"{impl} {name} seed={seed}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(SHAPES.values())[:3], ids=list(SHAPES)[:3])
def test_matches_naive_bf16_autocast(impl, shape, seed):
    x, g, w = inputs(*shape)
    ref = run("naive", x, g, w, autocast=torch.bfloat16)
    got = run(impl, x, g, w, grad_y=ref[-1], autocast=torch.bfloat16)
    assert got[0].dtype == ref[0].dtype == torch.bfloat16
    for name, a, b, src in zip(("y", "dx", "dg", "dw"), got[:4], ref[:4], (None, x, g, w)):
        if src is not None:
            assert a.dtype == b.dtype == src.dtype, name
        assert rel_rms(a, b) < 1e-2, f"{impl} {name} seed={seed}"


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_naive_pure_bf16(impl, seed):
    x, g, w = inputs(2, 9, 64, 48, dtype=torch.bfloat16)
    ref = run("naive", x, g, w)
    got = run(impl, x, g, w, grad_y=ref[-1])
    for name, a, b in zip(("y", "dx", "dg", "dw"), got[:4], ref[:4]):
        assert a.dtype == b.dtype == torch.bfloat16, name
        assert rel_rms(a, b) < 2e-2, f"{impl} {name} seed={seed}"


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_ref_fused_saves_x_rstd_and_the_ternary_weight(autocast, seed):
    batch, steps, k, n = 4, 32, 128, 96
    x, g, w = inputs(batch, steps, k, n)
    saved = run("ref-fused", x, g, w, autocast=autocast)[4]
    weight_bytes = n * k * (2 if autocast else 4)  # the reference keeps it in the matmul dtype
    assert saved == x.numel() * x.element_size() + batch * steps * 4 + weight_bytes


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_fused_saves_only_x_and_row_statistics(autocast, seed):
    batch, steps, k, n = 4, 32, 128, 96
    x, g, w = inputs(batch, steps, k, n)
    vanilla_bytes = run("naive", x, g, w, autocast=autocast)[4]
    fused_bytes = run("fused", x, g, w, autocast=autocast)[4]
    rows = batch * steps
    assert fused_bytes == x.numel() * x.element_size() + 2 * rows * 4
    assert vanilla_bytes > 2 * fused_bytes, (vanilla_bytes, fused_bytes)


def test_output_is_integer_matmul_times_scales(seed):
    """y == (int8 activations @ ternary weights) / (activation scale * weight scale)."""
    x, g, w = inputs(3, 4, 48, 20)
    y = bitlinear(x, g, w, "fused")
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-8) * g
    s = 127 / xn.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    x_int = (xn * s).round().clamp(-128, 127)
    beta = w.abs().mean()
    w_int = (w / beta).round().clamp(-1, 1)
    assert set(w_int.unique().tolist()) <= {-1.0, 0.0, 1.0}
    expected = (x_int.double() @ w_int.double().t()) * beta.double() / s.double()
    assert rel_rms(y, expected) < 1e-5, f"seed={seed}"


def test_weight_quant_is_ternary_per_tensor(seed):
    w = torch.randn(17, 33) * torch.rand(1).item()
    wq = weight_quant(w)
    levels = wq.unique()
    assert len(levels) <= 3 and torch.allclose(levels.abs().max(), w.abs().mean(), rtol=1e-6)


def test_straight_through_weight_gradient(seed):
    x, g, w = inputs(2, 6, 32, 16)
    y, _, _, dw, _, gy = run("fused", x, g, w)
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-8) * g
    s = 127 / xn.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    xq = (xn * s).round().clamp(-128, 127) / s
    assert rel_rms(dw, gy.reshape(-1, 16).t() @ xq.reshape(-1, 32)) < 1e-5, f"seed={seed}"


def test_runs_on_meta_and_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for make in (lambda: torch.device("meta"), FakeTensorMode):
        with make():
            layer = BitLinear(64, 32, "fused")
            x = torch.randn(2, 8, 64, requires_grad=True)
            y = layer(x)
            y.sum().backward()
        assert y.shape == (2, 8, 32) and x.grad.shape == x.shape
        assert layer.weight.grad.shape == layer.weight.shape and layer.norm.weight.grad.shape == (64,)


def test_opcheck(seed):
    x, g, w = (t.requires_grad_() for t in inputs(1, 6, 16, 8))
    torch.library.opcheck(torch.ops.mmprof.bitlinear_fused.default, (x.reshape(6, 16), g, w, 1e-8, torch.float32))


def test_registered_body_is_the_one_dispatched(seed):
    calls = []

    def forward(*args):
        calls.append("forward")
        return _forward_reference(*args)

    def backward(*args):
        calls.append("backward")
        return _backward_reference(*args)

    register_bodies("cpu", forward, backward)
    try:
        x, g, w = inputs(1, 3, 16, 8)
        run("fused", x, g, w)
    finally:
        from mmprof.kernels import bitlinear as module

        module._REGISTERED.pop("cpu")
    assert calls == ["forward", "backward"]


def test_module_names_and_impl_check():
    layer = BitLinear(8, 4, "vanilla")
    assert layer.eps == 1e-8 and BitLinear(8, 4, "fused").eps == 1e-6 and BitLinear(8, 4, "ref-fused").eps == 1e-6
    assert {n: tuple(p.shape) for n, p in layer.named_parameters()} == {"weight": (4, 8), "norm.weight": (8,)}
    with pytest.raises(ValueError):
        BitLinear(8, 4, "triton")
