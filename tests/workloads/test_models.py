import statistics

import pytest
import torch

from mmprof.workloads import ARCHS, build_model, forward_context, get_config
from tests.workloads import reference_models
from tests.workloads.helpers import rel_rms, saved_activation_bytes


def randomized(model):
    """Perturb every parameter so norms and lower bounds matter (init makes them ones/zeros)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("lower_bounds"):
                p.copy_(torch.randn_like(p))
    return model


ORACLE_EPS = {"fused": reference_models.PUBLISHED_BITLINEAR_EPS, "ref-fused": reference_models.PUBLISHED_BITLINEAR_EPS,
              "vanilla": reference_models.UNFUSED_BITLINEAR_EPS, "naive": reference_models.UNFUSED_BITLINEAR_EPS}


@pytest.mark.parametrize("arch, impl", [("transformer", None)] + [("mmfree", i) for i in ORACLE_EPS])
def test_forward_matches_the_written_out_definition(arch, impl, seed):
    """Each BitLinear implementation with the eps of the reference class it mirrors: `fused` gives
    the published model class's logits (FusedBitLinear, eps 1e-6), so a reference checkpoint loaded
    into it computes what the reference computes."""
    model = randomized(build_model(arch, "tiny", bitlinear=impl, seed=seed % 1000))
    ids = torch.randint(0, 256, (2, 24))
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if arch == "mmfree":
        assert model.config.bitlinear_norm_eps == ORACLE_EPS[impl]
        expected = reference_models.mmfree_logits(sd, model.config, ids, ORACLE_EPS[impl])
    else:
        expected = reference_models.transformer_logits(sd, model.config, ids)
    # Quantization amplifies rounding: a value on a rounding edge may land one int8 level apart
    # (seen up to ~1e-2 on the MatMul-free model); a wrong formula (or eps) is off by > 2e-2.
    tol = 2e-2 if arch == "mmfree" else 1e-4
    assert rel_rms(model(ids).logits, expected) < tol, f"seed={seed}"


def test_bitlinear_eps_comes_from_the_config():
    cfg = get_config("tiny")
    assert build_model("mmfree", cfg, device="meta").lm_head.eps == 1e-6  # fused: the published class's
    assert build_model("mmfree", cfg.replace(bitlinear="vanilla"), device="meta").lm_head.eps == 1e-8
    model = build_model("mmfree", cfg.replace(bitlinear_eps=1e-5), bitlinear="naive", device="meta")
    assert model.config.bitlinear == "naive"
    assert {m.eps for m in model.modules() if hasattr(m, "impl")} == {1e-5}
    assert {m.impl for m in model.modules() if hasattr(m, "impl")} == {"naive"}


def test_mmfree_parameter_names_are_the_reference_checkpoints():
    model = build_model("mmfree", "tiny", device="meta")
    names = set(dict(model.named_parameters()))
    layer = ["attn_norm.weight", "mlp_norm.weight", "attn.g_norm.weight"]
    for proj in ("attn.i_proj", "attn.f_proj", "attn.g_proj", "attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        layer += [f"{proj}.weight", f"{proj}.norm.weight"]
    expected = {f"model.layers.{n}.{name}" for n in range(2) for name in layer}
    expected |= {"model.embeddings.weight", "model.lower_bounds", "model.norm.weight", "lm_head.weight",
                 "lm_head.norm.weight"}
    assert names == expected
    cfg = model.config
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (2 * cfg.intermediate_size, cfg.hidden_size)
    assert model.model.lower_bounds.shape == (cfg.num_layers, cfg.hidden_size)


def test_transformer_parameter_names_are_hugging_face_llamas():
    model = build_model("transformer", "tiny", device="meta")
    layer = ["input_layernorm.weight", "post_attention_layernorm.weight"]
    layer += [f"self_attn.{p}_proj.weight" for p in "qkvo"] + [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    expected = {f"model.layers.{n}.{name}" for n in range(2) for name in layer}
    expected |= {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert set(dict(model.named_parameters())) == expected


def run_model(impl, state_dict, precision, ids, config="tiny", dtype=torch.float32):
    """(logits without labels, loss with labels, every parameter's gradient) of the model; every
    implementation with the same BitLinear eps (1e-8), so that they compute the same function."""
    config = (get_config(config) if isinstance(config, str) else config).replace(bitlinear_eps=1e-8)
    model = build_model("mmfree", config, bitlinear=impl, device=ids.device, dtype=dtype)
    model.load_state_dict(state_dict)
    with forward_context(precision, ids.device):
        out = model(ids, labels=ids)
        with torch.no_grad():
            logits = model(ids).logits
    out.loss.backward()
    return {"logits": logits, "loss": out.loss, **{n: p.grad for n, p in model.named_parameters()}}


@pytest.mark.parametrize("impl", ["vanilla", "ref-fused", "fused"])
def test_every_implementation_agrees_with_naive_in_fp32(impl, seed):
    state = randomized(build_model("mmfree", "tiny", seed=seed % 1000)).state_dict()
    ids = torch.randint(0, 256, (2, 32))
    got, naive = (run_model(i, state, "fp32", ids) for i in (impl, "naive"))
    # The same function: equal to fp32 rounding, except where a rounding difference pushes an
    # activation across an int8 level (seen: ~2e-3 at most); a real mismatch is off by far more.
    for name, expected in naive.items():
        assert rel_rms(got[name], expected) < 2e-2, f"{impl} {name} seed={seed}"


@pytest.mark.parametrize("impl", ["vanilla", "ref-fused", "fused"])
def test_every_implementation_under_bf16_autocast_is_as_close_to_fp32_as_naive(impl, seed):
    """Under bf16 the paths round at different points (fused keeps gates and statistics in fp32,
    vanilla quantises bf16 inputs in bf16 as the reference does), and quantization amplifies bf16
    rounding to a few % on logits and gradients; so each is measured against the fp32 model, and
    must be about as close to it as the naive model."""
    state = randomized(build_model("mmfree", "tiny", seed=seed % 1000)).state_dict()
    ids = torch.randint(0, 256, (2, 32))
    exact = run_model("naive", state, "fp32", ids)
    got, naive = (run_model(i, state, "bf16-autocast", ids) for i in (impl, "naive"))
    assert naive["logits"].dtype == torch.bfloat16 and got["logits"].dtype in (torch.bfloat16, torch.float32)
    check_as_close_as_vanilla(got, naive, exact, f"{impl} seed={seed}")


def check_as_close_as_vanilla(fused, vanilla, exact, context):
    """Logits and loss: fused's error against `exact` at most 1.5x vanilla's (or 2e-2). Gradients,
    whose errors scatter a lot from tensor to tensor: the median and the worst at most 1.3x and
    1.5x vanilla's (seen up to 1.15x and 1.24x over 60 random models)."""
    errors = {name: (rel_rms(fused[name], e), rel_rms(vanilla[name], e)) for name, e in exact.items()}
    for name in ("logits", "loss"):
        got, baseline = errors.pop(name)
        assert got < max(1.5 * baseline, 2e-2), f"{name}: {got:.3g} vs vanilla {baseline:.3g}, {context}"
    fused_errors, vanilla_errors = zip(*errors.values())
    assert statistics.median(fused_errors) < 1.3 * statistics.median(vanilla_errors), context
    assert max(fused_errors) < 1.5 * max(vanilla_errors), context


def test_fused_model_saves_fewer_activation_bytes(seed):
    ids = torch.randint(0, 256, (4, 64))
    saved = {}
    for impl in ("naive", "fused"):
        model = build_model("mmfree", "tiny", bitlinear=impl)
        _, saved[impl] = saved_activation_bytes(lambda: model(ids, labels=ids).loss, model.parameters())
    assert saved["fused"] < 0.6 * saved["naive"], saved


def test_fused_model_keeps_only_the_lean_set_per_layer():
    """Per token and layer under bf16 autocast: the fp32 residual (4d bytes), the i/f/g
    pre-activations, the MLGRU output and the o_proj output in bf16 (5 x 2d), gate_proj's output
    in bf16 (2 x 2I), 13 fp32 statistics per row, and per layer (not per token) a few [d] rows
    for the lower bound; nothing else."""
    tokens = 4 * 64
    ids = torch.randint(0, 256, (4, 64))
    saved = {}
    for layers in (1, 2):
        config = get_config("tiny").replace(num_layers=layers)
        model = build_model("mmfree", config, bitlinear="fused")
        with forward_context("bf16-autocast", "cpu"):
            _, saved[layers] = saved_activation_bytes(lambda: model(ids, labels=ids).loss, model.parameters())
    d, inter = config.hidden_size, config.intermediate_size
    per_token_layer = (saved[2] - saved[1]) / tokens
    lean = 4 * d + 5 * 2 * d + 2 * 2 * inter
    statistics = 4 * (3 + 4 + 6)  # 3 prologue rstd, 4 BitLinear-input rstd (i/f/g share one), 6 scales
    assert lean + statistics <= per_token_layer <= lean + statistics + 3 * 4 * d / tokens, per_token_layer


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
def test_every_implementation_on_gpu_is_as_close_to_fp64_as_naive_at_1_3b_width(precision):
    """Two 1.3B-shaped layers on the GPU (Triton kernels). At this width quantization amplifies even
    fp32 rounding (vanilla fp32 against vanilla with fp64 weights and activations: ~3e-2 on the
    logits, seen on CPU), so both paths are measured against the fp64 vanilla model."""
    torch.manual_seed(0)
    config = get_config("1.3b").replace(num_layers=2)
    state = {k: v.cuda() for k, v in randomized(build_model("mmfree", config, seed=1)).state_dict().items()}
    ids = torch.randint(0, config.vocab_size, (2, 512), device="cuda")
    exact = run_model("naive", state, "fp32", ids, config, dtype=torch.float64)
    naive = run_model("naive", state, precision, ids, config)
    for impl in ("vanilla", "ref-fused", "fused"):
        check_as_close_as_vanilla(run_model(impl, state, precision, ids, config), naive, exact, f"{impl} {precision}")


@pytest.mark.parametrize("arch", ARCHS)
def test_builds_on_the_target_device_and_dtype(arch):
    model = build_model(arch, "tiny", dtype=torch.bfloat16, seed=3)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    again = build_model(arch, "tiny", dtype=torch.bfloat16, seed=3)
    other = build_model(arch, "tiny", dtype=torch.bfloat16, seed=4)
    name = "lm_head.weight"
    assert torch.equal(model.state_dict()[name], again.state_dict()[name])
    assert not torch.equal(model.state_dict()[name], other.state_dict()[name])


@pytest.mark.parametrize("arch", ARCHS)
def test_meta_forward_under_bf16_autocast_emulation_saves_what_cpu_autocast_saves(arch):
    """The meta run sees the same saved activations (shape, dtype) as a real autocast run."""
    from collections import Counter

    def signature(device):
        model = build_model(arch, "tiny", device=device)
        ids = torch.randint(0, 256, (2, 16), device=device)
        saved = Counter()

        def pack(t):
            if t.dtype.is_floating_point:
                saved[(tuple(t.shape), t.dtype)] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with forward_context("bf16-autocast", device):
                model(ids, labels=ids).loss.backward()
        with torch.no_grad(), forward_context("bf16-autocast", device):
            logits = model(ids).logits
        return saved, logits.dtype

    cpu, meta = signature("cpu"), signature("meta")
    assert meta[1] == cpu[1] == torch.bfloat16
    assert meta[0] == cpu[0]


def test_lower_bounds_start_at_zero_and_rise_with_depth():
    from mmprof.workloads.mmfree import layer_lower_bounds

    bounds = layer_lower_bounds(torch.randn(6, 10))
    assert torch.equal(bounds[0], torch.zeros(10))
    assert (bounds[1:] >= bounds[:-1]).all() and (bounds < 1).all()


def test_fused_model_compiles_in_one_graph():
    model = build_model("mmfree", "tiny", bitlinear="fused")
    eager = build_model("mmfree", "tiny", bitlinear="fused")
    eager.load_state_dict(model.state_dict())
    ids = torch.randint(0, 256, (2, 16))
    compiled = torch.compile(lambda i: model(i, labels=i).loss, backend="aot_eager", fullgraph=True)
    compiled(ids).backward()
    eager(ids, labels=ids).loss.backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert rel_rms(p.grad, q.grad) < 1e-6, name
