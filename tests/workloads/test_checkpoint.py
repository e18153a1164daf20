import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmprof.errors import UserError
from mmprof.workloads import ARCHS, build_model, get_config, load_checkpoint, save_checkpoint


def saved(tmp_path, arch, **kw):
    model = build_model(arch, "tiny", seed=9, **kw)
    save_checkpoint(model, tmp_path / arch)
    return model, tmp_path / arch


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_gives_the_same_logits(tmp_path, arch, seed):
    model, folder = saved(tmp_path, arch)
    loaded = load_checkpoint(folder, "cpu", torch.float32)
    # a MatMul-free config.json holds the MLGRU's num_heads (the reference's default 1), not the preset's
    expected = model.config.replace(num_heads=1) if arch == "mmfree" else model.config
    assert type(loaded) is type(model) and loaded.config == expected
    ids = torch.randint(0, 256, (2, 10))
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_config_keys_follow_the_reference_formats(tmp_path):
    _, folder = saved(tmp_path, "mmfree")
    cfg = json.loads((folder / "config.json").read_text())
    tiny = get_config("tiny")
    assert cfg["model_type"] == "hgrn_bit" and cfg["num_hidden_layers"] == tiny.num_layers
    assert cfg["hidden_size"] == tiny.hidden_size and cfg["hidden_ratio"] == 4
    assert cfg["intermediate_size"] is None  # the reference derives it from hidden_ratio: the preset's width
    assert cfg["vocab_size"] == tiny.vocab_size and cfg["use_lower_bound"] is True
    _, folder = saved(tmp_path, "transformer")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_attention_heads"] == tiny.num_heads
    assert cfg["num_key_value_heads"] == tiny.num_heads and cfg["rms_norm_eps"] == tiny.rms_norm_eps


def test_load_casts_to_the_requested_dtype_and_defaults_to_the_configs(tmp_path):
    _, folder = saved(tmp_path, "mmfree", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in load_checkpoint(folder).parameters())
    assert all(p.dtype == torch.float32 for p in load_checkpoint(folder, "cpu", torch.float32).parameters())
    assert all(p.is_meta for p in load_checkpoint(folder, "meta").parameters())


def test_reference_config_without_intermediate_size(tmp_path):
    model, folder = saved(tmp_path, "mmfree")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = None  # the reference derives it from hidden_ratio
    (folder / "config.json").write_text(json.dumps(cfg))
    assert load_checkpoint(folder).config.intermediate_size == model.config.intermediate_size


def test_mismatched_tensors_are_listed_in_one_error(tmp_path):
    _, folder = saved(tmp_path, "mmfree")
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    tensors.pop("model.layers.1.attn.f_proj.weight")
    tensors.pop("lm_head.norm.weight")
    tensors["model.extra.weight"] = torch.zeros(3)
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, str(path))
    with pytest.raises(UserError) as err:
        load_checkpoint(folder)
    message = str(err.value)
    for name in ("model.layers.1.attn.f_proj.weight", "lm_head.norm.weight", "model.extra.weight", "model.norm.weight"):
        assert name in message
    assert "missing (2)" in message and "unexpected (1)" in message and "wrong shape (1)" in message


def test_loading_the_other_arch_lists_the_difference(tmp_path):
    _, folder = saved(tmp_path, "transformer")
    cfg = json.loads((folder / "config.json").read_text())
    mm_cfg = json.loads((saved(tmp_path, "mmfree")[1] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(mm_cfg))
    with pytest.raises(UserError, match=r"missing \(\d+\).*\.\.\. and \d+ more"):
        load_checkpoint(folder)
    assert cfg["model_type"] == "llama"


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda f: (f / "config.json").unlink(), "no config.json"),
        (lambda f: (f / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda f: (f / "config.json").write_text('{"model_type": "mamba"}'), "model_type 'mamba'"),
        (lambda f: (f / "model.safetensors").unlink(), "no \\*.safetensors files \\(nor pytorch_model.bin\\)"),
        (lambda f: (f / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!"), "cannot read"),
    ],
    ids=["no-config", "bad-json", "unknown-type", "no-weights", "corrupt-weights"],
)
def test_broken_folders_are_user_errors(tmp_path, damage, match):
    _, folder = saved(tmp_path, "transformer")
    damage(folder)
    with pytest.raises(UserError, match=match):
        load_checkpoint(folder)


def test_unsupported_llama_settings_are_refused(tmp_path):
    _, folder = saved(tmp_path, "transformer")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(rope_scaling={"type": "linear", "factor": 2.0}, attention_bias=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="rope_scaling.*attention_bias"):
        load_checkpoint(folder)


def test_tied_llama_and_grouped_query_attention(tmp_path, seed):
    cfg = get_config("tiny").replace(tie_word_embeddings=True, num_kv_heads=2)
    model = build_model("transformer", cfg, seed=1)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_checkpoint(model, tmp_path / "tied")
    assert "lm_head.weight" not in load_file(str(tmp_path / "tied" / "model.safetensors"))
    loaded = load_checkpoint(tmp_path / "tied")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.num_params() == model.num_params()
    ids = torch.randint(0, 256, (1, 9))
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
