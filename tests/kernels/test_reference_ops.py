"""The reference's fused ops rewritten with its saved tensors: outputs and gradients against plain
autograd, what each keeps for backward, and the in-place cross-entropy."""

import pytest
import torch
import torch.nn.functional as F

from mmprof.kernels.cross_entropy import cross_entropy_inplace
from mmprof.kernels.reference_ops import rms_norm_keep_input, swiglu
from mmprof.kernels.ternary import rms_norm
from tests.workloads.helpers import rel_rms, saved_activation_bytes

SHAPES = {"3d": (2, 7, 32), "rows": (33, 96), "one-row": (1, 16)}


def grads(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*tensors)
    outs = out if isinstance(out, tuple) else (out,)
    torch.manual_seed(1)
    sum(((o.float() * torch.randn_like(o.float())).sum() for o in outs)).backward()
    return [o.detach() for o in outs], [t.grad for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_rms_norm_keep_input_matches_autograd(shape, dtype):
    x, w = torch.randn(shape).to(dtype), (1 + 0.3 * torch.randn(shape[-1]))
    (y,), (dx, dw) = grads(lambda a, b: rms_norm_keep_input(a, b, 1e-6), x, w)
    (y_ref,), (dx_ref, dw_ref) = grads(lambda a, b: rms_norm(a, b, 1e-6), x, w)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        assert rel_rms(a, b) < tol


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_rms_norm_with_residual_returns_the_sum_in_the_residuals_dtype(shape):
    x, res, w = torch.randn(shape).bfloat16(), torch.randn(shape), 1 + 0.3 * torch.randn(shape[-1])

    def ref(a, r, b):
        total = a.float() + r
        return rms_norm(total, b, 1e-6).to(a.dtype), total

    (y, total), got = grads(lambda a, r, b: rms_norm_keep_input(a, b, 1e-6, residual=r), x, res, w)
    (y_ref, total_ref), want = grads(ref, x, res, w)
    assert y.dtype == torch.bfloat16 and total.dtype == torch.float32
    assert rel_rms(total, total_ref) < 1e-6 and rel_rms(y, y_ref) < 1e-2
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and rel_rms(a, b) < 2e-2


def test_rms_norm_keeps_only_its_input_and_rstd():
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.ones(32, requires_grad=True)
    _, saved = saved_activation_bytes(lambda: rms_norm_keep_input(x, w, 1e-6), params=(w,))
    assert saved == x.numel() * 4 + 64 * 4


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.bfloat16, torch.bfloat16)], ids=["fp32", "bf16-fp32", "bf16"])
def test_swiglu_matches_autograd_and_keeps_its_inputs(dtypes):
    a, b = torch.randn(5, 40).to(dtypes[0]), torch.randn(5, 40).to(dtypes[1])
    (out,), got = grads(swiglu, a, b)
    (ref,), want = grads(lambda x, y: F.silu(x.float()) * y.float(), a, b)
    assert out.dtype == torch.promote_types(*dtypes)
    tol = 1e-5 if dtypes == (torch.float32, torch.float32) else 1e-2
    assert rel_rms(out, ref) < tol
    for g, w, t in zip(got, want, (a, b)):
        assert g.dtype == t.dtype and rel_rms(g, w) < tol
    a, b = (t.detach().requires_grad_() for t in (a, b))
    _, saved = saved_activation_bytes(lambda: swiglu(a, b))
    assert saved == a.numel() * a.element_size() + b.numel() * b.element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_inplace_matches_f_cross_entropy(dtype):
    logits = (3 * torch.randn(37, 50)).to(dtype)
    labels = torch.randint(0, 50, (37,))
    labels[::5] = -100
    x = logits.clone().requires_grad_()
    loss = cross_entropy_inplace(x, labels, chunk_rows=8)
    ref_x = logits.clone().float().requires_grad_()
    ref = F.cross_entropy(ref_x, labels, ignore_index=-100)
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 1e-4 * max(1, abs(ref.item()))
    ref.backward()
    loss.backward()
    assert x.grad.dtype == dtype
    assert rel_rms(x.grad, ref_x.grad) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert (x.grad[::5] == 0).all()


def test_cross_entropy_writes_its_gradient_into_the_logits():
    logits = torch.randn(8, 16, requires_grad=True)
    kept = logits * 1.0  # a non-leaf: the tensor the loss keeps and overwrites
    loss, saved = saved_activation_bytes(lambda: cross_entropy_inplace(kept, torch.randint(0, 16, (8,))))
    assert saved == 8 * 16 * 4 + 8 * 4 + 8 * 8  # logits, fp32 logsumexp, int64 labels
    grads_seen = []
    kept.register_hook(lambda g: grads_seen.append(g))
    loss.backward()
    assert grads_seen[0].untyped_storage().data_ptr() == kept.untyped_storage().data_ptr()
