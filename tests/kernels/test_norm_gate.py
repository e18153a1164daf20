"""RMSNorm-SiLU output gate: Triton and PyTorch paths against the twin, outputs and every gradient."""

import pytest
import torch

from mmprof.kernels._triton_util import interpreting
from mmprof.kernels.norm_gate import rms_norm_silu_gate, rms_norm_silu_gate_ref

# Triton on CPU tensors runs in its interpreter (set up by tests/conftest.py when there is no GPU)
BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1")),
    "torch",
]
# relative RMS error allowed per input dtype (outputs and gradients)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}

SHAPES = [(1, 1), (7, 45), (3, 5, 64), (2, 9, 100)]  # [..., D], D not a power of two too


def rel_rms_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (actual.double() - expected.double()).pow(2).mean().sqrt()
    return (diff / expected.double().pow(2).mean().sqrt().clamp_min(1e-30)).item()


def check_against_twin(shape, dtype, backend, device="cpu"):
    torch.manual_seed(sum(shape))
    g = (torch.randn(shape, device=device) * 3).to(dtype).requires_grad_()
    c = (torch.randn(shape, device=device) * 2).to(dtype).requires_grad_()
    weight = (1 + 0.5 * torch.randn(shape[-1], device=device)).requires_grad_()
    out = rms_norm_silu_gate(g, c, weight, backend=backend)
    out_ref = rms_norm_silu_gate_ref(g, c, weight)
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == g.shape
    assert rel_rms_error(out, out_ref) < tol

    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [g, c, weight], grad_out)
    grads_ref = torch.autograd.grad(out_ref, [g, c, weight], grad_out)
    for name, grad, grad_ref in zip(["g", "c", "weight"], grads, grads_ref):
        assert grad.dtype == grad_ref.dtype, name
        if name == "g" and shape[-1] == 1:
            # RMSNorm of a single value is its sign: the gradient is zero up to rounding
            assert grad.abs().max() < 1e-3 and grad_ref.abs().max() < 1e-3
            continue
        assert rel_rms_error(grad, grad_ref) < tol, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_twin(shape, dtype, backend):
    check_against_twin(shape, dtype, backend)


def test_saves_inputs_and_row_statistics_only():
    rows, dim = 6, 32
    g = torch.randn(rows, dim, requires_grad=True)
    c = torch.randn(rows, dim, requires_grad=True)
    weight = torch.ones(dim, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rms_norm_silu_gate(g, c, weight, backend="torch")
    assert sorted(t.numel() for t in saved) == [rows, dim, rows * dim, rows * dim]
    assert any(t is g for t in saved) and any(t is c for t in saved)


def test_runs_on_meta_tensors():
    g = torch.empty(2, 2048, 2048, device="meta", dtype=torch.bfloat16, requires_grad=True)
    c = torch.empty_like(g, requires_grad=True)
    weight = torch.empty(2048, device="meta", requires_grad=True)
    out = rms_norm_silu_gate(g, c, weight)
    assert out.shape == g.shape and out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert g.grad.shape == g.shape and weight.grad.shape == weight.shape


def test_opcheck():
    g, c = torch.randn(4, 12), torch.randn(4, 12)
    weight = torch.randn(12)
    for t in (g, c, weight):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.mmprof.norm_gate_fwd.default, (g, c, weight, 1e-6, "torch"))


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        rms_norm_silu_gate(torch.randn(2, 4), torch.randn(2, 5), torch.ones(4))
    with pytest.raises(ValueError, match="weight"):
        rms_norm_silu_gate(torch.randn(2, 4), torch.randn(2, 4), torch.ones(5))


def test_compiles_in_one_graph():
    torch.manual_seed(5)
    g, c = torch.randn(3, 4, 20, requires_grad=True), torch.randn(3, 4, 20, requires_grad=True)
    weight = torch.randn(20, requires_grad=True)
    compiled = torch.compile(lambda *a: rms_norm_silu_gate(*a, backend="torch"), backend="aot_eager", fullgraph=True)
    out = compiled(g, c, weight)
    out_ref = rms_norm_silu_gate_ref(g, c, weight)
    grads = torch.autograd.grad(out.sum(), [g, c, weight])
    grads_ref = torch.autograd.grad(out_ref.sum(), [g, c, weight])
    assert rel_rms_error(out, out_ref) < 1e-5
    assert all(rel_rms_error(a, b) < 1e-5 for a, b in zip(grads, grads_ref))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", [(300, 200), (2, 2048, 2048), (5, 5120)], ids=lambda s: "x".join(map(str, s)))
def test_matches_twin_on_gpu(shape, dtype):
    check_against_twin(shape, dtype, "triton", device="cuda")
