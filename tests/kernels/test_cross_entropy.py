"""Chunked linear cross-entropy against F.cross_entropy on full fp32 logits; what backward keeps."""

import pytest
import torch

from mmprof.kernels._triton_util import interpreting
from mmprof.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_ref

# Triton on CPU tensors runs in its interpreter (set up by tests/conftest.py when there is no GPU)
BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1")),
    "torch",
]
# relative RMS error allowed per input dtype (outputs and gradients)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}

# (tokens, hidden, vocab, chunk_tokens): chunks that do not divide the tokens, vocab not a power of two
CASES = [(1, 8, 5, 4), (17, 16, 100, 5), (32, 24, 77, 32), (40, 12, 33, 64)]


def rel_rms_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (actual.double() - expected.double()).pow(2).mean().sqrt()
    return (diff / expected.double().pow(2).mean().sqrt().clamp_min(1e-30)).item()


def make_inputs(tokens, hidden, vocab, dtype, device="cpu", ignored=0.2):
    x = torch.randn(tokens, hidden, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden, device=device) / hidden**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=device)
    labels[torch.rand(tokens, device=device) < ignored] = -100
    labels[0] = 1 % vocab  # at least one token counts
    return x, weight, labels


def check_against_twin(tokens, hidden, vocab, chunk_tokens, dtype, backend, device="cpu"):
    torch.manual_seed(tokens + hidden + vocab)
    x, weight, labels = make_inputs(tokens, hidden, vocab, dtype, device)
    loss = linear_cross_entropy(x, weight, labels, chunk_tokens=chunk_tokens, backend=backend)
    loss_ref = linear_cross_entropy_ref(x, weight, labels)
    tol = TOLERANCE[dtype]
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert rel_rms_error(loss, loss_ref) < tol
    grads = torch.autograd.grad(loss * 3.0, [x, weight])
    grads_ref = torch.autograd.grad(loss_ref * 3.0, [x, weight])
    for name, grad, grad_ref in zip(["x", "weight"], grads, grads_ref):
        assert grad.dtype == dtype, name
        assert rel_rms_error(grad, grad_ref) < tol, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}-H{}-V{}-chunk{}".format(*c))
def test_matches_twin(case, dtype, backend):
    check_against_twin(*case, dtype, backend)


def test_batched_input_and_custom_ignore_index():
    torch.manual_seed(3)
    x = torch.randn(2, 7, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    labels = torch.randint(0, 11, (2, 7))
    labels[0, :3] = 5
    loss = linear_cross_entropy(x, weight, labels, chunk_tokens=4, ignore_index=5)
    loss_ref = torch.nn.functional.cross_entropy((x @ weight.T).reshape(-1, 11), labels.reshape(-1), ignore_index=5)
    assert rel_rms_error(loss, loss_ref) < 1e-5
    grads = torch.autograd.grad(loss, [x, weight])
    grads_ref = torch.autograd.grad(loss_ref, [x, weight])
    assert all(rel_rms_error(g, r) < 1e-5 for g, r in zip(grads, grads_ref))


def test_all_tokens_ignored_gives_nan_like_torch():
    x, weight, _ = make_inputs(4, 8, 6, torch.float32)
    labels = torch.full((4,), -100)
    loss = linear_cross_entropy(x, weight, labels, chunk_tokens=3)
    assert torch.isnan(loss) and torch.isnan(linear_cross_entropy_ref(x, weight, labels))
    grad_x, grad_w = torch.autograd.grad(loss, [x, weight])
    assert not grad_x.any() and not grad_w.any()


def test_nothing_of_size_tokens_by_vocab_is_saved():
    tokens, hidden, vocab = 64, 8, 96
    x, weight, labels = make_inputs(tokens, hidden, vocab, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = linear_cross_entropy(x, weight, labels, chunk_tokens=16, backend="torch")
    assert max(t.numel() for t in saved) < tokens * vocab
    assert sorted(t.numel() for t in saved) == sorted([tokens * hidden, vocab * hidden, tokens, tokens])
    loss.backward()
    # the twin keeps the full logits, which is what this op avoids
    saved_ref = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_ref.append(t) or t, lambda t: t):
        linear_cross_entropy_ref(x, weight, labels)
    assert max(t.numel() for t in saved_ref) >= tokens * vocab


def test_autocast_computes_in_half_precision():
    torch.manual_seed(4)
    x = torch.randn(9, 16, requires_grad=True)
    weight = torch.randn(20, 16, requires_grad=True)
    labels = torch.randint(0, 20, (9,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, weight, labels, chunk_tokens=4, backend="torch")
    loss.backward()
    assert x.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    loss_ref = linear_cross_entropy_ref(x.bfloat16(), weight.bfloat16(), labels)
    assert rel_rms_error(loss, loss_ref) < TOLERANCE[torch.bfloat16]


def test_runs_on_meta_tensors():
    x = torch.empty(16 * 2048, 2048, device="meta", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.empty(32000, 2048, device="meta", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.empty(16 * 2048, device="meta", dtype=torch.long)
    loss = linear_cross_entropy(x, weight, labels)
    assert loss.shape == () and loss.dtype == torch.float32
    loss.backward()
    assert x.grad.shape == x.shape and weight.grad.shape == weight.shape


def test_opcheck():
    x, weight, labels = make_inputs(10, 8, 12, torch.float32)
    torch.library.opcheck(torch.ops.mmprof.linear_cross_entropy_fwd.default, (x, weight, labels, 4, -100, "torch"))


def test_rejects_bad_arguments():
    x, weight, labels = make_inputs(4, 8, 6, torch.float32)
    with pytest.raises(ValueError, match="chunk_tokens"):
        linear_cross_entropy(x, weight, labels, chunk_tokens=0)
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(x, weight.T, labels)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(x, weight, labels[:3])


def test_compiles_in_one_graph():
    torch.manual_seed(5)
    x, weight, labels = make_inputs(13, 8, 21, torch.float32)
    compiled = torch.compile(
        lambda *a: linear_cross_entropy(*a, chunk_tokens=5, backend="torch"), backend="aot_eager", fullgraph=True
    )
    loss = compiled(x, weight, labels)
    loss_ref = linear_cross_entropy_ref(x, weight, labels)
    grads = torch.autograd.grad(loss, [x, weight])
    grads_ref = torch.autograd.grad(loss_ref, [x, weight])
    assert rel_rms_error(loss, loss_ref) < 1e-5
    assert all(rel_rms_error(a, b) < 1e-5 for a, b in zip(grads, grads_ref))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize(
    "case", [(1000, 256, 1000, 300), (4096, 512, 32000, 1024)], ids=lambda c: "N{}-H{}-V{}-chunk{}".format(*c)
)
def test_matches_twin_on_gpu(case, dtype):
    check_against_twin(*case, dtype, "triton", device="cuda")
