"""BitLinear with a folded prologue: Triton and PyTorch bodies against the twin (the unfused ops under
autograd), outputs and every gradient; the tensors it saves; meta, fake, opcheck and compile."""

import pytest
import torch

from mmprof.kernels import bitlinear as bitlinear_module
from mmprof.kernels._triton_util import interpreting
from mmprof.kernels.bitlinear import bitlinear, weight_quant
from mmprof.kernels.bitlinear_prologue import (
    PROLOGUES,
    _plain_backward_cuda,
    _plain_forward_cuda,
    bitlinear_prologue,
    bitlinear_prologue_ref,
    prologue_ref,
    quantized_input,
    ternary_weight,
)

BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1")),
    "torch",
]
# relative RMS error allowed per dtype, outputs and gradients. Quantization turns an ulp of difference
# at a rounding edge into a whole int8 level, so low precision needs more room than rounding alone.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# On a GPU the twin's reductions (mean of squares, sum of |W|) run in another order than the
# kernel's, so in fp32 a few activations per thousand rows land one int8 level apart (~1e-4).
GPU_TOLERANCE = {**TOLERANCE, torch.float32: 1e-3}
WITH_AUX = ("add_norm", "norm_gate")
PRE_NORMED = ("norm", "add_norm", "norm_gate")
# (rows, K, output widths): K and the rows are not multiples of the blocks; 1-3 projections
SHAPES = {"7x48-3proj": (7, 48, (40, 33, 17)), "33x96-1proj": (33, 96, (24,)), "1x16-2proj": (1, 16, (8, 5))}


def rel_rms_error(actual, expected):
    diff = (actual.double() - expected.double()).pow(2).mean().sqrt()
    return (diff / expected.double().pow(2).mean().sqrt().clamp_min(1e-30)).item()


def make_inputs(prologue, rows, k, outs, dtype, device="cpu"):
    """Fresh random leaves: x (2K wide for glu), aux, pre_weight, norm weights, weights."""

    def leaf(t):
        return t.to(device=device, dtype=dtype).requires_grad_()

    scale = 0.5 + torch.rand(rows, 1) * 3  # rows of different magnitude
    x = leaf(torch.randn(rows, 2 * k if prologue == "glu" else k) * scale)
    aux = leaf(torch.randn(rows, k)) if prologue in WITH_AUX else None
    pre = leaf(1 + 0.3 * torch.randn(k)) if prologue in PRE_NORMED else None
    norms = [leaf(1 + 0.3 * torch.randn(k)) for _ in outs]
    weights = [leaf(torch.randn(n, k) * 0.02) for n in outs]
    return x, aux, pre, norms, weights


def leaves(inputs):
    x, aux, pre, norms, weights = inputs
    return [t for t in (x, aux, pre, *norms, *weights) if t is not None]


def outputs_and_grads(fn, inputs, seed):
    ys, x2 = fn(inputs)
    outs = [*ys, *([x2] if x2 is not None else [])]
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outs)
    return outs, torch.autograd.grad(loss, leaves(inputs))


def check_against_twin(prologue, rows, k, outs, dtype, backend, device="cpu", autocast=False):
    torch.manual_seed(rows * 1000 + k)
    inputs = make_inputs(prologue, rows, k, outs, dtype, device)
    x, aux, pre, norms, weights = inputs
    context = torch.autocast(device, dtype=torch.bfloat16) if autocast else torch.autocast(device, enabled=False)
    with context:
        got, got_grads = outputs_and_grads(
            lambda i: bitlinear_prologue(prologue, i[0], i[3], i[4], aux=i[1], pre_weight=i[2], backend=backend),
            inputs, seed=k,
        )  # fmt: skip
        ref, ref_grads = outputs_and_grads(
            lambda i: bitlinear_prologue_ref(prologue, i[0], i[3], i[4], aux=i[1], pre_weight=i[2]), inputs, seed=k
        )
    tol = (GPU_TOLERANCE if device == "cuda" else TOLERANCE)[torch.bfloat16 if autocast else dtype]
    names = ["x", "aux", "pre_weight"] + [f"norm{j}" for j in range(len(outs))] + [f"w{j}" for j in range(len(outs))]
    names = [n for n, t in zip(names, (x, aux, pre, *norms, *weights)) if t is not None]
    for j, (a, b) in enumerate(zip(got, ref)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"output {j}"
        assert rel_rms_error(a, b) < tol, f"output {j}: {rel_rms_error(a, b)}"
    for name, a, b in zip(names, got_grads, ref_grads):
        assert a.dtype == b.dtype, name
        assert rel_rms_error(a, b) < tol, f"d{name}: {rel_rms_error(a, b)}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("prologue", PROLOGUES)
def test_matches_twin(prologue, shape, dtype, backend):
    check_against_twin(prologue, *shape, dtype, backend)


@pytest.mark.parametrize("prologue", ["norm", "add_norm"])
def test_matches_twin_under_bf16_autocast(prologue):
    """fp32 inputs, bf16 matmuls: the model's training setting (CPU autocast, PyTorch body)."""
    check_against_twin(prologue, 9, 40, (24, 16), torch.float32, "torch", autocast=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_input_is_the_straight_through_quantized_prologue(backend):
    torch.manual_seed(3)
    x, _, pre, (norm,), _ = make_inputs("norm", 11, 40, (1,), torch.float32)
    xq = quantized_input("norm", x, norm, torch.float32, pre_weight=pre, backend=backend)
    u, _ = prologue_ref("norm", x, pre_weight=pre)
    un = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + 1e-8) * norm
    s = 127 / un.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    expected = un + ((un * s).round().clamp(-128, 127) / s - un).detach()
    assert rel_rms_error(xq, expected) < 1e-6
    grad = torch.randn_like(xq)
    got = torch.autograd.grad((xq * grad).sum(), [x, pre, norm])
    ref = torch.autograd.grad((expected * grad).sum(), [x, pre, norm])
    assert all(rel_rms_error(a, b) < 1e-5 for a, b in zip(got, ref))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(5, 7), (3, 4096 + 13)], ids=["5x7", "3x4109"])
def test_ternary_weight_matches_the_quantizer_with_identity_gradient(shape, backend):
    torch.manual_seed(shape[1])
    w = (torch.randn(shape) * 0.02).requires_grad_()
    wq = ternary_weight(w, torch.float16, backend=backend)
    assert wq.dtype == torch.float16
    assert rel_rms_error(wq, weight_quant(w.detach()).half()) < 1e-6
    grad = torch.randn(shape, dtype=torch.float16)
    (d_w,) = torch.autograd.grad((wq * grad).sum(), [w])
    assert d_w.dtype == torch.float32 and torch.equal(d_w, grad.float())


@pytest.mark.parametrize("prologue", PROLOGUES)
def test_saves_only_inputs_and_row_statistics(prologue):
    rows, k, outs = 64, 96, (80, 72, 40)
    inputs = make_inputs(prologue, rows, k, outs[: 3 if prologue == "norm" else 1], torch.float32)
    x, aux, pre, norms, weights = inputs
    params = {t.untyped_storage().data_ptr() for t in (pre, *norms, *weights) if t is not None}

    def saved_bytes(fn):
        saved = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x, norms, weights, aux=aux, pre_weight=pre)
        return sum(saved.values())

    fused = saved_bytes(lambda *a, **kw: bitlinear_prologue(prologue, *a, **kw, backend="torch"))
    unfused = saved_bytes(lambda *a, **kw: bitlinear_prologue_ref(prologue, *a, **kw))
    inputs_bytes = sum(t.numel() * 4 for t in (x, aux) if t is not None)
    stats = rows * 4 * (1 + len(norms) + (prologue in PRE_NORMED))  # rstd, one scale per projection, pre rstd
    assert fused == inputs_bytes + stats
    assert unfused > 2 * fused, (unfused, fused)


@pytest.mark.parametrize("prologue", PROLOGUES)
def test_runs_on_meta_and_fake_tensors(prologue):
    from torch._subclasses.fake_tensor import FakeTensorMode

    for device, mode in (("meta", torch.device("meta")), ("cpu", FakeTensorMode())):
        with mode:
            x, aux, pre, norms, weights = make_inputs(prologue, 2048, 256, (512, 256), torch.float32, device)
            ys, x2 = bitlinear_prologue(prologue, x, norms, weights, aux=aux, pre_weight=pre)
            assert [y.shape for y in ys] == [(2048, 512), (2048, 256)]
            assert (x2 is not None) == (prologue == "add_norm")
            sum(y.sum() for y in ys).backward()
        assert x.grad.shape == x.shape and all(w.grad.shape == w.shape for w in (*norms, *weights))
        assert aux is None or aux.grad.shape == aux.shape


@pytest.mark.parametrize("prologue", PROLOGUES)
def test_opcheck(prologue):
    x, aux, pre, norms, weights = make_inputs(prologue, 6, 16, (8, 4), torch.float32)
    op = torch.ops.mmprof.bitlinear_prologue_fwd.default
    torch.library.opcheck(op, (x, aux, pre, norms, weights, torch.float32, prologue, 1e-6, 1e-8, True, "torch"))
    torch.library.opcheck(op, (x, aux, pre, norms[:1], [], torch.float32, prologue, 1e-6, 1e-8, False, "torch"))
    torch.library.opcheck(torch.ops.mmprof.ternary_weight.default, (weights[0], torch.float32, "torch"))


def test_compiles_in_one_graph():
    torch.manual_seed(5)
    inputs = make_inputs("add_norm", 10, 24, (16, 8), torch.float32)

    def fn(i):
        return bitlinear_prologue("add_norm", i[0], i[3], i[4], aux=i[1], pre_weight=i[2], backend="torch")

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got, got_grads = outputs_and_grads(compiled, inputs, seed=1)
    ref, ref_grads = outputs_and_grads(fn, inputs, seed=1)
    assert all(rel_rms_error(a, b) < 1e-6 for a, b in zip(got, ref))
    assert all(rel_rms_error(a, b) < 1e-6 for a, b in zip(got_grads, ref_grads))


def test_rejects_bad_arguments():
    x, aux, pre, norms, weights = make_inputs("add_norm", 3, 8, (4,), torch.float32)
    with pytest.raises(ValueError, match="unknown prologue"):
        bitlinear_prologue("layernorm", x, norms, weights)
    with pytest.raises(ValueError, match="needs aux"):
        bitlinear_prologue("add_norm", x, norms, weights, pre_weight=pre)
    with pytest.raises(ValueError, match="takes no pre_weight"):
        bitlinear_prologue("none", x, norms, weights, pre_weight=pre)
    with pytest.raises(ValueError, match="projections"):
        bitlinear_prologue("none", x, norms * 4, weights * 4)
    with pytest.raises(ValueError, match="weight"):
        bitlinear_prologue("none", x, norms, [weights[0].t()])
    with pytest.raises(ValueError, match="even"):
        bitlinear_prologue("glu", x[:, :7], norms, weights)


@pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_bodies_of_the_plain_op_match_vanilla(dtype):
    """The bodies registered for `mmprof::bitlinear_fused` on CUDA, run on CPU by the interpreter."""
    torch.manual_seed(9)
    x, _, _, (norm,), (weight,) = make_inputs("none", 21, 72, (40,), dtype)
    x = x.detach().reshape(3, 7, 72).requires_grad_()
    bitlinear_module.register_bodies("cpu", _plain_forward_cuda, _plain_backward_cuda)
    try:
        y = bitlinear(x, norm, weight, "fused")
    finally:
        bitlinear_module._REGISTERED.pop("cpu")
    y_ref = bitlinear(x, norm, weight, "vanilla")
    grad = torch.randn_like(y)
    bitlinear_module.register_bodies("cpu", _plain_forward_cuda, _plain_backward_cuda)
    try:
        got = torch.autograd.grad((y * grad).sum(), [x, norm, weight])
    finally:
        bitlinear_module._REGISTERED.pop("cpu")
    ref = torch.autograd.grad((y_ref * grad).sum(), [x, norm, weight])
    assert rel_rms_error(y, y_ref) < TOLERANCE[dtype]
    assert all(rel_rms_error(a, b) < TOLERANCE[dtype] for a, b in zip(got, ref))


# 1.3B shapes (hidden 2048, GLU 5632, vocab 32000), 4096 tokens
GPU_CASES = {
    "norm-ifg": ("norm", 4096, 2048, (2048, 2048, 2048)),
    "norm_gate-o": ("norm_gate", 4096, 2048, (2048,)),
    "add_norm-gate": ("add_norm", 4096, 2048, (11264,)),
    "glu-down": ("glu", 4096, 5632, (2048,)),
    "none-head": ("none", 4096, 2048, (32000,)),
    "odd": ("norm", 1000, 1000, (300, 77)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES.values(), ids=GPU_CASES.keys())
def test_matches_twin_on_gpu_under_bf16_autocast(case):
    check_against_twin(*case, torch.float32, "triton", device="cuda", autocast=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("prologue", PROLOGUES)
def test_matches_twin_on_gpu(prologue, dtype):
    check_against_twin(prologue, 777, 1000, (300, 129), dtype, "triton", device="cuda")


@pytest.mark.gpu
def test_plain_op_uses_triton_on_gpu_and_matches_vanilla():
    torch.manual_seed(4)
    x, _, _, (norm,), (weight,) = make_inputs("none", 4096, 2048, (2048,), torch.float32, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = bitlinear(x, norm, weight, "fused")
        y_ref = bitlinear(x, norm, weight, "vanilla")
    assert bitlinear_module._bodies("cuda")[0] is _plain_forward_cuda
    grad = torch.randn_like(y)
    got = torch.autograd.grad((y * grad).sum(), [x, norm, weight])
    ref = torch.autograd.grad((y_ref * grad).sum(), [x, norm, weight])
    assert rel_rms_error(y, y_ref) < TOLERANCE[torch.bfloat16]
    assert all(rel_rms_error(a, b) < TOLERANCE[torch.bfloat16] for a, b in zip(got, ref))
