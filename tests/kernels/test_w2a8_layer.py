"""A MatMul-free layer's decode step in one launch (`w2a8_layer`) against the same four products
launched one by one with the plain-PyTorch twin (`w2a8_layer_launches`, backend torch)."""

import pytest
import torch

from mmprof.kernels import w2a8_layer as layer_module
from mmprof.kernels._triton_util import interpreting
from mmprof.kernels.w2a8_gemv import row_sums_ref
from mmprof.kernels.w2a8_layer import LayerWeights, Projection, w2a8_layer, w2a8_layer_launches

from tests.kernels.test_w2a8_gemv import packed_parts, rel_rms_error

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1")
CPU_SHAPES = [(48, 80), (40, 72), (32, 128)]  # (d, intermediate): 40 and 72 are not multiples of 16
GPU_SHAPES = [(2048, 5632), (5120, 13824), (2560, 6912), (48, 80)]


def random_layer(d, inter, device, lower_bound=True):
    def proj(parts, n, k, shared=False):
        _, packed, scales = packed_parts(parts, n, k, device, shared)
        return Projection(1 + 0.3 * torch.randn(1 if shared else parts, k, device=device), packed, scales)

    norm = lambda: 1 + 0.3 * torch.randn(d, device=device)  # noqa: E731
    lb = torch.rand(d, device=device) * 0.5 if lower_bound else None
    return LayerWeights(norm(), norm(), norm(), proj(3, d, d), proj(1, d, d), proj(2, inter, d, shared=True),
                        proj(1, d, inter), lb, 1e-6)  # fmt: skip


def check_layer(d, inter, device, x_sums=True, lower_bound=True, reader_parts=3, steps=1):
    torch.manual_seed(d + inter + reader_parts)
    lw = random_layer(d, inter, device, lower_bound)
    reader = (1 + 0.3 * torch.randn(reader_parts, d, device=device), 1 + 0.3 * torch.randn(d, device=device))
    state = torch.randn(1, d, device=device)
    ref_state = state.clone()
    for _ in range(steps):  # the state carries over; the barrier counters must too, zeroed
        x = torch.randn(1, d, device=device) * 2
        xs = row_sums_ref(x, lw.ifg.norm, lw.attn_norm) if x_sums else None
        sums, ref_sums = torch.zeros(4, 1, 5, device=device), torch.zeros(4, 1, 5, device=device)
        out = w2a8_layer(x, lw, state, sums, xs, reader, backend="triton")
        ref = w2a8_layer_launches(x, lw, ref_state, ref_sums, xs, reader, backend="torch")
        # integer sums are exact; the statistics are added in another order, which may move a level by one
        assert out.shape == ref.shape and rel_rms_error(out, ref) < 2e-2
        assert rel_rms_error(state, ref_state) < 2e-2
        assert rel_rms_error(sums, ref_sums) < 2e-2
        state.copy_(ref_state)  # the next step starts from the same state on both sides
    if device != "cpu" or not interpreting():
        assert not layer_module._barriers[x.device][:2].any()  # the third is zeroed by the next launch


@needs_interpreter
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "d{}-i{}".format(*s))
def test_layer_matches_launches(shape):
    check_layer(*shape, "cpu")


@needs_interpreter
def test_layer_first_and_last_of_a_model():
    """Layer 0 (no lower bound, x's statistics computed in the launch) and the last (head reader)."""
    check_layer(48, 80, "cpu", x_sums=False, lower_bound=False)
    check_layer(48, 80, "cpu", reader_parts=1)


def test_layer_twin_is_the_four_launches():
    """Batch 2 takes the four-launch path; on CPU without Triton, the torch twin."""
    lw = random_layer(32, 64, "cpu")
    x = torch.randn(2, 32)
    reader = (torch.ones(3, 32), torch.ones(32))
    states = [torch.randn(2, 32) for _ in range(2)]
    states[1].copy_(states[0])
    sums = [torch.zeros(4, 2, 5) for _ in range(2)]
    out = w2a8_layer(x, lw, states[0], sums[0], None, reader, backend="torch")
    ref = w2a8_layer_launches(x, lw, states[1], sums[1], None, reader, backend="torch")
    assert torch.equal(out, ref) and torch.equal(states[0], states[1]) and torch.equal(sums[0], sums[1])


def test_layer_rejects_a_wrong_width():
    with pytest.raises(ValueError, match="x must be"):
        w2a8_layer(torch.randn(1, 30), random_layer(32, 64, "cpu"), torch.zeros(1, 32), torch.zeros(4, 1, 5), None,
                   (torch.ones(3, 32), None), backend="torch")  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "d{}-i{}".format(*s))
def test_gpu_layer_matches_launches(shape):
    check_layer(*shape, "cuda", steps=3)


@pytest.mark.gpu
def test_gpu_layer_first_and_last_of_a_model():
    check_layer(2048, 5632, "cuda", x_sums=False, lower_bound=False)
    check_layer(2048, 5632, "cuda", reader_parts=1)
