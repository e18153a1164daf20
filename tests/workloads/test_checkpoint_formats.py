"""Checkpoint folders built from scratch in each published layout: the reference's hgrn_bit config with
sharded safetensors and an index, a transformers-5 Llama folder as pytorch_model.bin with grouped-query
attention, its own head_dim and tied embeddings, a tokenizer.json made with `tokenizers`, a Hub cache."""

import json

import pytest
import torch
from safetensors.torch import save_file

from mmprof.errors import UserError
from mmprof.workloads import PackedMMFreeLM, build_model, load_checkpoint, save_checkpoint
from mmprof.workloads.checkpoint import encode_prompt, resolve_checkpoint
from mmprof.workloads.config_json import config_from_json
from mmprof.workloads.ternary_stats import inspect_checkpoint, ternary_stats
from tests.workloads.reference_models import mmfree_logits, transformer_logits

# written as the reference's HGRNBitConfig.save_pretrained writes it (intermediate_size null)
REFERENCE_CONFIG = {
    "architectures": ["HGRNBitForCausalLM"], "attn_mode": "fused_recurrent", "bos_token_id": 1,
    "conv_size": 4, "eos_token_id": 2, "expand_ratio": 1, "fuse_cross_entropy": True, "hidden_act": "swish",
    "hidden_ratio": 4, "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": None,
    "max_position_embeddings": 512, "model_type": "hgrn_bit", "num_heads": 4, "num_hidden_layers": 3,
    "pad_token_id": None, "rms_norm_eps": 1e-06, "share_conv_kernel": True, "tie_word_embeddings": False,
    "torch_dtype": "float32", "transformers_version": "4.39.3", "use_cache": True, "use_lower_bound": True,
    "use_short_conv": False, "vocab_size": 300,
}  # fmt: skip
# transformers 5 spelling: rope_parameters, dtype; GQA, a head_dim that is not hidden / heads, tied
LLAMA5_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 1, "dtype": "float32", "eos_token_id": 2, "head_dim": 24, "hidden_act": "silu",
    "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 160, "max_position_embeddings": 256,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2,
    "num_key_value_heads": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}, "tie_word_embeddings": True,
    "transformers_version": "5.0.0", "use_cache": True, "vocab_size": 300,
}  # fmt: skip


def reference_folder(tmp_path, shards: int = 3):
    """A reference-format folder: config.json as above, weights in `shards` safetensors files + index."""
    arch, cfg = config_from_json(dict(REFERENCE_CONFIG))
    model = build_model(arch, cfg, seed=3)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-trivial norms and lower bounds, so a weight loaded wrongly would show
        for name, p in model.named_parameters():
            if "norm" in name or "lower_bounds" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    folder = tmp_path / "MMfreeLM-tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(REFERENCE_CONFIG, indent=2))
    state = {n: t.contiguous() for n, t in model.state_dict().items()}
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: state[n] for n in part}, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return model, folder


def llama_folder(tmp_path, config=LLAMA5_CONFIG):
    """A transformers-5 Llama folder with pytorch_model.bin only (tied: no lm_head.weight in it)."""
    arch, cfg = config_from_json(dict(config))
    model = build_model(arch, cfg, seed=4)
    folder = tmp_path / "llama-tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {n: t.clone() for n, t in model.state_dict().items() if n != "lm_head.weight"}
    torch.save(state, folder / "pytorch_model.bin")
    return model, folder


def tokenizer_file(folder, words=("hello", "ternary", "world", "weights")):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: 3 + i for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    return vocab



def assert_same_model(loaded, model, oracle, seq: int) -> None:
    """Every parameter equal, and the same logits as the in-memory model and as the test oracle."""
    mine, theirs = loaded.state_dict(), model.state_dict()
    assert all(torch.equal(mine[n], theirs[n]) for n in theirs)
    ids = torch.randint(0, 300, (2, seq), generator=torch.Generator().manual_seed(seq))
    with torch.inference_mode():
        logits = loaded(ids).logits
        assert torch.equal(logits, model(ids).logits)
        assert torch.allclose(logits, oracle(theirs, loaded.config, ids), atol=1e-4, rtol=1e-4)

def test_reference_folder_with_sharded_safetensors_loads_every_parameter(tmp_path):
    model, folder = reference_folder(tmp_path)
    loaded = load_checkpoint(folder, "cpu")
    cfg = loaded.config
    assert (cfg.hidden_size, cfg.num_layers, cfg.vocab_size, cfg.max_seq_len) == (64, 3, 300, 512)
    assert cfg.intermediate_size == 256 * -(-int(64 * 4 * 2 / 3) // 256)  # from hidden_ratio, as the reference
    assert cfg.num_heads == 4 and cfg.use_lower_bound and cfg.rms_norm_eps == 1e-6
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert_same_model(loaded, model, mmfree_logits, seq=7)


def test_llama5_bin_folder_with_gqa_head_dim_and_tied_embeddings(tmp_path):
    model, folder = llama_folder(tmp_path)
    loaded = load_checkpoint(folder, "cpu")
    cfg = loaded.config
    assert (cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.rope_theta) == (4, 2, 24, 500000.0)
    assert cfg.tie_word_embeddings and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.model.layers[0].self_attn.k_proj.weight.shape == (2 * 24, 64)
    assert loaded.model.layers[0].self_attn.q_proj.weight.shape == (4 * 24, 64)
    assert_same_model(loaded, model, transformer_logits, seq=9)


def test_transformers4_spelling_reads_the_same_model(tmp_path):
    four = {k: v for k, v in LLAMA5_CONFIG.items() if k not in ("rope_parameters", "dtype")}
    four.update(rope_theta=500000.0, rope_scaling=None, torch_dtype="bfloat16")
    assert config_from_json(four) == config_from_json(dict(LLAMA5_CONFIG))
    _, folder = llama_folder(tmp_path, four)
    assert next(load_checkpoint(folder).parameters()).dtype == torch.bfloat16   # torch_dtype
    (folder / "config.json").write_text(json.dumps({**LLAMA5_CONFIG, "dtype": "bfloat16"}))
    assert next(load_checkpoint(folder).parameters()).dtype == torch.bfloat16   # dtype


@pytest.mark.parametrize("make", [reference_folder, llama_folder], ids=["hgrn_bit", "llama5"])
def test_round_trip_keeps_every_field_and_the_logits(tmp_path, make):
    model, folder = make(tmp_path)
    source = json.loads((folder / "config.json").read_text())
    loaded = load_checkpoint(folder, "cpu")
    save_checkpoint(loaded, tmp_path / "again")
    written = json.loads((tmp_path / "again" / "config.json").read_text())
    assert {k: written.get(k) for k in source} == source
    again = load_checkpoint(tmp_path / "again", "cpu")
    assert again.config == loaded.config
    ids = torch.randint(0, 300, (1, 6))
    with torch.inference_mode():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_written_configs_are_each_formats_own(tmp_path):
    save_checkpoint(build_model("mmfree", "tiny"), tmp_path / "mm")   # the tiny preset: 4 Transformer++ heads
    mm = json.loads((tmp_path / "mm" / "config.json").read_text())
    assert mm["num_heads"] == 1 and mm["intermediate_size"] is None and mm["hidden_ratio"] == 4
    assert not {"num_attention_heads", "num_key_value_heads", "rope_theta", "head_dim"} & set(mm)
    save_checkpoint(build_model("transformer", "tiny"), tmp_path / "tf")
    tf = json.loads((tmp_path / "tf" / "config.json").read_text())
    assert tf["num_attention_heads"] == 4 and tf["head_dim"] == 16 and "num_heads" not in tf
    assert tf["rope_theta"] == 10000.0 and tf["rope_scaling"] is None and tf["torch_dtype"] == "float32"


@pytest.mark.parametrize(
    "change,field",
    [
        ({"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}}, "rope_parameters.rope_type 'llama3'"),
        ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type 'linear'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"sliding_window": 4096}, "sliding_window"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"model_type": "mistral"}, "model_type 'mistral'"),
    ],
    ids=["rope-llama3", "rope-linear", "attention-bias", "mlp-bias", "sliding-window", "act", "kv-heads", "mistral"],
)
def test_unrepresentable_llama_fields_are_one_line_errors(tmp_path, change, field):
    _, folder = llama_folder(tmp_path)
    (folder / "config.json").write_text(json.dumps({**LLAMA5_CONFIG, **change}))
    with pytest.raises(UserError, match="unsupported settings") as err:
        load_checkpoint(folder)
    assert field in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "change,field",
    [({"expand_ratio": 2}, "expand_ratio 2"), ({"use_short_conv": True}, "use_short_conv"),
     ({"tie_word_embeddings": True}, "tie_word_embeddings"), ({"attn_mode": "chunk"}, "attn_mode 'chunk'"),
     ({"num_heads": 5}, "num_heads 5")],
    ids=["expand", "short-conv", "tied", "chunk", "heads"],
)
def test_unrepresentable_hgrn_bit_fields_are_one_line_errors(tmp_path, change, field):
    _, folder = reference_folder(tmp_path, shards=1)
    (folder / "config.json").write_text(json.dumps({**REFERENCE_CONFIG, **change}))
    with pytest.raises(UserError, match="unsupported settings") as err:
        load_checkpoint(folder)
    assert field in str(err.value)


def test_index_naming_a_missing_shard_is_an_error(tmp_path):
    _, folder = reference_folder(tmp_path)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(UserError, match="shards not found.*model-00002-of-00003"):
        load_checkpoint(folder)


def test_hub_repo_id_resolves_from_the_local_cache_only(tmp_path):
    _, folder = reference_folder(tmp_path, shards=1)
    cache = tmp_path / "hub"
    snap = cache / "models--someone--MMfreeLM-tiny" / "snapshots" / ("a" * 40)
    snap.parent.mkdir(parents=True)
    folder.rename(snap)
    (cache / "models--someone--MMfreeLM-tiny" / "refs").mkdir()
    (cache / "models--someone--MMfreeLM-tiny" / "refs" / "main").write_text("a" * 40)
    assert resolve_checkpoint("someone/MMfreeLM-tiny", cache_dir=cache) == snap
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        resolve_checkpoint("someone/not-downloaded", cache_dir=cache)
    with pytest.raises(UserError, match="no such folder"):
        resolve_checkpoint(str(tmp_path / "absent"))


def test_prompt_is_tokenised_with_the_folders_tokenizer(tmp_path):
    _, folder = llama_folder(tmp_path)
    with pytest.raises(UserError, match="no tokenizer.json"):
        encode_prompt(folder, "hello world", 300)
    vocab = tokenizer_file(folder)
    assert encode_prompt(folder, "hello ternary world", 300) == [vocab["hello"], vocab["ternary"], vocab["world"]]
    with pytest.raises(UserError, match="outside the model's vocab_size 4"):
        encode_prompt(folder, "weights", 4)


def test_ternary_stats_of_the_packed_model_match_the_float_weights(tmp_path):
    model, folder = reference_folder(tmp_path, shards=1)
    stats = ternary_stats(model)
    assert len(stats) == 3 * 6 + 1
    first = model.model.layers[0].attn.i_proj.weight
    scale = first.abs().mean()
    zero = ((first / scale).round().clamp(-1, 1) == 0).float().mean().item()
    assert stats[0].name == "model.layers.0.attn.i_proj"
    assert stats[0].zero_frac == pytest.approx(zero) and stats[0].scale == pytest.approx(scale.item())
    packed = ternary_stats(PackedMMFreeLM.from_model(model))
    assert sorted(s.zero_frac for s in packed) == pytest.approx(sorted(s.zero_frac for s in stats))
    summary, rows = inspect_checkpoint(str(folder))
    assert summary["params"] == model.num_params() and len(rows) == len(stats)
    assert 0 < summary["packed_gib"] < summary["stored_gib"]
