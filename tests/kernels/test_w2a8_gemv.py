"""Decode-time W2A8 GEMV: the integer core bit-exact against its twin; the fused norms,
quantisation and epilogues against the twin; the twin against the training path's BitLinear."""

import pytest
import torch
import torch.nn.functional as F

from mmprof.kernels._triton_util import interpreting
from mmprof.kernels.bitlinear import bitlinear
from mmprof.kernels.ternary import rms_norm
from mmprof.kernels.ternary_pack import pack_ternary, pack_weight
from mmprof.kernels.w2a8_gemm import w2a8_matmul_ref
from mmprof.kernels import w2a8_gemv as w2a8_gemv_module
from mmprof.kernels.w2a8_gemv import GemvOptions, row_sums_ref, w2a8_gemv, w2a8_gemv_int, w2a8_gemv_ref

both_split_k_paths = pytest.mark.parametrize("row_finish", [True, False],
                                             ids=["rows-finished-by-last-adder", "block-arrival-counts"])
needs_interpreter = pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1")
# (rows M, inputs K, outputs N): K not a multiple of 16 and N not of the block too; K split over
# several programs, and (K = 20 under the interpreter, K = 512 on a GPU) not split
CPU_SHAPES = [(1, 64, 8), (3, 40, 5), (8, 100, 19), (2, 20, 6)]
SPLIT_K_SHAPE = (2, 100, 19)  # under the interpreter, K = 100 is split over two programs
GPU_SHAPES = [(1, 2048, 2048), (4, 5120, 5120), (1, 13824, 5120), (8, 2560, 6912), (2, 512, 1000)]


def ids(shape):
    return "M{}-K{}-N{}".format(*shape)


def rel_rms_error(actual, expected):
    diff = (actual.double() - expected.double()).pow(2).mean().sqrt()
    return (diff / expected.double().pow(2).mean().sqrt().clamp_min(1e-30)).item()


def packed_parts(parts, n, k, device, shared=False):
    w = torch.randn(parts * n, k, device=device) * 0.02
    if shared:
        packed, scale = pack_weight(w)
        return w, packed, scale.reshape(1)
    pieces = [pack_weight(w[p * n : (p + 1) * n]) for p in range(parts)]
    return w, torch.cat([p for p, _ in pieces]), torch.stack([s for _, s in pieces])


def check_int_core(shape, device, options=GemvOptions()):
    m, k, n = shape
    q = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device)
    packed = pack_ternary(torch.randint(-1, 2, (n, k), dtype=torch.int8, device=device))
    out = w2a8_gemv_int(q, packed, k, backend="triton", options=options)
    assert out.dtype == torch.int32 and torch.equal(out, w2a8_matmul_ref(q, packed, k))


CASES = {  # name: (parts, shared_quant, epilogue, pre-norm weight per row)
    "store": (1, False, "store", False),
    "store-3-parts": (3, False, "store", False),
    "residual": (1, False, "residual", False),
    "glu": (2, True, "glu", False),
    "mlgru": (3, False, "mlgru", False),
    "row-pre-weight": (1, False, "residual", True),
}


def check_fused(shape, case, device, dtype=torch.float32, pre=True, settled=False, options=GemvOptions()):
    parts, shared, epilogue, row_pre = CASES[case]
    m, k, n = shape
    _, packed, scales = packed_parts(parts, n, k, device, shared)
    nq = 1 if shared else parts
    x = (torch.randn(m, k, device=device) * 2).to(dtype)
    norms = 1 + 0.3 * torch.randn(nq, k, device=device)
    kw = dict(parts=parts, shared_quant=shared, epilogue=epilogue)
    if pre:
        kw["pre_weight"] = torch.rand(m, k, device=device) + 0.5 if row_pre else 1 + 0.3 * torch.randn(k, device=device)
    if epilogue == "residual":
        kw["residual"] = torch.randn(m, n, device=device)
    states = None
    if epilogue == "mlgru":
        states = [torch.randn(m, n, device=device) for _ in range(2)]
        states[1].copy_(states[0])
        kw.update(lower_bound=torch.rand(n, device=device), gate_weight=1 + 0.3 * torch.randn(n, device=device))
    out = w2a8_gemv(x, norms, packed, scales, backend="triton", state=states and states[0], settled=settled,
                    options=options, **kw)  # fmt: skip
    ref = w2a8_gemv_ref(x, norms, packed, scales, state=states and states[1], **kw)
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for a, b in zip(outs, refs):
        assert a.dtype == torch.float32 and a.shape == b.shape
        # the integer sums are exact, but the kernel's float statistics round differently from the
        # twin's, so a level on a rounding edge may flip (one output moves by 1/127 of its row scale)
        assert rel_rms_error(a, b) < 2e-3
    if states:
        assert rel_rms_error(states[0], states[1]) < 1e-4


@needs_interpreter
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=ids)
def test_integer_core_is_bit_exact(shape):
    check_int_core(shape, "cpu")


def check_workspace_left_zeroed(device, options):
    """Split-K launches meet in a shared workspace: each must leave it zeroed for the next, which
    then still gets exact sums."""
    for shape in (SPLIT_K_SHAPE, (1, 64, 40)):
        check_int_core(shape, device, options)
        check_fused(shape, "mlgru", device, options=options)
        check_fused(shape, "glu", device, options=options)
        assert not w2a8_gemv_module._workspaces[torch.empty(0, device=device).device].any()


@needs_interpreter
@both_split_k_paths
def test_workspace_left_zeroed(row_finish):
    check_workspace_left_zeroed("cpu", GemvOptions(row_finish=row_finish))


def check_extreme_sums(device, k):
    """Rows at the largest sums a launch can reach (every level -128 or 127, every weight of a row
    the same sign) come out exact: the two parts' 24-bit fields and the arrival count of the
    row-finishing word carry and borrow into each other."""
    m, n = 2, 12
    q = torch.full((m, k), -128, dtype=torch.int8, device=device)
    q[1] = 127
    t = torch.ones(n, k, dtype=torch.int8, device=device)
    t[::2] = -1
    packed = pack_ternary(t)
    assert torch.equal(w2a8_gemv_int(q, packed, k, backend="triton"), w2a8_matmul_ref(q, packed, k))
    x = torch.ones(m, k, device=device)
    x[1] = -1
    two = torch.cat([packed, pack_ternary(-t)])
    norms, scales = torch.ones(1, k, device=device), torch.full((1,), 1e-3, device=device)
    out = w2a8_gemv(x, norms, two, scales, parts=2, shared_quant=True, epilogue="glu", backend="triton")
    ref = w2a8_gemv_ref(x, norms, two, scales, parts=2, shared_quant=True, epilogue="glu")
    assert rel_rms_error(out, ref) < 1e-6


@needs_interpreter
def test_extreme_sums_are_exact():
    check_extreme_sums("cpu", 160)


@pytest.mark.gpu
def test_gpu_extreme_sums_are_exact():
    check_extreme_sums("cuda", 5120)


@pytest.mark.gpu
@both_split_k_paths
def test_gpu_workspace_left_zeroed(row_finish):
    check_workspace_left_zeroed("cuda", GemvOptions(row_finish=row_finish))


@needs_interpreter
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", [CPU_SHAPES[1], CPU_SHAPES[3]], ids=ids)
def test_fused_kernel_matches_twin(shape, case):
    check_fused(shape, case, "cpu", dtype=torch.float16 if case == "store" else torch.float32)


@needs_interpreter
@pytest.mark.parametrize("case", ["residual", "mlgru"])
def test_settled_residual_and_state_read_early(case):
    check_fused(SPLIT_K_SHAPE, case, "cpu", settled=True)


@needs_interpreter
def test_without_pre_norm_matches_twin():
    check_fused((2, 48, 7), "store", "cpu", pre=False)


@pytest.mark.parametrize("pre", [False, True], ids=["bitlinear", "rmsnorm-then-bitlinear"])
def test_twin_is_the_fake_quant_bitlinear(pre):
    torch.manual_seed(3)
    k, n = 96, 24
    x = torch.randn(5, k)
    w = torch.randn(n, k) * 0.02
    norm = 1 + 0.3 * torch.randn(k)
    pre_w = 1 + 0.3 * torch.randn(k)
    packed, scale = pack_weight(w)
    kw = {"pre_weight": pre_w, "pre_eps": 1e-6} if pre else {}
    out = w2a8_gemv_ref(x, norm[None], packed, scale.reshape(1), **kw)
    src = rms_norm(x, pre_w, 1e-6) if pre else x
    expected = bitlinear(src, norm, w, impl="naive")
    assert rel_rms_error(out, expected) < 1e-4


def test_twin_epilogues_follow_their_definitions():
    torch.manual_seed(4)
    k, n = 64, 16
    _, packed, scales = packed_parts(3, n, k, "cpu")
    x, norms, state = torch.randn(2, k), torch.ones(3, k), torch.randn(2, n)
    i, f, g = w2a8_gemv_ref(x, norms, packed, scales, parts=3).chunk(3, dim=1)
    lb, gw = torch.rand(n), torch.rand(n)
    old = state.clone()
    g2, gate = w2a8_gemv_ref(x, norms, packed, scales, parts=3, epilogue="mlgru", state=state, lower_bound=lb,
                             gate_weight=gw)  # fmt: skip
    forget = lb + (1 - lb) * torch.sigmoid(f)
    assert torch.allclose(state, forget * old + F.silu(i) * (1 - forget))
    assert torch.equal(g2, g) and torch.allclose(gate, gw * F.silu(state))


def test_bad_arguments_are_refused():
    x = torch.randn(1, 32)
    packed, scale = pack_weight(torch.randn(8, 32))
    with pytest.raises(ValueError, match="epilogue"):
        w2a8_gemv(x, torch.ones(1, 32), packed, scale.reshape(1), epilogue="nope")
    with pytest.raises(ValueError, match="parts=3"):
        w2a8_gemv(x, torch.ones(1, 32), packed, scale.reshape(1), epilogue="mlgru")
    with pytest.raises(ValueError, match="packed must be"):
        w2a8_gemv(torch.randn(1, 40), torch.ones(1, 40), packed, scale.reshape(1))
    with pytest.raises(ValueError, match="norm_weights"):
        w2a8_gemv(x, torch.ones(2, 32), packed, scale.reshape(1))
    with pytest.raises(ValueError, match="int8"):
        w2a8_gemv_int(x, packed, 32)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=ids)
def test_gpu_integer_core_is_bit_exact(shape):
    check_int_core(shape, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_fused_kernel_matches_twin(case, dtype):
    check_fused((2, 2560, 2560), case, "cuda", dtype=dtype, settled=case in ("residual", "mlgru"))


def check_sums_chain(device, dtype=torch.float32):
    """A launch summing the next launch's row statistics as it writes the row: the next launch
    reading them gives what it gives computing them itself."""
    torch.manual_seed(5)
    m, d = 2, 48
    _, p_ifg, s_ifg = packed_parts(3, d, d, device)
    _, p_o, s_o = packed_parts(1, d, d, device)
    x = torch.randn(m, d, device=device).to(dtype)
    ifg_norm, o_norm = 1 + 0.3 * torch.randn(3, d, device=device), 1 + 0.3 * torch.randn(1, d, device=device)
    kw = dict(parts=3, pre_weight=torch.rand(d, device=device) + 0.5, epilogue="mlgru",
              lower_bound=torch.rand(d, device=device), gate_weight=torch.rand(d, device=device) + 0.5)  # fmt: skip
    for backend in ("triton", "torch"):
        buf = torch.zeros(m, 5, device=device)
        state = torch.zeros(m, d, device=device)
        g, gate = w2a8_gemv(x, ifg_norm, p_ifg, s_ifg, state=state, next_sums=(buf, o_norm, "gate"),
                            backend=backend, **kw)  # fmt: skip
        expected = row_sums_ref(g, o_norm, gate)
        assert torch.allclose(buf, expected, rtol=1e-5, atol=1e-6)
        res = torch.randn(m, d, device=device)
        chained = w2a8_gemv(g, o_norm, p_o, s_o, pre_weight=gate, epilogue="residual", residual=res, sums=buf,
                            backend=backend)  # fmt: skip
        direct = w2a8_gemv(g, o_norm, p_o, s_o, pre_weight=gate, epilogue="residual", residual=res, backend=backend)
        assert rel_rms_error(chained, direct) < 1e-4


@needs_interpreter
def test_row_sums_passed_between_launches():
    check_sums_chain("cpu")


@pytest.mark.gpu
def test_gpu_row_sums_passed_between_launches():
    check_sums_chain("cuda")


def test_tuned_table_holds_valid_configurations():
    from mmprof.kernels.w2a8_tuned import TUNED

    for table in TUNED.values():
        for (n, k, parts, epilogue), (block_n, block_kw, warps) in table.items():
            assert epilogue in w2a8_gemv_module.EPILOGUES and parts in (1, 2, 3) and k % 16 == 0
            assert all(v > 0 and v & (v - 1) == 0 for v in (block_n, block_kw, warps))
            assert block_kw % 4 == 0  # the kernel chains a thread's four adjacent word columns
            assert block_n >= w2a8_gemv_module._SMALLEST_BLOCK_N  # the arrival counts are sized by it


def test_pinned_configuration_beats_the_tuned_table(monkeypatch):
    mod = w2a8_gemv_module
    monkeypatch.setattr(mod, "interpreting", lambda: False)
    monkeypatch.setattr(mod, "_tuned_for", lambda device: {(64, 32, 1, "residual"): (16, 8, 2)})
    options = GemvOptions()
    nargs, kw = {"N": 64, "K": 32, "X": torch.zeros(1)}, {"NT": 1, "EPILOGUE": mod.EPILOGUES["residual"]}
    everything = ["a", "b"]

    def picked():
        (config,) = mod._pinned(everything, nargs, gemv_options=options, **kw)
        return config.kwargs["BLOCK_N"], config.kwargs["BLOCK_KW"], config.num_warps

    assert picked() == (16, 8, 2)
    options = GemvOptions(pins={(64, 32, 1, "residual"): (32, 4, 1)})
    assert picked() == (32, 4, 1)
    options = GemvOptions(tuned=False)
    assert mod._pinned(everything, nargs, gemv_options=options, **kw) is everything
    kw["EPILOGUE"] = mod.EPILOGUES["glu"]  # a shape the table lacks is autotuned
    options = GemvOptions(tuned=True)
    assert mod._pinned(everything, nargs, gemv_options=options, **kw) is everything


def test_options_are_per_call_and_hashable():
    pinned = GemvOptions(pins={(64, 32, 1, "residual"): (2, 4, 1)})
    assert hash(pinned) == hash(GemvOptions(pins=[((64, 32, 1, "residual"), (2, 4, 1))]))
    assert pinned.smallest_block_n == 2 and GemvOptions().smallest_block_n == w2a8_gemv_module._SMALLEST_BLOCK_N
    assert w2a8_gemv_module._kernel_for(pinned) is not w2a8_gemv_module._kernel_for(GemvOptions())
    assert w2a8_gemv_module._kernel_for(GemvOptions(dependent_launch=False)) is w2a8_gemv_module._kernel_for(GemvOptions())
    with pytest.raises(ValueError, match="multiple of 4"):
        GemvOptions(pins={(64, 32, 1, "residual"): (8, 6, 1)})
