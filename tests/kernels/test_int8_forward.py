"""BitLinear's training forward on int8 tensor cores (issue 26): the int8 x ternary GEMM of
`w2a8_gemm` with int8 weights bit-exact against its twin, the int8 levels of the row and weight
quantisers, and the whole fused op with backend "triton-int8" against the fake-quantised bf16 path.

Tolerance against the fake-quantised path: that path multiplies bf16(q / s) by bf16(q_w / t), each
rounded once to bf16 (relative 2^-9 each), and rounds the fp32 sum to the output dtype; the int8
path has exact integer sums and rounds once at the end. So, elementwise,
    |y_int8 - y_fake| <= 2^-8 * (|xq| @ |wq|^T) + ulp(y_int8) + ulp(y_fake)
(in the matmul dtype's unit roundoff u: 2u for the operands, one u for each output). The gradients
are the same code on the saved statistics, so they are equal bit for bit when both forwards saved
equal statistics (see `_check_pair`)."""

import pytest
import torch

from mmprof.kernels import bitlinear_triton as tri
from mmprof.kernels._triton_util import interpreting
from mmprof.kernels.bitlinear_prologue import bitlinear_prologue
from mmprof.kernels.ternary import NORM_EPS, weight_quant
from mmprof.kernels.w2a8_gemm import int8_ternary_linear, int8_ternary_linear_ref

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1")
UNIT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _gemm_case(m, n, k, device="cpu"):
    gen = torch.Generator().manual_seed(m * 131 + n * 17 + k)
    q = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    levels = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
    s = 127.0 / (torch.rand(m, generator=gen) * 3 + 0.1)
    t = torch.tensor([1.0 / 0.0213])
    return q.to(device), s.to(device), levels.to(device), t.to(device)


@needs_interpreter
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 7, 3), (17, 40, 50), (33, 24, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int8_gemm_bit_exact_against_twin(shape, dtype):
    q, s, levels, t = _gemm_case(*shape)
    got = int8_ternary_linear(q, s, levels, t, dtype)
    assert torch.equal(got, int8_ternary_linear_ref(q, s, levels, t, dtype))


@needs_interpreter
def test_ternary_levels_and_int8_row_levels_match_the_fake_quantised_values():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(24, 48, generator=gen) * 0.02
    levels, t = tri.ternary_levels(w)
    assert levels.dtype == torch.int8 and set(levels.unique().tolist()) <= {-1, 0, 1}
    assert torch.equal(levels.float() / t, weight_quant(w))
    x = torch.randn(7, 48, generator=gen)
    g = torch.rand(2, 48, generator=gen) + 0.5
    xq, _, _, r, s = tri.quantize_rows("none", x, None, None, g, 0.0, 1e-8, torch.float32)
    q, _, _, r8, s8 = tri.quantize_rows("none", x, None, None, g, 0.0, 1e-8, torch.int8)
    assert q.dtype == torch.int8 and torch.equal(s8, s) and torch.equal(r8, r)
    assert torch.equal(q.float() / s[:, :, None], xq)


def _fused_pair(prologue, rows, k, widths, dtype, device="cpu"):
    gen = torch.Generator().manual_seed(rows * 7 + k)
    kin = 2 * k if prologue == "glu" else k
    x = torch.randn(rows, kin, generator=gen).to(device, dtype)
    aux = torch.randn(rows, k, generator=gen).to(device, dtype) if prologue in ("add_norm", "norm_gate") else None
    pre = (torch.rand(k, generator=gen) + 0.5).to(device, dtype) if prologue != "none" and prologue != "glu" else None
    norms = [(torch.rand(k, generator=gen) + 0.5).to(device, dtype) for _ in widths]
    weights = [(torch.randn(n, k, generator=gen) * 0.02).to(device) for n in widths]  # fp32 master weights
    grads = [torch.randn(rows, n, generator=gen).to(device, dtype) for n in widths]
    out = {}
    for backend in ("triton", "triton-int8"):
        leaves = [t.clone().requires_grad_() for t in (x, *norms, *weights)]
        xl, nl, wl = leaves[0], leaves[1 : 1 + len(widths)], leaves[1 + len(widths) :]
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            ys, _ = bitlinear_prologue(prologue, xl, nl, wl, aux=aux, pre_weight=pre, backend=backend)
        torch.autograd.backward(list(ys), grads)
        out[backend] = ([y.detach() for y in ys], [t.grad for t in leaves])
    return out, (x, aux, pre, norms), weights


def _stats_equal(prologue, x, aux, pre, norms, dtype):
    """Whether the bf16 and int8 row quantisers give bit-equal (prologue rstd, rstd, scales): the
    statistics both backwards start from. Both are one kernel source, compiled once per output dtype."""
    args = (prologue, x, aux, pre, torch.stack(norms), 1e-6, NORM_EPS)
    plain, levels = tri.quantize_rows(*args, dtype)[2:], tri.quantize_rows(*args, torch.int8)[2:]
    return all((a is None and b is None) or torch.equal(a, b) for a, b in zip(plain, levels))


def _check_pair(out, dtype, stats_equal=True):
    """Outputs within the module doc's bound. Gradients: the same code on the saved statistics, so bit
    for bit equal when the two forwards saved equal statistics; otherwise (an ulp apart in some rows,
    from code compiled per output dtype) within one rounding of the matmul dtype, relative RMS."""
    (y_fake, g_fake), (y_int8, g_int8) = out["triton"], out["triton-int8"]
    for a, b in zip(y_int8, y_fake):
        assert a.dtype == b.dtype == dtype
        assert _rel_rms(a, b) <= 4 * UNIT[dtype]  # 2u for the operands, u per output rounding, the fake path's fp32 sums
    for a, b in zip(g_int8, g_fake):
        if stats_equal:
            assert torch.equal(a, b)
        else:
            assert _rel_rms(a, b) <= UNIT[dtype]


def _rel_rms(a, b):
    return ((a.double() - b.double()).pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt()).item()


@needs_interpreter
@pytest.mark.parametrize("prologue", ["none", "norm", "add_norm", "glu", "norm_gate"])
def test_fused_int8_forward_against_fake_quantised_path(prologue):
    widths = (40, 17) if prologue == "norm" else (24,)
    out, inputs, _ = _fused_pair(prologue, 9, 48, widths, torch.float32)
    assert _stats_equal(prologue, *inputs, torch.float32)  # the interpreter runs one code for both
    _check_pair(out, torch.float32)


@needs_interpreter
def test_fused_int8_forward_elementwise_bound_in_fp32():
    """The bound of the module doc with the operands' own magnitudes, at fp32 (u = 2^-24)."""
    out, (x, *_), weights = _fused_pair("none", 17, 64, (33,), torch.float32)
    y8, y = out["triton-int8"][0][0], out["triton"][0][0]
    wq = weight_quant(weights[0]).abs()
    xn = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-8)
    magnitude = xn.abs() @ wq.t() * 2  # |xq| <= |xn| * 1.5 * (1 + 1/254): the norm weights are < 1.5
    u = UNIT[torch.float32]
    assert ((y8 - y).abs() <= 2 * u * magnitude + u * (y8.abs() + y.abs()) + 1e-30).all()


# ---------------------------------------------------------------------------------------------
# GPU: the 1.3B shapes (hidden 2048, GLU 5632) with the tuned configs
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", [(2048, 2048), (11264, 2048), (2048, 5632)])
def test_int8_gemm_bit_exact_on_gpu_at_1p3b_shapes(n, k):
    q, s, levels, t = _gemm_case(4096, n, k, "cuda")
    got = int8_ternary_linear(q, s, levels, t, torch.bfloat16)
    assert torch.equal(got, int8_ternary_linear_ref(q, s, levels, t, torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("prologue, k, widths", [("norm", 2048, (2048, 2048, 2048)), ("add_norm", 2048, (11264,)),
                                                 ("glu", 5632, (2048,)), ("norm_gate", 2048, (2048,))])  # fmt: skip
def test_fused_int8_forward_on_gpu_at_1p3b_shapes(prologue, k, widths):
    out, inputs, _ = _fused_pair(prologue, 4096, k, widths, torch.bfloat16, "cuda")
    _check_pair(out, torch.bfloat16, _stats_equal(prologue, *inputs, torch.bfloat16))
