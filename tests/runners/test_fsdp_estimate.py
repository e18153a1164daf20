"""The no-GPU estimate of one FSDP2 rank (--device meta --shard fsdp --world-size N)."""

import pandas as pd
import pytest

from mmprof.runners import train_memory as tm
from mmprof.runners.fsdp_estimate import shard_bytes, sharded_state
from mmprof.workloads import build_model
from tests.cli.helpers import invoke

GIB = float(1 << 30)


def test_shard_bytes_pad_dim0_and_round_to_blocks():
    import torch

    w = torch.empty(5, 7, device="meta")
    assert shard_bytes(w, 2, 4) == 512                        # ceil(5/2)=3 rows * 7 * 4 B = 84 B -> one block
    big = torch.empty(32000, 5120, device="meta")
    assert shard_bytes(big, 4, 4) == 8000 * 5120 * 4
    assert shard_bytes(torch.empty(3, 1024, device="meta"), 4, 4) == 1024 * 4   # one row each, last rank padding


@pytest.mark.parametrize("arch, impl", [("mmfree", "fused"), ("transformer", "")])
def test_sharded_estimate_at_13b_on_meta(tmp_path, arch, impl):
    rows = {}
    for n in (2, 4):
        out = tmp_path / f"n{n}"
        r = invoke("train-memory", "--size", "13b", "--device", "meta", "--shard", "fsdp", "--world-size", str(n),
                   "--arch", arch, "--bitlinear", impl or "fused", "--batch", "1", "--seq", "2048", "--out", str(out))
        assert r.exit_code == 0, r.output
        df = pd.read_csv(out / "measurements.csv", dtype={"rank": str})
        assert len(df) == 1
        rows[n] = row = df.iloc[0]
        assert row["status"] == "ok" and row["rank"] == "all" and row["row_kind"] == "summary"
        assert row["shard"] == "fsdp" and row["world_size"] == n and row["estimated"] == 1
        assert "per-rank FSDP2 estimate" in row["note"]
        full = sum(p.numel() * 4 for p in build_model(arch, "13b", device="meta").parameters()) / GIB
        assert row["param_gib"] == pytest.approx(full / n, rel=0.01)     # fp32 master shards
        assert row["grad_gib"] == row["param_gib"]
        assert row["optim_gib"] == pytest.approx(2 * row["param_gib"], rel=0.01)
        persistent = row["param_gib"] + row["optim_gib"]
        assert row["peak_alloc_gib"] >= persistent + row["grad_gib"]     # at least the optimizer step's
        assert row["act_mem_gib"] == pytest.approx(row["peak_alloc_gib"] - persistent, rel=1e-4)
    assert rows[4]["peak_alloc_gib"] < 0.6 * rows[2]["peak_alloc_gib"]
    # 13b does not train on one GPU: about 208 GB of fp32 weights, gradients and AdamW state alone
    assert 4 * rows[2]["param_gib"] * 2 * GIB > 200e9


def test_sharded_state_matches_the_model_parameters():
    """sharded_state counts one block's shards once per layer: the whole model's, exactly."""
    spec = tm.TrainMemorySpec(size="tiny", seq=16, device="meta", shard="fsdp", world_size=3)
    for arch in ("mmfree", "transformer"):
        st = sharded_state(arch, "tiny", "fused", "bf16-autocast", 3)
        params = list(build_model(arch, "tiny", device="meta").parameters())
        assert st["param"] == sum(shard_bytes(p, 3, 4) for p in params)
        assert st["optim"] == 2 * st["param"] + len(params) * 512
    st = sharded_state("mmfree", "tiny", "fused", "bf16-autocast", 3)
    row = tm.estimate(tm.Config("mmfree", "fused", 2), spec)
    assert round(row["param_gib"] * GIB) == st["param"] and round(row["optim_gib"] * GIB) == st["optim"]


def test_checkpointing_lowers_the_estimated_activations(tmp_path):
    out = tmp_path / "run"
    r = invoke("train-memory", "--size", "tiny", "--device", "meta", "--shard", "fsdp", "--world-size", "2",
               "--arch", "transformer", "--batch", "8", "--seq", "256", "--checkpointing", "none,layer",
               "--out", str(out))
    assert r.exit_code == 0, r.output
    df = pd.read_csv(out / "measurements.csv").set_index("checkpointing")
    assert df.loc["layer", "act_mem_gib"] < df.loc["none", "act_mem_gib"]


SHARDED_CASES = [  # (arch, impl, layers, hidden, seq, batch, world, checkpointing)
    ("mmfree", "fused", 6, 64, 32, 1, 2, "none"),
    ("mmfree", "fused", 7, 96, 48, 3, 8, "none"),
    ("mmfree", "ref-fused", 5, 64, 32, 2, 4, "layer"),
    ("mmfree", "vanilla", 2, 64, 16, 4, 3, "none"),      # fewer blocks than the fast path traces
    ("transformer", "", 6, 64, 32, 3, 2, "none"),
    ("transformer", "", 5, 128, 64, 2, 8, "layer"),
    ("transformer", "", 9, 64, 16, 5, 4, "none"),
]


@pytest.mark.parametrize("arch,impl,layers,hidden,seq,batch,world,ckpt", SHARDED_CASES,
                         ids=[f"{a}-{i or 'tpp'}-L{n}-d{h}-s{s}-b{b}-N{w}-{c}" for a, i, n, h, s, b, w, c in SHARDED_CASES])
def test_fast_sharded_estimate_within_half_a_percent_of_full_trace(arch, impl, layers, hidden, seq, batch, world, ckpt):
    """The per-rank FSDP2 estimate composed from three traced blocks (the default) against the whole
    forward and backward traced (--estimate full), at several shapes, batches, world sizes and
    checkpointing settings."""
    overrides = (("layers", layers), ("hidden", hidden), ("intermediate", 3 * hidden), ("heads", 4), ("vocab", 256))
    spec = tm.TrainMemorySpec(size="tiny", seq=seq, device="meta", shard="fsdp", world_size=world,
                              checkpointings=(ckpt,), overrides=overrides)
    cfg = tm.Config(arch, impl, batch, ckpt)
    fast, full = tm.estimate(cfg, spec), tm.full_trace(cfg, spec)
    for col in ("peak_alloc_gib", "act_mem_gib", "param_gib", "optim_gib"):
        assert fast[col] == pytest.approx(full[col], rel=5e-3), col
    assert fast["note"].split(";")[1] == full["note"].split(";")[1]        # the peak's stage


def test_fast_sharded_estimate_is_linear_in_batch_and_grows_with_depth():
    """Batch and depth the fast path composes, not traces: the forward/backward term beyond the shards
    grows with both."""
    def row(layers, batch, world=4):
        overrides = (("layers", layers), ("hidden", 64), ("intermediate", 192), ("heads", 4), ("vocab", 256))
        spec = tm.TrainMemorySpec(size="tiny", seq=32, device="meta", shard="fsdp", world_size=world,
                                  overrides=overrides)
        return tm.estimate(tm.Config("mmfree", "fused", batch), spec)

    assert row(8, 4)["act_mem_gib"] > row(8, 2)["act_mem_gib"] > row(8, 1)["act_mem_gib"]
    assert row(12, 2)["act_mem_gib"] > row(6, 2)["act_mem_gib"]


@pytest.mark.parametrize("batch,seq", [(1, 8), (6, 64)])
def test_sharded_breakdown_adds_up_to_the_per_rank_peak(batch, seq):
    """--breakdown of a per-rank estimate: parts none negative, adding up to the peak, whether it falls
    at the end of backward (short sequences), in the backward through the blocks (mmfree) or at the
    end of forward (Transformer++, longer ones)."""
    overrides = (("layers", 4), ("hidden", 64), ("intermediate", 192), ("heads", 4), ("vocab", 256))
    spec = tm.TrainMemorySpec(size="tiny", seq=seq, device="meta", shard="fsdp", world_size=4,
                              overrides=overrides, breakdown=True)
    for cfg in (tm.Config("mmfree", "fused", batch), tm.Config("transformer", "", batch)):
        row = tm.estimate(cfg, spec)
        parts = row["_breakdown"]
        assert all(b >= 0 for b, _ in parts.values()), parts
        assert sum(b for b, _ in parts.values()) == round(row["peak_alloc_gib"] * GIB)
        assert parts["parameter shards"][0] == round(row["param_gib"] * GIB)
        assert parts["gradient shards"][0] <= parts["parameter shards"][0]
