import numpy as np
import pytest
import torch

from mmprof.errors import UserError
from mmprof.workloads import ARCHS, PRECISIONS, TrainSpec, get_config, make_trainer, model_flops_per_token


@pytest.mark.parametrize("precision", ["bf16-autocast", "fp32"])
@pytest.mark.parametrize("arch", ARCHS)
def test_loss_falls_on_a_fixed_batch(arch, precision, seed):
    trainer = make_trainer(TrainSpec(arch, "tiny", batch=2, seq=32, precision=precision, lr=3e-3, seed=seed), "cpu")
    batch = trainer.next_batch()
    losses = [trainer.step(batch=batch) for _ in range(6)]
    assert all(isinstance(x, float) for x in losses)
    assert losses[-1] < losses[0] - 0.2, losses


def test_phases_wrap_forward_backward_optimizer_in_order():
    trainer = make_trainer(TrainSpec("mmfree", "tiny", batch=1, seq=8), "cpu")
    events = []

    class Phase:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            events.append(("enter", self.name))

        def __exit__(self, *exc):
            events.append(("exit", self.name))

    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.step(phase=Phase)
    assert events == [(e, n) for n in ("forward", "backward", "optimizer") for e in ("enter", "exit")]
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    assert all(p.grad is None for p in trainer.model.parameters())


@pytest.mark.parametrize("precision", PRECISIONS)
def test_master_weights_and_optimizer_state_dtypes(precision):
    trainer = make_trainer(TrainSpec("mmfree", "tiny", batch=1, seq=8, precision=precision), "cpu")
    trainer.step()
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    for p in trainer.model.parameters():
        assert p.dtype == want and trainer.optimizer.state[p]["exp_avg"].dtype == want


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_step_runs_on_meta_without_a_loss(arch, precision):
    trainer = make_trainer(TrainSpec(arch, "tiny", batch=2, seq=16, precision=precision), "meta")
    assert trainer.step() is None and trainer.step() is None
    assert all(p.is_meta for p in trainer.model.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_step_runs_under_fake_tensors(arch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        trainer = make_trainer(TrainSpec(arch, "tiny", batch=2, seq=16), "cpu")
        assert trainer.step() is None


def test_random_tokens_are_seeded():
    spec = TrainSpec("transformer", "tiny", batch=3, seq=10, seed=11)
    a, b = make_trainer(spec, "cpu"), make_trainer(spec, "cpu")
    first = a.next_batch()
    assert torch.equal(first, b.next_batch()) and not torch.equal(first, a.next_batch())
    assert first.shape == (3, 10) and a.tokens_per_step == 30
    assert 0 <= int(first.min()) and int(first.max()) < 256


@pytest.mark.parametrize("suffix,dtype", [(".npy", np.int32), (".bin", np.uint16), (".i32", np.int32)])
def test_token_file_windows(tmp_path, suffix, dtype, seed):
    tokens = np.arange(1000) % 256
    path = tmp_path / f"tokens{suffix}"
    if suffix == ".npy":
        np.save(path, tokens.astype(dtype))
    else:
        tokens.astype(dtype).tofile(path)
    trainer = make_trainer(TrainSpec("mmfree", "tiny", batch=4, seq=12, token_file=str(path), seed=seed % 1000), "cpu")
    batch = trainer.next_batch()
    assert batch.shape == (4, 12) and batch.dtype == torch.int64
    diffs = (batch[:, 1:] - batch[:, :-1]) % 256
    assert bool((diffs == 1).all())  # contiguous windows of the file
    assert isinstance(trainer.step(), float)


def test_token_file_errors(tmp_path):
    big = tmp_path / "big.npy"
    np.save(big, np.full(100, 9999, dtype=np.int32))
    trainer = make_trainer(TrainSpec("mmfree", "tiny", batch=1, seq=8, token_file=str(big)), "cpu")
    with pytest.raises(UserError, match="outside the vocabulary"):
        trainer.next_batch()
    with pytest.raises(UserError, match="not found"):
        make_trainer(TrainSpec("mmfree", "tiny", token_file=str(tmp_path / "nope.bin")), "cpu")
    short = tmp_path / "short.bin"
    np.arange(5, dtype=np.uint16).tofile(short)
    with pytest.raises(UserError, match="fewer than seq"):
        make_trainer(TrainSpec("mmfree", "tiny", seq=8, token_file=str(short)), "cpu")


def test_bad_spec_is_a_user_error():
    with pytest.raises(UserError, match="precision"):
        make_trainer(TrainSpec("mmfree", "tiny", precision="fp8"), "cpu")
    with pytest.raises(UserError, match="size"):
        make_trainer(TrainSpec("mmfree", "7b"), "meta")


def test_model_flops_per_token():
    cfg = get_config("1.3b")
    d, layers, inter, vocab = cfg.hidden_size, cfg.num_layers, cfg.intermediate_size, cfg.vocab_size
    mm_matrices = layers * (4 * d * d + 3 * d * inter) + vocab * d  # projections + lm_head
    # block norms (2d), BitLinear norms (5d + inter), g_norm (d), lower bounds (d); final and lm_head norms
    mm_norms = layers * (2 * d + 5 * d + inter + d + d) + 2 * d
    assert model_flops_per_token(cfg, "mmfree", 2048) == 6 * (mm_matrices + mm_norms)
    tf_params = layers * (4 * d * d + 3 * d * inter + 2 * d) + vocab * d + d
    assert model_flops_per_token("1.3b", "transformer", 2048) == 6 * tf_params + 12 * layers * d * 2048
