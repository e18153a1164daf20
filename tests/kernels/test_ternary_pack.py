"""2-bit packing of ternary weights: exact round trip, the documented bit layout, BitLinear's scale."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmprof.kernels.ternary import weight_quant
from mmprof.kernels.ternary_pack import (
    CODE_MASK, pack_ternary, pack_weight, packed_words, ternary_quantize, unpack_ternary,
)  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 70), seed=st.integers(0, 2**31 - 1))
def test_round_trip_is_exact(rows, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(-1, 2, (rows, cols), generator=gen, dtype=torch.int8)
    packed = pack_ternary(t)
    assert packed.dtype == torch.int32 and packed.shape == (rows, packed_words(cols))
    assert torch.equal(unpack_ternary(packed, cols), t)


def test_swar_layout_puts_four_consecutive_weights_in_one_word():
    t = torch.randint(-1, 2, (5, 16), dtype=torch.int8)
    for row, word in zip(t, pack_ternary(t)[:, 0].tolist()):
        word &= 0xFFFFFFFF
        for s in range(4):
            lanes = (word >> (2 * s)) & CODE_MASK
            assert [((lanes >> (8 * b)) & 0xFF) - 1 for b in range(4)] == row[4 * s : 4 * s + 4].tolist()


def test_padding_codes_mean_zero_weight():
    packed = pack_ternary(torch.ones(2, 3, dtype=torch.int8))
    assert torch.equal(unpack_ternary(packed, 16)[:, 3:], torch.zeros(2, 13, dtype=torch.int8))


@pytest.mark.parametrize("shape", [(4, 32), (17, 100)], ids=lambda s: "x".join(map(str, s)))
def test_ternary_times_scale_is_the_training_paths_weight(shape):
    w = torch.randn(shape) * 0.02
    t, scale = ternary_quantize(w)
    assert scale.dim() == 0 and set(t.unique().tolist()) <= {-1, 0, 1}
    assert torch.equal(t.float() * scale, weight_quant(w))
    packed, scale2 = pack_weight(w)
    assert torch.equal(unpack_ternary(packed, shape[1]), t) and scale2 == scale


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"\{-1, 0, 1\}"):
        pack_ternary(torch.full((2, 2), 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="2-d"):
        pack_ternary(torch.zeros(4, dtype=torch.int8))
    with pytest.raises(ValueError, match="do not hold"):
        unpack_ternary(torch.zeros(2, 1, dtype=torch.int32), 40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_ternary_levels_are_the_fake_quant_models_in_its_dtype(dtype):
    torch.manual_seed(7)
    w = (torch.randn(64, 96) * 0.02).to(dtype)
    t, scale = ternary_quantize(w)
    assert scale.dtype == torch.float32
    # weight_quant computes t / s in the weight's dtype; the same levels times our fp32 1/s agree there
    assert torch.equal((t.float() * scale).to(dtype), weight_quant(w))
