"""MLGRU recurrence: Triton and PyTorch paths against the step-by-step twin, outputs and every gradient."""

import pytest
import torch

from mmprof.kernels._triton_util import interpreting
from mmprof.kernels.mlgru import mlgru, mlgru_ref, mlgru_step

# Triton on CPU tensors runs in its interpreter (set up by tests/conftest.py when there is no GPU)
BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1")),
    "torch",
]
# relative RMS error allowed per input dtype (outputs and gradients)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}

SHAPES = [(1, 1, 1), (2, 37, 45), (3, 16, 32), (1, 70, 19)]  # (B, T, D): not multiples of the tiles too


def rel_rms_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (actual.double() - expected.double()).pow(2).mean().sqrt()
    return (diff / expected.double().pow(2).mean().sqrt().clamp_min(1e-30)).item()


def make_inputs(batch, steps, dim, dtype, device="cpu", with_state=True, zero_lb=False):
    f_pre = (torch.randn(batch, steps, dim, device=device) * 2).to(dtype).requires_grad_()
    i_pre = (torch.randn(batch, steps, dim, device=device) * 2).to(dtype).requires_grad_()
    lb = torch.zeros(dim, device=device) if zero_lb else torch.rand(dim, device=device) * 0.9
    lb.requires_grad_()
    state = torch.randn(batch, dim, device=device).requires_grad_() if with_state else None
    return f_pre, i_pre, lb, state


def check_against_twin(batch, steps, dim, dtype, backend, device="cpu", with_state=True, zero_lb=False):
    torch.manual_seed(batch * 1000 + steps * 10 + dim)
    f_pre, i_pre, lb, state = make_inputs(batch, steps, dim, dtype, device, with_state, zero_lb)
    leaves = [f_pre, i_pre, lb] + ([state] if with_state else [])
    h, final = mlgru(f_pre, i_pre, lb, state, backend=backend)
    h_ref, final_ref = mlgru_ref(f_pre, i_pre, lb, state)
    assert h.dtype == dtype and h.shape == (batch, steps, dim)
    assert final.dtype == torch.float32 and final.shape == (batch, dim)
    tol = TOLERANCE[dtype]
    assert rel_rms_error(h, h_ref) < tol
    assert rel_rms_error(final, final_ref) < tol

    dh = torch.randn_like(h)
    dfinal = torch.randn_like(final)
    grads = torch.autograd.grad((h.float() * dh).sum() + (final * dfinal).sum(), leaves)
    grads_ref = torch.autograd.grad((h_ref.float() * dh).sum() + (final_ref * dfinal).sum(), leaves)
    for name, g, g_ref in zip(["f_pre", "i_pre", "lower_bound", "state"], grads, grads_ref):
        assert g.dtype == g_ref.dtype, name
        assert rel_rms_error(g, g_ref) < tol, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-D{}".format(*s))
def test_matches_twin(shape, dtype, backend):
    check_against_twin(*shape, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_state_and_zero_lower_bound(backend):
    check_against_twin(2, 21, 24, torch.float32, backend, with_state=False, zero_lb=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_h_used(backend):
    """final_state unused: its gradient is absent, and backward must still be right."""
    torch.manual_seed(1)
    f_pre, i_pre, lb, state = make_inputs(2, 11, 9, torch.float32)
    grads = torch.autograd.grad(mlgru(f_pre, i_pre, lb, state, backend=backend)[0].sum(), [f_pre, lb, state])
    grads_ref = torch.autograd.grad(mlgru_ref(f_pre, i_pre, lb, state)[0].sum(), [f_pre, lb, state])
    for g, g_ref in zip(grads, grads_ref):
        assert rel_rms_error(g, g_ref) < 1e-5


def test_saves_only_inputs_and_output():
    """Backward keeps f_pre, i_pre and h (plus the small lower bound and state): no gate tensors."""
    batch, steps, dim = 2, 9, 8
    f_pre, i_pre, lb, state = make_inputs(batch, steps, dim, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        h, _ = mlgru(f_pre, i_pre, lb, state, backend="torch")
    big = [t for t in saved if t.numel() >= batch * steps * dim]
    assert len(big) == 3
    assert any(t is f_pre for t in big) and any(t is i_pre for t in big)
    assert any(t.data_ptr() == h.data_ptr() for t in big)
    assert sum(t.numel() for t in saved) == 3 * batch * steps * dim + dim + batch * dim


def test_runs_on_meta_tensors():
    f_pre = torch.empty(4, 2048, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    i_pre = torch.empty_like(f_pre, requires_grad=True)
    lb = torch.empty(64, device="meta", requires_grad=True)
    h, final = mlgru(f_pre, i_pre, lb)
    assert h.shape == (4, 2048, 64) and h.dtype == torch.bfloat16 and h.device.type == "meta"
    assert final.shape == (4, 64) and final.dtype == torch.float32
    (h.float().sum() + final.sum()).backward()
    assert f_pre.grad.shape == f_pre.shape and lb.grad.shape == lb.shape


def test_opcheck():
    f_pre, i_pre, lb, state = make_inputs(2, 5, 6, torch.float32)
    torch.library.opcheck(torch.ops.mmprof.mlgru_fwd.default, (f_pre, i_pre, lb, state, "torch"))
    torch.library.opcheck(torch.ops.mmprof.mlgru_fwd.default, (f_pre, i_pre, lb, None, "torch"))


def test_step_by_step_decoding_equals_sequence():
    torch.manual_seed(2)
    f_pre, i_pre, lb, state = make_inputs(3, 6, 10, torch.float32)
    h_ref, final_ref = mlgru_ref(f_pre, i_pre, lb, state)
    c = state
    for t in range(6):
        h_t, c = mlgru_step(f_pre[:, t], i_pre[:, t], lb, c)
        assert rel_rms_error(h_t, h_ref[:, t]) < 1e-6
    assert rel_rms_error(c, final_ref) < 1e-6


def test_rejects_bad_arguments():
    f_pre, i_pre, lb, _ = make_inputs(2, 3, 4, torch.float32)
    with pytest.raises(ValueError, match="backend"):
        mlgru(f_pre, i_pre, lb, backend="cuda")
    with pytest.raises(ValueError, match="lower_bound"):
        mlgru(f_pre, i_pre, lb[:3])
    with pytest.raises(ValueError, match="state"):
        mlgru(f_pre, i_pre, lb, torch.zeros(3, 4))


@pytest.mark.skipif(interpreting(), reason="the interpreter runs Triton on CPU tensors")
def test_triton_on_cpu_without_interpreter_is_an_error():
    f_pre, i_pre, lb, _ = make_inputs(1, 2, 3, torch.float32)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        mlgru(f_pre, i_pre, lb, backend="triton")


def test_compiles_in_one_graph():
    torch.manual_seed(5)
    f_pre, i_pre, lb, state = make_inputs(2, 7, 12, torch.float32)
    compiled = torch.compile(lambda *a: mlgru(*a, backend="torch"), backend="aot_eager", fullgraph=True)
    h, final = compiled(f_pre, i_pre, lb, state)
    h_ref, final_ref = mlgru_ref(f_pre, i_pre, lb, state)
    grads = torch.autograd.grad(h.sum() + final.sum(), [f_pre, i_pre, lb, state])
    grads_ref = torch.autograd.grad(h_ref.sum() + final_ref.sum(), [f_pre, i_pre, lb, state])
    assert rel_rms_error(h, h_ref) < 1e-5
    assert all(rel_rms_error(g, r) < 1e-5 for g, r in zip(grads, grads_ref))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", [(2, 300, 200), (4, 2048, 256), (1, 1, 2048)], ids=lambda s: "B{}-T{}-D{}".format(*s))
def test_matches_twin_on_gpu(shape, dtype):
    check_against_twin(*shape, dtype, "triton", device="cuda")
