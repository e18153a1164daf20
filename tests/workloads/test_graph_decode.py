"""Transformer++'s static decoder and `GraphDecoder`: on CPU (eager) the same logits as the model's
full forward and the plain `Decoder`; on a GPU the CUDA-graph replay as the eager static steps."""

import pytest
import torch

from mmprof.errors import UserError
from mmprof.workloads import Decoder, build_model
from mmprof.kernels._triton_util import interpreting
from mmprof.workloads.decode import GraphDecoder, StaticDecoder, make_decoder
from tests.workloads.helpers import rel_rms


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def transformer(kv_heads=None, device="cpu", dtype=torch.float32, **shape):
    cfg = build_model("transformer", "tiny", device="meta").config.replace(num_kv_heads=kv_heads, **shape)
    return build_model("transformer", cfg, device=device, dtype=dtype, seed=3).eval()


def teacher_forced(decoder, ids, prompt_len):
    """Logits for positions prompt_len-1 .. T-1 from prefill + steps fed ids: [B, T-P+1, V]."""
    logits = [decoder.prefill(ids[:, :prompt_len])]
    logits += [decoder.step(ids[:, t]) for t in range(prompt_len, ids.shape[1])]
    return torch.stack(logits, 1)


class Plain(torch.nn.Module):
    """A model with no static decoder (make_decoder falls back to Decoder)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, state=None):
        return self.inner(input_ids, state=state)

    def init_state(self, batch, max_len, device=None):
        return self.inner.init_state(batch, max_len, device)


@pytest.mark.parametrize("kv_heads", [None, 2, 1], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("batch", [1, 3], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("prompt_len", [1, 6, 13], ids=lambda p: f"p{p}")
def test_static_decoding_equals_the_decoder_and_the_full_forward(kv_heads, batch, prompt_len, seed):
    model = transformer(kv_heads)
    ids = torch.randint(0, 256, (batch, 13))
    with torch.inference_mode():
        full = model(ids).logits[:, prompt_len - 1 :]
    plain = teacher_forced(Decoder(model, batch, 13), ids, prompt_len)
    for max_len in (13, 21):  # 21: the mask row is padded to 24
        static = teacher_forced(make_decoder(model, batch, max_len), ids, prompt_len)
        assert static.shape == full.shape
        assert rel_rms(static, full) < 1e-5, f"seed={seed}"
        assert rel_rms(static, plain) < 1e-5, f"seed={seed}"


def test_prefill_fills_the_static_cache_and_puts_the_position_on_the_device(seed):
    model = transformer(2)
    ids = torch.randint(0, 256, (2, 7))
    sd = model.static_decoder(2, 10)
    logits = sd.prefill(ids)
    plain = Decoder(model, 2, 10)
    assert torch.allclose(logits, plain.prefill(ids), atol=1e-5), f"seed={seed}"
    assert sd.cache.k.shape == plain.state.k.shape == (2, 2, 2, 10, 16)
    assert torch.allclose(sd.cache.k[..., :7, :], plain.state.k[..., :7, :], atol=1e-6)
    assert torch.allclose(sd.cache.v[..., :7, :], plain.state.v[..., :7, :], atol=1e-6)
    assert sd.pos.tolist() == [7] and sd.pos.device == ids.device
    sd.step(ids[:, 0])
    assert sd.pos.tolist() == [8]


def test_fused_weights_leave_the_parameters_as_they_were(seed):
    model = transformer(2)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    ids = torch.randint(0, 256, (2, 6))
    with torch.inference_mode():
        logits = model(ids).logits
    sd = model.static_decoder(2, 8)
    attn = model.model.layers[1].self_attn
    assert sd.qkv[1].shape == (64 + 2 * 32, 64) and sd.gate_up[1].shape == (2 * 256, 64)
    assert attn.q_proj.weight.data_ptr() == sd.qkv[1].data_ptr()
    assert attn.v_proj.weight.data_ptr() == sd.qkv[1][96].data_ptr()
    assert model.static_decoder(1, 4).qkv[1].data_ptr() == sd.qkv[1].data_ptr()  # laid out once
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, logits)
    loss = model(ids, labels=ids).loss  # still trainable: gradients reach the re-pointed parameters
    loss.backward()
    assert attn.k_proj.weight.grad is not None and model.model.layers[0].mlp.up_proj.weight.grad is not None


def test_a_second_prefill_starts_over_like_a_fresh_decoder(seed):
    model = transformer()
    first, second = torch.randint(0, 256, (2, 12)), torch.randint(0, 256, (2, 9))
    reused = make_decoder(model, 2, 12)
    teacher_forced(reused, first, 3)  # leaves keys at every position the second prompt does not reach
    again = teacher_forced(reused, second, 5)
    fresh = teacher_forced(make_decoder(model, 2, 12), second, 5)
    assert rel_rms(again, fresh) < 1e-6, f"seed={seed}"
    assert reused.length == 9


def test_decoding_past_max_len_or_with_a_wrong_batch_is_refused():
    model = transformer()
    decoder = make_decoder(model, 1, 5)
    with pytest.raises(UserError, match="before prefill"):
        decoder.step(torch.zeros(1, dtype=torch.long))
    with pytest.raises(UserError, match="max_len"):
        decoder.prefill(torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(UserError, match="sequences"):
        decoder.prefill(torch.zeros(2, 3, dtype=torch.long))
    decoder.prefill(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(UserError, match="sequences"):
        decoder.step(torch.zeros(2, dtype=torch.long))
    decoder.step(torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(UserError, match="max_len"):
        decoder.step(torch.zeros(1, dtype=torch.long))
    assert decoder.length == decoder.max_len == 5
    with pytest.raises(UserError, match="1 x 6"):
        model.static_decoder(1, 5).prefill(torch.zeros(1, 6, dtype=torch.long))


def test_make_decoder_uses_the_static_decoder_when_the_model_has_one():
    model = transformer()
    graph = make_decoder(model, 2, 8)
    assert isinstance(graph, GraphDecoder) and (graph.batch, graph.max_len) == (2, 8)
    plain = make_decoder(Plain(model), 2, 8)
    assert isinstance(plain, Decoder)
    ids = torch.randint(0, 256, (2, 8))
    assert rel_rms(teacher_forced(plain, ids, 3), teacher_forced(graph, ids, 3)) < 1e-5
    with pytest.raises(UserError, match="CUDA"):
        make_decoder(model, 2, 8, graph=True).prefill(ids[:, :3])


def test_bf16_static_decoding_stays_close_to_the_decoder():
    model = transformer(dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (2, 10))
    static = teacher_forced(make_decoder(model, 2, 10), ids, 4)
    assert static.dtype == torch.bfloat16
    assert rel_rms(static, teacher_forced(Decoder(model, 2, 10), ids, 4)) < 3e-2


# A GPU-sized shape: head_dim 64 and bf16, as the real presets decode (the tiny preset's head_dim is 16).
GPU_SHAPE = dict(vocab_size=512, hidden_size=256, num_heads=4, intermediate_size=768, num_layers=3)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_heads", [None, 2], ids=["mha", "gqa2"])
@pytest.mark.parametrize("batch", [1, 4], ids=lambda b: f"b{b}")
def test_cuda_graph_replays_the_eager_steps_and_survives_a_new_prompt(kv_heads, batch, seed):
    model = transformer(kv_heads, device="cuda", dtype=torch.bfloat16, **GPU_SHAPE)
    first, second = torch.randint(0, 512, (2, batch, 40), device="cuda")
    graph = GraphDecoder(model.static_decoder(batch, 45), use_graph=None)
    eager = GraphDecoder(model.static_decoder(batch, 45), use_graph=False)
    got = teacher_forced(graph, first, 9)
    assert graph.graph is not None
    assert rel_rms(got, teacher_forced(eager, first, 9)) < 1e-2, f"seed={seed}"
    assert rel_rms(got, teacher_forced(Decoder(model, batch, 45), first, 9)) < 5e-2, f"seed={seed}"
    captured = graph.graph
    got2 = teacher_forced(graph, second, 4)  # a new prompt: same graph, state reset by prefill
    assert graph.graph is captured
    assert rel_rms(got2, teacher_forced(eager, second, 4)) < 1e-2, f"seed={seed}"
    assert rel_rms(teacher_forced(graph, first, 9), got) < 1e-3, f"seed={seed}"


@pytest.mark.gpu
def test_cuda_graph_logits_are_fresh_tensors_and_a_full_prompt_captures_nothing():
    model = transformer(device="cuda", dtype=torch.bfloat16, **GPU_SHAPE)
    ids = torch.randint(0, 512, (2, 8), device="cuda")
    decoder = make_decoder(model, 2, 8)
    decoder.prefill(ids)
    assert decoder.graph is None
    with pytest.raises(UserError, match="max_len"):
        decoder.step(ids[:, 0])
    decoder.prefill(ids[:, :3])
    assert decoder.graph is not None
    a = decoder.step(ids[:, 3])
    kept = a.clone()
    b = decoder.step(ids[:, 4])
    assert torch.equal(a, kept) and not torch.equal(a, b)


def greedy_tokens(decoder, prompt, steps, fed_back=True):
    """Greedy ids after the prompt: the first from the prefill's logits, then `steps` greedy steps,
    each fed the ids the step before returned (or a copy of them, fed_back=False)."""
    token = decoder.prefill(prompt).argmax(-1)
    out = [token.clone()]
    for _ in range(steps):
        token = decoder.greedy_step(token if fed_back else token.clone())
        out.append(token.clone())
    return torch.stack(out, 1)


def test_greedy_step_is_the_argmax_of_step():
    model = transformer(kv_heads=2)
    prompt = torch.randint(0, model.config.vocab_size, (2, 5))
    expected = full_forward_greedy(model, prompt, 4)
    for decoder in (Decoder(model, 2, 10), GraphDecoder(model.static_decoder(2, 10), use_graph=False)):
        assert torch.equal(greedy_tokens(decoder, prompt, 4)[:, 1:], expected[:, 1:])


def full_forward_greedy(model, prompt, steps):
    """The greedy ids after the prompt [B, steps + 1], each from the model's full forward over the
    growing sequence."""
    ids = prompt
    for _ in range(steps + 1):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[:, prompt.shape[1]:]


@pytest.mark.gpu
def test_cuda_graph_greedy_steps_feed_themselves_back():
    model = transformer(device="cuda", dtype=torch.bfloat16, **GPU_SHAPE)
    prompt = torch.randint(0, 512, (3, 6), device="cuda")
    graph = GraphDecoder(model.static_decoder(3, 30), use_graph=True)
    eager = GraphDecoder(model.static_decoder(3, 30), use_graph=False)
    got = greedy_tokens(graph, prompt, 20)
    assert graph.graph is not None
    assert torch.equal(got, greedy_tokens(graph, prompt, 20, fed_back=False))
    # each id the graph chose is the eager steps' best given the same prefix, up to bf16 near-ties
    logits = teacher_forced(eager, torch.cat([prompt, got[:, :-1]], 1), 6).float()
    best, chosen = logits.amax(-1), logits.gather(-1, got[..., None]).squeeze(-1)
    assert (best - chosen).max() <= 1e-2 * best.abs().max()


def test_every_static_decoder_meets_the_protocol():
    from mmprof.workloads import PackedMMFreeLM

    transformer_sd = transformer().static_decoder(1, 4)
    mmfree = build_model("mmfree", "tiny", seed=0).eval()
    for sd in (transformer_sd, mmfree.static_decoder(1, 4), PackedMMFreeLM.from_model(mmfree).static_decoder(1, 4)):
        assert isinstance(sd, StaticDecoder), type(sd).__name__
        assert (sd.batch, sd.max_len) == (1, 4)


triton_step = pytest.mark.skipif(not (interpreting() or torch.cuda.is_available()),
                                 reason="needs a GPU or TRITON_INTERPRET=1")


@triton_step
def test_triton_step_decodes_the_greedy_tokens_of_the_eager_decoder(seed):
    """On a CPU under the interpreter (fp32): the batch-1 Triton step's tokens and logits are the eager
    decoder's (grouped-query heads; a few steps: the interpreter is slow)."""
    model = transformer(2, device=DEVICE)
    prompt = torch.randint(0, 256, (1, 5), device=DEVICE)
    sd = model.static_decoder(1, 9, backend="triton")
    assert sd.backend == "triton"
    fast = GraphDecoder(sd, use_graph=False)
    assert torch.equal(greedy_tokens(fast, prompt, 3), greedy_tokens(Decoder(model, 1, 9), prompt, 3)), f"seed={seed}"
    ids = torch.randint(0, 256, (1, 9), device=DEVICE)
    assert rel_rms(teacher_forced(fast, ids, 6), teacher_forced(Decoder(model, 1, 9), ids, 6)) < 1e-5, f"seed={seed}"


def test_the_triton_step_is_chosen_only_where_it_applies():
    model = transformer()
    assert model.static_decoder(1, 4).backend == "torch"  # CPU: the eager PyTorch step
    assert model.static_decoder(1, 4, backend="torch").backend == "torch"
    with pytest.raises(UserError, match="batch 1"):
        model.static_decoder(2, 4, backend="triton")
    with pytest.raises(UserError, match="backend"):
        model.static_decoder(1, 4, backend="fast")


@pytest.mark.gpu
@pytest.mark.parametrize("size", ["370m", "1.3b"])
def test_gpu_triton_step_greedy_tokens_are_the_eager_decoders(size):
    """A real preset in bf16: the graphed Triton step's greedy tokens equal the eager `Decoder`'s
    until the first bf16 near-tie (the two sum in different orders), and every token it chose is the
    eager decoder's best given the same prefix, up to such ties."""
    torch.manual_seed(0)
    model = build_model("transformer", size, device="cuda", dtype=torch.bfloat16).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 32), device="cuda")
    steps = 64
    fast = GraphDecoder(model.static_decoder(1, 32 + steps + 1), use_graph=True)
    assert fast.decoder.backend == "triton"
    got = greedy_tokens(fast, prompt, steps)
    assert fast.graph is not None
    eager = Decoder(model, 1, 32 + steps + 1)
    logits = teacher_forced(eager, torch.cat([prompt, got[:, :-1]], 1), 32).float()
    best, chosen = logits.amax(-1), logits.gather(-1, got[..., None]).squeeze(-1)
    ties = best - chosen
    assert (ties <= 2e-2 * best.abs().max()).all(), ties.max().item()
    same = greedy_tokens(Decoder(model, 1, 32 + steps + 1), prompt, steps)
    first_differing = (got != same).nonzero()
    if len(first_differing):  # a difference starts only where the eager decoder had a near-tie
        t = first_differing[0, 1].item()
        top2 = logits[0, t].topk(2).values
        assert (top2[0] - top2[1]).item() <= 2e-2 * best.abs().max().item()


def test_the_compile_backend_is_accepted_and_compiles_lazily():
    sd = transformer().static_decoder(1, 4, backend="compile")
    assert sd.backend == "compile" and callable(sd._compiled_step)


@pytest.mark.gpu
def test_gpu_compiled_step_in_a_cuda_graph_gives_the_torch_steps_logits(monkeypatch):
    """torch.compile's step (default mode, to compile fast) graphed as GraphDecoder graphs it: the
    PyTorch step's logits (fp32: only summation order differs) and greedy tokens."""
    from mmprof.workloads.transformer import TransformerStaticDecoder

    monkeypatch.setattr(TransformerStaticDecoder, "COMPILE_MODE", "default")
    model = transformer(2, device="cuda")
    ids = torch.randint(0, 256, (1, 12), device="cuda")
    fast = GraphDecoder(model.static_decoder(1, 12, backend="compile"), use_graph=True)
    plain = GraphDecoder(model.static_decoder(1, 12, backend="torch"), use_graph=False)
    assert rel_rms(teacher_forced(fast, ids, 5), teacher_forced(plain, ids, 5)) < 1e-4
    assert fast.graph is not None
    prompt = ids[:, :5]
    assert torch.equal(greedy_tokens(fast, prompt, 6), greedy_tokens(Decoder(model, 1, 12), prompt, 6))


@pytest.mark.gpu
@pytest.mark.parametrize("size", ["tiny-gpu", "1.3b"])
def test_gpu_dependent_launches_give_the_plain_launches_logits_bit_for_bit(size):
    """The graphed Triton step with programmatic dependent launch (each kernel may start before the
    one before it ends, and waits before it reads) against plain stream order: the same arithmetic,
    so the same bits, step after step (a kernel that read its input too early would differ)."""
    from mmprof.kernels._triton_util import pdl_supported

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if size == "tiny-gpu":
        model = transformer(2, device="cuda", dtype=torch.bfloat16, **GPU_SHAPE)
    else:
        torch.manual_seed(0)
        model = build_model("transformer", size, device="cuda", dtype=torch.bfloat16).eval()
    if not pdl_supported(model.lm_head.weight):
        pytest.skip("programmatic dependent launch needs Hopper or later and a Triton with griddepcontrol")
    ids = torch.randint(0, model.config.vocab_size, (1, 48), device="cuda")
    logits = {}
    for pdl in (False, True):
        sd = model.static_decoder(1, 48)
        assert sd.backend == "triton"
        sd.pdl = pdl
        logits[pdl] = teacher_forced(GraphDecoder(sd, use_graph=True), ids, 16)
    assert torch.equal(logits[True], logits[False])
