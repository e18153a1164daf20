"""The batch-1 decode kernels (kernels/bf16_decode.py) against their PyTorch twins, at several shapes:
in the Triton interpreter on a CPU (fp32 and bf16), compiled on a GPU (bf16, real head dims)."""

import pytest
import torch

from mmprof.kernels import bf16_decode as k
from mmprof.kernels._triton_util import interpreting

needs_triton = pytest.mark.skipif(not (interpreting() or torch.cuda.is_available()),
                                  reason="needs a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel_rms(actual, expected):
    diff = (actual.double() - expected.double()).pow(2).mean().sqrt()
    return (diff / expected.double().pow(2).mean().sqrt().clamp_min(1e-30)).item()


def dtypes():
    return [torch.float32, torch.bfloat16] if DEVICE == "cpu" else [torch.bfloat16]


@needs_triton
@pytest.mark.parametrize("dtype", dtypes(), ids=str)
@pytest.mark.parametrize("rows,cols", [(2, 3), (40, 70), (96, 200)])
@pytest.mark.parametrize("mode", ["plain", "norm", "glu", "residual"])
def test_gemv_equals_its_twin(rows, cols, mode, dtype):
    torch.manual_seed(rows + cols)
    a = torch.randn(cols, device=DEVICE).to(dtype)
    w = (torch.randn((2 if mode == "glu" else 1) * rows, cols, device=DEVICE) / cols**0.5).to(dtype)
    norm = (1 + 0.3 * torch.randn(cols, device=DEVICE)).to(dtype) if mode in ("norm", "glu") else None
    out = torch.randn(rows, device=DEVICE).to(dtype) if mode == "residual" else None
    got = k.gemv(a, w, None if out is None else out.clone(), norm=norm, glu=mode == "glu", residual=mode == "residual")
    want = k.gemv_ref(a, w, None if out is None else out.clone(), norm=norm, glu=mode == "glu",
                      residual=mode == "residual")
    assert got.shape == want.shape == (rows,) and got.dtype == dtype
    assert rel_rms(got, want) < TOLERANCE[dtype]


GPU_SPLIT_SHAPES = [(2048, 2048), (2048, 5632), (2560, 2560), (2560, 6912), (5120, 5120), (5120, 13824)]


@needs_triton
@pytest.mark.parametrize("dtype", dtypes(), ids=str)
@pytest.mark.parametrize("rows,cols,split", [(3, 70, 3), (40, 200, 2), (96, 130, 4)]
                         + ([(n, kk, s) for n, kk in GPU_SPLIT_SHAPES for s in (2, 4, 8)] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("residual", [False, True])
def test_split_k_gemv_equals_its_twin(rows, cols, split, residual, dtype):
    torch.manual_seed(rows + cols + split)
    a = torch.randn(cols, device=DEVICE).to(dtype)
    w = (torch.randn(rows, cols, device=DEVICE) / cols**0.5).to(dtype)
    out = torch.randn(rows, device=DEVICE).to(dtype) if residual else None
    blocks = k.GemvBlocks(rows=16, cols=256, split=split)
    got = k.gemv(a, w, None if out is None else out.clone(), residual=residual, blocks=blocks)
    want = k.gemv_ref(a, w, None if out is None else out.clone(), residual=residual)
    assert got.shape == (rows,) and got.dtype == dtype
    assert rel_rms(got, want) < TOLERANCE[dtype]


def test_split_k_is_for_plain_products_only():
    with pytest.raises(ValueError, match="split-K"):
        k.gemv(torch.ones(4), torch.ones(6, 4), norm=torch.ones(4), glu=True, blocks=k.GemvBlocks(split=2))


def test_gemv_with_a_residual_needs_an_output():
    with pytest.raises(ValueError, match="out"):
        k.gemv(torch.ones(4), torch.ones(3, 4), residual=True)


def qkv_case(heads, kv_heads, head_dim, hidden, max_len, pos, dtype):
    torch.manual_seed(heads * head_dim + pos)
    x = torch.randn(hidden, device=DEVICE).to(dtype)
    norm = (1 + 0.3 * torch.randn(hidden, device=DEVICE)).to(dtype)
    w = (torch.randn((heads + 2 * kv_heads) * head_dim, hidden, device=DEVICE) / hidden**0.5).to(dtype)
    angles = torch.rand(max_len, head_dim // 2, device=DEVICE) * 6
    cache = torch.randn(2, kv_heads, max_len, head_dim, device=DEVICE).to(dtype)
    position = torch.tensor([pos], device=DEVICE)
    return x, norm, w, angles.cos().to(dtype), angles.sin().to(dtype), position, cache


@needs_triton
@pytest.mark.parametrize("dtype", dtypes(), ids=str)
@pytest.mark.parametrize("heads,kv_heads,head_dim,hidden,max_len,pos",
                         [(4, 4, 16, 64, 9, 0), (4, 2, 16, 48, 9, 8), (2, 1, 32, 80, 5, 3)]
                         + ([(32, 32, 64, 2048, 300, 37), (40, 40, 128, 5120, 300, 200)] if DEVICE == "cuda" else []))
def test_norm_qkv_rope_writes_q_and_the_cache_as_its_twin(heads, kv_heads, head_dim, hidden, max_len, pos, dtype):
    x, norm, w, cos, sin, position, cache = qkv_case(heads, kv_heads, head_dim, hidden, max_len, pos, dtype)
    results = []
    for fn in (k.norm_qkv_rope, k.norm_qkv_rope_ref):
        q, c = torch.empty(heads * head_dim, device=DEVICE, dtype=dtype), cache.clone()
        fn(x, norm, 1e-6, w, cos, sin, position, q, c[0], c[1], heads)
        results.append((q, c))
    (q, c), (q_ref, c_ref) = results
    assert rel_rms(q, q_ref) < TOLERANCE[dtype]
    assert rel_rms(c[:, :, pos], c_ref[:, :, pos]) < TOLERANCE[dtype]
    others = [t for t in range(max_len) if t != pos]
    assert torch.equal(c[:, :, others], cache[:, :, others])  # only position pos is written


@needs_triton
@pytest.mark.parametrize("dtype", dtypes(), ids=str)
@pytest.mark.parametrize("heads,kv_heads,head_dim,max_len,pos",
                         [(4, 4, 16, 9, 0), (4, 2, 16, 70, 69), (3, 1, 32, 40, 20)]
                         + ([(32, 32, 64, 288, 287), (40, 40, 128, 300, 100)] if DEVICE == "cuda" else []))
def test_attend_sees_positions_up_to_pos_only(heads, kv_heads, head_dim, max_len, pos, dtype):
    torch.manual_seed(heads + pos)
    q = torch.randn(heads * head_dim, device=DEVICE).to(dtype)
    cache = torch.randn(2, kv_heads, max_len, head_dim, device=DEVICE).to(dtype)
    position = torch.tensor([pos], device=DEVICE)
    got = k.attend(q, cache[0], cache[1], position)
    assert rel_rms(got, k.attend_ref(q, cache[0], cache[1], position)) < TOLERANCE[dtype]
    poisoned = cache.clone()
    poisoned[:, :, pos + 1 :] = float("nan")  # what lies past pos is never read into the result
    assert torch.equal(k.attend(q, poisoned[0], poisoned[1], position), got)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden,inter", [(2048, 5632), (2560, 6912), (5120, 13824)], ids=["1.3b", "2.7b", "13b"])
def test_gpu_tuned_launch_shapes_give_the_twins_products(hidden, inter):
    """Each product of the 1.3b/2.7b/13b Triton step with the decoder's tuned launch shape (and
    split-K o_proj/down_proj at 2 programs an SM), bf16, against its twin."""
    from mmprof.workloads.transformer import _decode_blocks

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    blocks = _decode_blocks(hidden)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    split = k.GemvBlocks(16, 256, 4, 4, split=max(1, -(-2 * sms // -(-hidden // 16))))
    cases = {"o_proj": (hidden, hidden, "residual"), "gate_up": (inter, hidden, "glu"),
             "down_proj": (hidden, inter, "residual"), "lm_head": (32000, hidden, "norm")}
    torch.manual_seed(hidden)
    for name, (rows, cols, mode) in cases.items():
        a = torch.randn(cols, device="cuda").bfloat16()
        w = (torch.randn((2 if mode == "glu" else 1) * rows, cols, device="cuda") / cols**0.5).bfloat16()
        norm = (1 + 0.3 * torch.randn(cols, device="cuda")).bfloat16() if mode != "residual" else None
        out = torch.randn(rows, device="cuda").bfloat16() if mode == "residual" else None
        shapes = [blocks[name]] + ([split] if mode == "residual" else [])
        want = k.gemv_ref(a, w, None if out is None else out.clone(), norm=norm, glu=mode == "glu",
                          residual=mode == "residual")
        for shape in shapes:
            got = k.gemv(a, w, None if out is None else out.clone(), norm=norm, glu=mode == "glu",
                         residual=mode == "residual", blocks=shape)
            assert rel_rms(got, want) < TOLERANCE[torch.bfloat16], (name, shape)
            dependent = k.gemv(a, w, None if out is None else out.clone(), norm=norm, glu=mode == "glu",
                               residual=mode == "residual", blocks=shape, pdl=True)
            assert torch.equal(dependent, got), (name, shape)  # the same arithmetic, launched dependent
