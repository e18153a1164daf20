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
    spec = tm.TrainMemorySpec(size="tiny", seq=16, device="meta", shard="fsdp", world_size=3)
    st = sharded_state("mmfree", "tiny", "fused", "bf16-autocast", 3)
    params = list(build_model("mmfree", "tiny", device="meta").parameters())
    assert st["param"] == sum(shard_bytes(p, 3, 4) for p in params)
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
