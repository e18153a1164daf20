import pytest
import torch

from mmprof.errors import UserError
from mmprof.workloads import ARCHS, PRESETS, build_model, get_config

PAPER_PARAMS_B = {"370m": 0.37, "1.3b": 1.36, "2.7b": 2.70}


@pytest.mark.parametrize("size", PAPER_PARAMS_B)
def test_mmfree_param_counts_match_the_paper(size):
    model = build_model("mmfree", size, device="meta")
    billions = model.num_params() / 1e9
    assert abs(billions - PAPER_PARAMS_B[size]) / PAPER_PARAMS_B[size] < 0.02, billions


@pytest.mark.parametrize("size", PAPER_PARAMS_B)
def test_transformer_matches_mmfree_size(size):
    mmfree = build_model("mmfree", size, device="meta").num_params()
    transformer = build_model("transformer", size, device="meta").num_params()
    assert abs(transformer - mmfree) / mmfree < 0.01


@pytest.mark.parametrize("arch", ARCHS)
def test_13b_builds_on_meta(arch):
    model = build_model(arch, "13b", device="meta", dtype=torch.bfloat16)
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in model.parameters())
    assert 12.5e9 < model.num_params() < 13.5e9


def test_preset_shapes_follow_the_design_table():
    table = {"370m": (24, 1024, 2816, 16), "1.3b": (24, 2048, 5632, 32), "2.7b": (32, 2560, 6912, 40),
             "13b": (40, 5120, 13824, 40)}
    for size, (layers, hidden, inter, heads) in table.items():
        cfg = get_config(size)
        assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads) == (layers, hidden, inter, heads)
        assert cfg.vocab_size == 32000
    assert set(PRESETS) == {"tiny", *table}


def test_unknown_size_names_the_valid_ones():
    with pytest.raises(UserError) as err:
        get_config("7b")
    assert all(size in str(err.value) for size in PRESETS)
    assert get_config("1.3B") == PRESETS["1.3b"]


def test_unknown_arch_and_bitlinear_are_user_errors():
    with pytest.raises(UserError, match="mmfree"):
        build_model("mamba", "tiny")
    with pytest.raises(UserError, match="fused"):
        build_model("mmfree", "tiny", bitlinear="cuda")
