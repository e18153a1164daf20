"""`rewind`: the energy windows of decode-power replay the decode steps of one position range back to
back. A KV cache (Transformer++) steps from the rewound position exactly as it did the first time;
a recurrent state (MatMul-free, fake-quant and packed) has no position and is kept as it is."""

import pytest
import torch

from mmprof.errors import UserError
from mmprof.workloads import PackedMMFreeLM, build_model
from mmprof.workloads.decode import GraphDecoder, StaticDecoder, make_decoder
from tests.workloads.test_graph_decode import GPU_SHAPE, transformer
from tests.workloads.test_packed import fake_quant_model


def _steps(dec, ids):
    return torch.stack([dec.step(ids[:, t]) for t in range(ids.shape[1])], 1)


def test_transformer_steps_after_a_rewind_are_the_first_steps_again():
    model = transformer(kv_heads=2)
    prompt, fed = torch.randint(0, 256, (2, 5)), torch.randint(0, 256, (2, 6))
    dec = make_decoder(model, 2, 11)
    dec.prefill(prompt)
    first = _steps(dec, fed)
    assert dec.length == 11 and dec.decoder.pos.tolist() == [11]
    for _ in range(3):   # more steps in all than max_len holds: each pass overwrites the cache after the prompt
        dec.rewind(5)
        assert dec.length == 5 and dec.decoder.pos.tolist() == [5]
        assert torch.allclose(_steps(dec, fed), first, atol=1e-6)
    dec.rewind(8)        # mid-range: the cache before 8 is kept
    assert torch.allclose(_steps(dec, fed[:, 3:]), first[:, 3:], atol=1e-6)


def test_recurrent_rewind_keeps_the_state_and_frees_the_positions():
    torch.manual_seed(3)
    fake = fake_quant_model()
    for model in (fake, PackedMMFreeLM.from_model(fake_quant_model())):
        sd = model.static_decoder(1, 6)
        assert isinstance(sd, StaticDecoder)
        dec, twin = GraphDecoder(sd, use_graph=False), GraphDecoder(model.static_decoder(1, 20), use_graph=False)
        ids = torch.randint(0, 256, (1, 4))
        dec.prefill(ids), twin.prefill(ids)
        fed = torch.randint(0, 256, (1, 6))
        got = []
        for t in range(6):                # 4 + 6 > max_len 6: room only through rewinds
            if dec.length == dec.max_len:
                dec.rewind(4)
            got.append(dec.step(fed[:, t]))
        assert torch.equal(torch.stack(got, 1), _steps(twin, fed))   # the same state as never rewound


def test_rewind_outside_the_decoded_range_is_refused():
    dec = make_decoder(transformer(), 1, 8)
    with pytest.raises(UserError, match="rewind"):
        dec.rewind(1)                     # nothing decoded yet
    dec.prefill(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(UserError, match="rewind to 4 outside 1..3"):
        dec.rewind(4)
    dec.rewind(3)


@pytest.mark.gpu
def test_cuda_graph_replays_after_a_rewind_as_the_first_time():
    model = transformer(2, device="cuda", dtype=torch.bfloat16, **GPU_SHAPE)
    prompt = torch.randint(0, 512, (1, 7), device="cuda")
    dec = GraphDecoder(model.static_decoder(1, 40), use_graph=True)
    start = dec.prefill(prompt).argmax(-1)

    def greedy_pass():
        token, out = start.clone(), []
        for _ in range(30):
            token = dec.greedy_step(token)
            out.append(token.clone())
        return torch.stack(out)

    first = greedy_pass()
    assert dec.graph is not None
    for _ in range(2):                    # no prefill between passes: the graph replays from the rewound pos
        dec.rewind(7)
        assert torch.equal(greedy_pass(), first)
