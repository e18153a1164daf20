import pytest
import torch

from mmprof.workloads import mlgru_scan, mlgru_scan_naive
from tests.workloads.helpers import rel_rms, saved_activation_bytes

CASES = {
    "b2-t37": (2, 37, 8, None),
    "b3-t64-chunk5": (3, 64, 16, 5),
    "t1": (2, 1, 4, None),
    "chunk1": (1, 20, 3, 1),
    "chunk-longer-than-t": (2, 9, 5, 64),
    "b1-t300": (1, 300, 32, None),
}


def gates(batch, steps, dim, dtype=torch.float32):
    f = torch.sigmoid(torch.randn(batch, steps, dim) * 2)
    i = torch.randn(batch, steps, dim)
    return f.to(dtype), i.to(dtype)


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "given-state"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_scan_matches_naive_outputs_and_grads(case, with_state, seed):
    batch, steps, dim, chunk = case
    f, i = gates(batch, steps, dim)
    s = torch.randn(batch, dim) if with_state else None
    leaves = [t.requires_grad_() for t in (f, i, s) if t is not None]
    h_ref, c_ref = mlgru_scan_naive(f, i, s)
    h, c = mlgru_scan(f, i, s, chunk_len=chunk)
    assert h.dtype == torch.float32 and c.dtype == torch.float32
    assert rel_rms(h, h_ref) < 1e-6 and rel_rms(c, c_ref) < 1e-6, f"seed={seed}"
    gh, gc = torch.randn_like(h), torch.randn_like(c)
    ref = torch.autograd.grad((h_ref * gh).sum() + (c_ref * gc).sum(), leaves)
    got = torch.autograd.grad((h * gh).sum() + (c * gc).sum(), leaves)
    for a, b in zip(got, ref):
        assert rel_rms(a, b) < 1e-6, f"seed={seed}"


def test_scan_keeps_input_dtype_and_fp32_state(seed):
    f, i = gates(2, 50, 8, torch.bfloat16)
    h, c = mlgru_scan(f, i)
    h_ref, c_ref = mlgru_scan_naive(f, i)
    assert h.dtype == torch.bfloat16 and c.dtype == torch.float32
    assert rel_rms(h, h_ref) < 1e-2 and rel_rms(c, c_ref) < 1e-5, f"seed={seed}"


def test_split_sequence_with_carried_state_equals_whole(seed):
    f, i = gates(2, 40, 6)
    h, c = mlgru_scan(f, i)
    h1, c1 = mlgru_scan(f[:, :17], i[:, :17])
    h2, c2 = mlgru_scan(f[:, 17:], i[:, 17:], c1)
    assert rel_rms(torch.cat((h1, h2), 1), h) < 1e-6 and rel_rms(c2, c) < 1e-6, f"seed={seed}"


def test_backward_saves_only_f_output_and_state(seed):
    batch, steps, dim = 2, 128, 16
    f, i = (t.requires_grad_() for t in gates(batch, steps, dim))
    (h, c), saved = saved_activation_bytes(lambda: mlgru_scan(f, i))
    assert saved == 2 * batch * steps * dim * 4  # f and the output h, nothing per chunk or step


@pytest.mark.gpu
def test_memory_at_training_scale():
    batch, steps, dim = 16, 2048, 2048
    f = torch.rand(batch, steps, dim, device="cuda", requires_grad=True)
    i = torch.randn(batch, steps, dim, device="cuda", requires_grad=True)
    one = f.numel() * 4
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    h, c = mlgru_scan(f, i)
    (h.sum() + c.sum()).backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 8 * one


TRITON_CASES = {"b2-t37-d20": (2, 37, 20), "t1": (1, 1, 16), "b1-t16-d16": (1, 16, 16)}


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                    (torch.float32, torch.float16)], ids=["fp32", "fp16", "fp32-f-fp16-i"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "given-state"])
@pytest.mark.parametrize("case", TRITON_CASES.values(), ids=TRITON_CASES.keys())
def test_triton_scan_matches_the_pytorch_scan(case, with_state, dtypes):
    """The Triton bodies (interpreter on CPU, tiles of 8 steps and 16 channels) against the PyTorch
    scan: outputs, gradients, and what is saved for backward."""
    batch, steps, dim = case
    f, i = gates(batch, steps, dim)
    f, i = f.to(dtypes[0]), i.to(dtypes[1])
    s = torch.randn(batch, dim) if with_state else None
    results = {}
    for backend in ("torch", "triton"):
        leaves = [t.detach().clone().requires_grad_() for t in (f, i, s) if t is not None]
        (h, c), saved = saved_activation_bytes(lambda: mlgru_scan(*leaves, *([None] * (3 - len(leaves))), backend=backend))
        torch.manual_seed(3)
        gh, gc = torch.randn_like(h, dtype=torch.float32), torch.randn_like(c)
        grads = torch.autograd.grad((h.float() * gh).sum() + (c * gc).sum(), leaves)
        results[backend] = (h, c, saved, grads)
    h, c, saved, grads = results["triton"]
    h_ref, c_ref, saved_ref, grads_ref = results["torch"]
    tol = 1e-6 if dtypes == (torch.float32, torch.float32) else 2e-3
    assert h.dtype == h_ref.dtype and c.dtype == torch.float32 and saved == saved_ref
    assert rel_rms(h, h_ref) < tol and rel_rms(c, c_ref) < 1e-6
    for a, b in zip(grads, grads_ref):
        assert a.dtype == b.dtype and rel_rms(a, b) < tol


@pytest.mark.gpu
def test_triton_scan_matches_the_pytorch_scan_at_1_3b_width():
    """batch 2 x seq 2048 x 2048 channels, fp32 gates (layers > 0) and bf16 ones (layer 0)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for dtype in (torch.float32, torch.bfloat16):
        f, i = (t.cuda().to(dtype) for t in gates(2, 2048, 2048))
        s = torch.randn(2, 2048, device="cuda")
        outs = {}
        for backend in ("torch", "auto"):
            leaves = [t.detach().clone().requires_grad_() for t in (f, i, s)]
            h, c = mlgru_scan(*leaves, backend=backend)
            gh = torch.randn(h.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
            outs[backend] = (h, c, torch.autograd.grad((h.float() * gh).sum() + c.sum(), leaves))
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        (h, c, g), (h_ref, c_ref, g_ref) = outs["auto"], outs["torch"]
        assert rel_rms(h, h_ref) < tol and rel_rms(c, c_ref) < 1e-5
        assert all(rel_rms(a, b) < tol for a, b in zip(g, g_ref))
