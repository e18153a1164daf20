"""W2A8 GEMM on packed ternary weights: the integer product bit-exact against its twin, the int8 row
quantiser against its twin, the fused dequantising epilogue bit-exact, and the whole packed BitLinear
against the fake-quantised training BitLinear. CPU through Triton's interpreter, and on a GPU."""

import pytest
import torch
import triton
import triton.language as tl

from mmprof.kernels._triton_util import interpreting, round_half_even
from mmprof.kernels.bitlinear import BitLinear, bitlinear
from mmprof.kernels.ternary_pack import pack_ternary, pack_weight
from mmprof.kernels.w2a8_gemm import (
    _CONFIGS,
    _INV_LEVELS,
    _TRAIN_CONFIGS,
    _int8_kernel,
    _w2a8_kernel,
    packed_bitlinear,
    quantize_rows,
    quantize_rows_ref,
    w2a8_linear,
    w2a8_linear_ref,
    w2a8_matmul,
    w2a8_matmul_ref,
)

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1")
BACKENDS = [pytest.param("triton", marks=needs_interpreter), "torch"]
# (M, N, K) on CPU: K below one word, K across words and BLOCK_K steps with a partial last word,
# M and N past the interpreter's 16x16 tiles, and exact tiles
CPU_GEMM_SHAPES = {
    "1x1x1": (1, 1, 1),
    "5x7x3": (5, 7, 3),
    "17x40x50": (17, 40, 50),
    "16x16x32": (16, 16, 32),
    "40x33x130": (40, 33, 130),
}
# (rows, K)
CPU_ROW_SHAPES = {"1x1": (1, 1), "7x48": (7, 48), "33x130": (33, 130)}
# (lead dims, K, N) for the whole layer
CPU_LAYER_SHAPES = {"2x5x48-to-40": ((2, 5), 48, 40), "17x130-to-33": ((17,), 130, 33)}


def rel_rms_error(actual, expected):
    diff = (actual.double() - expected.double()).pow(2).mean().sqrt()
    return (diff / expected.double().pow(2).mean().sqrt().clamp_min(1e-30)).item()


def random_gemm(m, n, k, device="cpu", seed=0):
    """Fresh int8 activations over the whole int8 range and ternary weights with about 1/3 zeros."""
    gen = torch.Generator().manual_seed(seed * 7919 + m * 131 + n * 17 + k)
    q = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    t = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
    return q.to(device), t.to(device)


def exact_product(q, t):
    """The integer product by an independent route: int64 on the CPU."""
    return (q.cpu().long() @ t.cpu().long().t()).to(torch.int32)


def random_rows(rows, k, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed * 7919 + rows * 131 + k)
    scale = 0.5 + torch.rand(rows, 1, generator=gen) * 3  # rows of different magnitude
    x = torch.randn(rows, k, generator=gen) * scale
    g = 1 + 0.3 * torch.randn(k, generator=gen)
    return x.to(device=device, dtype=dtype), g.to(device)


def check_quantized(q, amax, q_ref, amax_ref, max_fraction):
    """Float reductions differ in order between Triton and torch: a rounding edge may land one int8
    level apart on a tiny fraction of elements; amax agrees to float rounding."""
    assert q.dtype == torch.int8 and amax.dtype == torch.float32
    assert q.shape == q_ref.shape and amax.shape == amax_ref.shape
    diff = (q.int() - q_ref.int()).abs()
    assert diff.max().item() <= 1
    assert diff.count_nonzero().item() <= max(1, max_fraction * q.numel())
    assert ((amax.double() - amax_ref.double()).abs() / amax_ref.double()).max().item() < 1e-6


# ---------------------------------------------------------------------------------------------
# CPU (interpreter for Triton)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", CPU_GEMM_SHAPES.values(), ids=CPU_GEMM_SHAPES.keys())
def test_twin_is_the_exact_integer_product(shape):
    q, t = random_gemm(*shape)
    acc = w2a8_matmul_ref(q, pack_ternary(t), shape[2])
    assert acc.dtype == torch.int32 and torch.equal(acc, exact_product(q, t))


@needs_interpreter
@pytest.mark.parametrize("shape", CPU_GEMM_SHAPES.values(), ids=CPU_GEMM_SHAPES.keys())
def test_matmul_kernel_is_bit_exact(shape):
    q, t = random_gemm(*shape, seed=1)
    packed = pack_ternary(t)
    acc = w2a8_matmul(q, packed, shape[2])
    assert acc.dtype == torch.int32 and acc.shape == (shape[0], shape[1])
    assert torch.equal(acc, w2a8_matmul_ref(q, packed, shape[2]))


@needs_interpreter
def test_matmul_kernel_extremes_and_strided_rows():
    """Every activation -128 against all -1 / all 0 / all +1 rows: the largest sums of either sign;
    the activations are a column slice of a wider tensor (row stride != K)."""
    m, k = 18, 70
    t = torch.stack([torch.full((k,), v, dtype=torch.int8) for v in (-1, 0, 1)] * 6)
    wide = torch.full((m, k + 9), -128, dtype=torch.int8)
    q = wide[:, 4 : 4 + k]
    acc = w2a8_matmul(q, pack_ternary(t), k)
    assert torch.equal(acc, exact_product(q, t))
    assert acc[0, :3].tolist() == [128 * k, 0, -128 * k]


@needs_interpreter
def test_round_half_even_matches_torch_round():
    @triton.jit
    def kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, round_half_even(tl.load(x_ptr + offs)))

    ties = torch.arange(-130, 130, dtype=torch.float32) + 0.5
    x = torch.cat([ties, torch.randn(248) * 100, torch.tensor([0.49999997, -0.49999997, 126.99999, -127.5])])
    y = torch.empty_like(x)
    kernel[(1,)](x, y, BLOCK=x.numel())
    assert torch.equal(y, torch.round(x))


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", CPU_ROW_SHAPES.values(), ids=CPU_ROW_SHAPES.keys())
def test_quantize_rows_kernel_matches_twin(shape, dtype):
    x, g = random_rows(*shape, dtype, seed=2)
    check_quantized(*quantize_rows(x, g), *quantize_rows_ref(x, g), max_fraction=1e-3)


@needs_interpreter
def test_quantize_rows_kernel_on_zero_and_strided_rows():
    x, g = random_rows(6, 40, torch.float32, seed=3)
    x[2] = 0.0
    wide = torch.cat([x, torch.randn(6, 5)], dim=1)[:, :40]  # row stride 45
    q, amax = quantize_rows(wide, g)
    assert q[2].count_nonzero() == 0 and amax[2].item() == pytest.approx(1e-5)
    check_quantized(q, amax, *quantize_rows_ref(x, g), max_fraction=1e-3)


@needs_interpreter
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(17, 40, 50), (5, 7, 3)], ids=["17x40x50", "5x7x3"])
def test_dequantizing_epilogue_is_bit_exact(shape, out_dtype):
    m, n, k = shape
    x, g = random_rows(m, k, torch.float32, seed=4)
    q, amax = quantize_rows_ref(x, g)
    packed, w_scale = pack_weight(torch.randn(n, k) * 0.02)
    y = w2a8_linear(q, amax, packed, w_scale, k, out_dtype)
    assert y.dtype == out_dtype
    assert torch.equal(y, w2a8_linear_ref(q, amax, packed, w_scale, k, out_dtype))


# output rounding only: the packed layer is exact up to fp32 rounding before its final cast
OUTPUT_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", CPU_LAYER_SHAPES.values(), ids=CPU_LAYER_SHAPES.keys())
def test_packed_bitlinear_matches_fake_quant_bitlinear(shape, dtype, backend):
    """Against the training layer with fp32 parameters (as trained: fp32 master weights) on inputs of
    `dtype`; its output is fp32, ours is in x's dtype unless out_dtype says fp32."""
    lead, k, n = shape
    torch.manual_seed(k * 100 + n)
    layer = BitLinear(k, n, impl="naive")
    with torch.no_grad():
        layer.norm.weight.copy_(1 + 0.3 * torch.randn(k))
        x = (torch.randn(*lead, k) * 2).to(dtype)
        y_ref = layer(x)
    packed, w_scale = pack_weight(layer.weight.detach())
    args = (x, layer.norm.weight.detach(), packed, w_scale, k)
    y = packed_bitlinear(*args, backend=backend)
    assert y.shape == (*lead, n) and y.dtype == dtype
    assert rel_rms_error(y, y_ref) < OUTPUT_TOLERANCE[dtype]
    y32 = packed_bitlinear(*args, out_dtype=torch.float32, backend=backend)
    assert y32.dtype == torch.float32 and rel_rms_error(y32, y_ref) < 1e-5


def test_packed_bitlinear_torch_backend_is_the_fake_quant_levels():
    """On the same device the twin's int8 levels are the training path's: fp32 output agrees with
    the fake-quantised BitLinear to fp32 rounding, and out_dtype is honoured."""
    torch.manual_seed(6)
    x, g = random_rows(9, 64, torch.float32, seed=6)
    w = torch.randn(24, 64) * 0.02
    packed, w_scale = pack_weight(w)
    y = packed_bitlinear(x, g, packed, w_scale, 64, backend="torch")
    assert rel_rms_error(y, bitlinear(x, g, w, "vanilla")) < 1e-6
    y16 = packed_bitlinear(x, g, packed, w_scale, 64, out_dtype=torch.float16, backend="torch")
    assert y16.dtype == torch.float16 and torch.equal(y16, y.half())


def test_rejects_bad_arguments():
    q, t = random_gemm(4, 8, 40)
    packed = pack_ternary(t)
    with pytest.raises(ValueError, match="features"):
        packed_bitlinear(torch.randn(4, 39), torch.ones(39), packed, torch.tensor(1.0), 40)
    if interpreting():
        with pytest.raises(ValueError, match="int8"):
            w2a8_matmul(q.float(), packed, 40)
        with pytest.raises(ValueError, match="packed"):
            w2a8_matmul(q, packed.long(), 40)
        with pytest.raises(ValueError, match="features"):
            w2a8_matmul(q, packed[:, :2], 40)
    with pytest.raises(ValueError, match="backend"):
        packed_bitlinear(torch.randn(4, 40), torch.ones(40), packed, torch.tensor(1.0), 40, backend="cuda")


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

# (M, N, K): 1.3B/2.7B-like projections at prefill sizes, plus shapes off every tile multiple
GPU_GEMM_SHAPES = {
    "32x5632x2048": (32, 5632, 2048),
    "64x27648x5120": (64, 27648, 5120),
    "16x2048x5632": (16, 2048, 5632),
    "4096x2048x2048": (4096, 2048, 2048),
    "1000x300x1000": (1000, 300, 1000),
    "3x77x37": (3, 77, 37),
}
GPU_ROW_SHAPES = {"32x2048": (32, 2048), "4096x5120": (4096, 5120), "1000x1000": (1000, 1000)}
# (lead dims, K, N)
GPU_LAYER_SHAPES = {
    "4x8x2048-to-5632": ((4, 8), 2048, 5632),
    "64x5120-to-13824": ((64,), 5120, 13824),
    "2x500x1000-to-300": ((2, 500), 1000, 300),
}
GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
GPU_DTYPE_IDS = ["bf16", "fp16", "fp32"]
# a GPU's torch reductions run in another order than the kernel's, so a few activations in 10^4
# land one int8 level apart: ~1e-4 relative in fp32; bf16 and fp16 are dominated by output rounding
GPU_OUTPUT_TOLERANCE = {**OUTPUT_TOLERANCE, torch.float32: 2e-4}


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_GEMM_SHAPES.values(), ids=GPU_GEMM_SHAPES.keys())
def test_matmul_kernel_is_bit_exact_on_gpu(shape):
    m, n, k = shape
    q, t = random_gemm(m, n, k, device="cuda", seed=1)
    packed = pack_ternary(t)
    acc = w2a8_matmul(q, packed, k)
    ref = w2a8_matmul_ref(q, packed, k)
    assert torch.equal(acc, ref)
    if m * n * k <= 64 * 5632 * 2048:  # the float64 twin against an int64 product on the CPU
        assert torch.equal(ref.cpu(), exact_product(q, t))


@pytest.mark.gpu
def test_every_gpu_config_is_bit_exact():
    """Autotuning runs only the winner afterwards: check each tile on its own, with tails everywhere."""
    m, n, k = 300, 333, 1000
    q, t = random_gemm(m, n, k, device="cuda", seed=3)
    packed = pack_ternary(t)
    ref = w2a8_matmul_ref(q, packed, k)
    for config in _CONFIGS:
        meta = config.kwargs
        out = torch.full((m, n), -7, device="cuda", dtype=torch.int32)
        grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _w2a8_kernel.fn[grid](
            q, packed, out, out, out, m, n, k, packed.shape[1], 512, q.stride(0), out.stride(0), _INV_LEVELS,
            DEQUANT=0, WEIGHT_INT8=False, num_warps=config.num_warps, **meta,
        )  # fmt: skip
        assert torch.equal(out, ref), meta


@pytest.mark.gpu
def test_every_training_config_is_bit_exact():
    """The int8-weight tiles of the training forward (`int8_ternary_linear`), each on its own, with tails."""
    m, n, k = 300, 333, 1000
    q, t = random_gemm(m, n, k, device="cuda", seed=5)
    levels = t.contiguous()  # int8 levels [N, K]: the training operand
    ref = exact_product(q, t).cuda()
    for config in _TRAIN_CONFIGS:
        meta = config.kwargs
        out = torch.full((m, n), -7, device="cuda", dtype=torch.int32)
        grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _int8_kernel.fn[grid](
            q, levels, out, out, out, m, n, k, k, 512, q.stride(0), out.stride(0), _INV_LEVELS,
            DEQUANT=0, WEIGHT_INT8=True, num_warps=config.num_warps, num_stages=config.num_stages, **meta,
        )  # fmt: skip
        assert torch.equal(out, ref), meta


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=GPU_DTYPE_IDS)
@pytest.mark.parametrize("shape", GPU_ROW_SHAPES.values(), ids=GPU_ROW_SHAPES.keys())
def test_quantize_rows_kernel_matches_twin_on_gpu(shape, dtype):
    x, g = random_rows(*shape, dtype, device="cuda", seed=2)
    check_quantized(*quantize_rows(x, g), *quantize_rows_ref(x, g), max_fraction=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", GPU_DTYPES, ids=GPU_DTYPE_IDS)
def test_dequantizing_epilogue_is_bit_exact_on_gpu(out_dtype):
    m, n, k = 300, 2051, 2048
    x, g = random_rows(m, k, torch.float32, device="cuda", seed=4)
    q, amax = quantize_rows_ref(x, g)
    packed, w_scale = pack_weight(torch.randn(n, k, device="cuda") * 0.02)
    y = w2a8_linear(q, amax, packed, w_scale, k, out_dtype)
    assert torch.equal(y, w2a8_linear_ref(q, amax, packed, w_scale, k, out_dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=GPU_DTYPE_IDS)
@pytest.mark.parametrize("shape", GPU_LAYER_SHAPES.values(), ids=GPU_LAYER_SHAPES.keys())
def test_packed_bitlinear_matches_fake_quant_bitlinear_on_gpu(shape, dtype):
    lead, k, n = shape
    torch.manual_seed(k + n)
    x = (torch.randn(*lead, k, device="cuda") * 2).to(dtype)
    g = 1 + 0.3 * torch.randn(k, device="cuda")
    w = torch.randn(n, k, device="cuda") * 0.02
    packed, w_scale = pack_weight(w)
    y = packed_bitlinear(x, g, packed, w_scale, k)
    assert y.dtype == dtype and y.shape == (*lead, n)
    # the fp32 fake-quant layer on the same (upcast) input: only the output rounding and rare
    # one-level flips of an activation differ
    y_fp32 = bitlinear(x.float(), g, w, "vanilla")
    assert rel_rms_error(y, y_fp32) < GPU_OUTPUT_TOLERANCE[dtype]
    y32 = packed_bitlinear(x, g, packed, w_scale, k, out_dtype=torch.float32)
    assert rel_rms_error(y32, y_fp32) < GPU_OUTPUT_TOLERANCE[torch.float32]
    y_torch = packed_bitlinear(x, g, packed, w_scale, k, backend="torch")
    assert rel_rms_error(y, y_torch) < GPU_OUTPUT_TOLERANCE[dtype]
