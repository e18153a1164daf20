"""train-memory --shard fsdp: two CPU ranks (gloo) under torchrun, and the summary arithmetic."""

import json

import pandas as pd
import pytest

from mmprof.runners.fsdp_estimate import shard_bytes
from mmprof.runners.job_summary import merge_traces, summarize
from mmprof.workloads import build_model
from tests.runners.torchrun import torchrun

GIB = float(1 << 30)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "run"
    r = torchrun("-m", "mmprof", "train-memory", "--size", "tiny", "--shard", "fsdp", "--device", "cpu",
                 "--arch", "mmfree,transformer", "--bitlinear", "fused", "--batch", "2", "--seq", "32",
                 "--checkpointing", "none,layer", "--steps", "2", "--warmup", "1", "--min-window-s", "0",
                 "--idle-s", "0", "--format", "csv", "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r


def test_one_run_folder_with_rows_from_both_ranks(two_rank_run):
    out, r = two_rank_run
    assert sorted(p.name for p in out.parent.iterdir()) == ["run"]
    assert {"measurements.csv", "meta.json", "power_trace.csv", "phases.csv"} <= {p.name for p in out.iterdir()}
    assert r.stderr.count("run folder:") == 1                       # only rank 0 prints
    df = pd.read_csv(out / "measurements.csv", dtype={"rank": str})
    assert len(df) == 4 * 3 and set(df["status"]) == {"ok"}
    for _, g in df.groupby(["arch", "checkpointing"]):
        assert sorted(g["rank"]) == ["0", "1", "all"]
        assert list(g["row_kind"]) == ["rank", "rank", "summary"]
    ranks = df[df["row_kind"] == "rank"]
    assert set(ranks["device"]) == {"cpu"} and set(df["shard"]) == {"fsdp"} and set(df["world_size"]) == {2}
    assert json.loads((out / "meta.json").read_text())["end_utc"]


def test_summary_row_is_the_jobs(two_rank_run):
    out, _ = two_rank_run
    df = pd.read_csv(out / "measurements.csv", dtype={"rank": str})
    for _, g in df.groupby(["arch", "checkpointing"]):
        ranks, summary = g[g["row_kind"] == "rank"], g[g["row_kind"] == "summary"].iloc[0]
        assert summary["step_time_s"] == pytest.approx(ranks["step_time_s"].max(), rel=1e-5)
        assert summary["tokens_per_s"] == pytest.approx(2 * 2 * 32 / summary["step_time_s"], rel=1e-5)
        assert summary["param_gib"] == pytest.approx(ranks["param_gib"].max(), rel=1e-5)
        assert summary["host_rss_peak_gib"] == pytest.approx(ranks["host_rss_peak_gib"].sum(), rel=1e-5)
        assert (ranks["n_steps"] == summary["n_steps"]).all()        # every rank ran the same steps


def test_each_rank_holds_half_the_parameters(two_rank_run):
    out, _ = two_rank_run
    df = pd.read_csv(out / "measurements.csv", dtype={"rank": str})
    for arch in ("mmfree", "transformer"):
        params = list(build_model(arch, "tiny", device="meta").parameters())
        full = sum(-(-p.numel() * 4 // 512) * 512 for p in params)
        half = sum(shard_bytes(p, 2, 4) for p in params)
        got = df[(df["arch"] == arch) & (df["row_kind"] == "rank")]["param_gib"] * GIB
        assert (got.round() == half).all() and half < 0.6 * full
        optim = df[(df["arch"] == arch) & (df["row_kind"] == "rank")]["optim_gib"] * GIB
        assert (optim >= 2 * half).all()                                # exp_avg and exp_avg_sq shards


def test_summarize_takes_max_memory_and_sums_energy():
    spec = {"arch": "mmfree", "rank": "all", "row_kind": "summary"}
    rows = [
        {"peak_alloc_gib": 40.0, "step_time_s": 2.0, "energy_per_step_j": 800.0, "power_avg_w": 400.0,
         "power_peak_w": 600.0, "n_steps": 5, "energy_above_idle_per_step_j": 600.0},
        {"peak_alloc_gib": 42.0, "step_time_s": 2.1, "energy_per_step_j": 820.0, "power_avg_w": 390.0,
         "power_peak_w": 650.0, "n_steps": 5, "energy_above_idle_per_step_j": 610.0},
    ]
    s = summarize(rows, spec, tokens_per_rank_step=4096, flops=(1e9, 1000.0))
    assert s["status"] == "ok" and s["rank"] == "all" and s["row_kind"] == "summary"
    assert s["peak_alloc_gib"] == 42.0 and s["step_time_s"] == 2.1 and s["power_peak_w"] == 650.0
    assert s["energy_per_step_j"] == 1620.0 and s["power_avg_w"] == 790.0
    assert s["tokens_per_s"] == pytest.approx(2 * 4096 / 2.1)
    assert s["j_per_token"] == pytest.approx(1620.0 / (2 * 4096))
    assert s["j_per_token_above_idle"] == pytest.approx(1210.0 / (2 * 4096))
    assert s["mfu"] == pytest.approx(1e9 * s["tokens_per_s"] / (2 * 1000e12))


def test_summary_leaves_a_sum_empty_when_a_rank_lacks_it():
    rows = [{"step_time_s": 1.0, "energy_per_step_j": 10.0}, {"step_time_s": 1.0, "energy_per_step_j": None}]
    s = summarize(rows, {}, tokens_per_rank_step=8, flops=(1.0, None))
    assert s["energy_per_step_j"] is None and "j_per_token" not in s and "mfu" not in s


def test_merge_traces_interleaves_ranks(tmp_path):
    head = "t_s,gpu,power_w,mem_used_gib,gpu_util_pct,mem_util_pct,sm_clock_mhz,temp_c\n"
    r0 = head + "0.01,0,100,1,,,,\n0.03,0,110,1,,,,\n"
    r1 = head + "0.02,1,200,2,,,,\n"
    merge_traces(tmp_path / "power_trace.csv", [[r0, "label,t_start_s,t_end_s\nidle,0,1\n"], [r1, "x"]])
    trace = pd.read_csv(tmp_path / "power_trace.csv")
    assert list(trace["gpu"]) == [0, 1, 0] and list(trace["power_w"]) == [100, 200, 110]
    assert (tmp_path / "phases.csv").read_text().startswith("label,t_start_s,t_end_s\nidle")


def test_resume_under_torchrun_adds_only_the_missing_configurations(tmp_path):
    out = tmp_path / "run"
    args = ["-m", "mmprof", "train-memory", "--size", "tiny", "--shard", "fsdp", "--device", "cpu", "--arch", "mmfree",
            "--bitlinear", "fused", "--seq", "16", "--steps", "1", "--warmup", "1", "--min-window-s", "0",
            "--idle-s", "0", "--format", "csv"]
    r = torchrun(*args, "--batch", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    before = (out / "measurements.csv").read_text()
    r = torchrun(*args, "--batch", "1,2", "--resume", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    after = (out / "measurements.csv").read_text()
    assert after.startswith(before)
    df = pd.read_csv(out / "measurements.csv", dtype={"rank": str})
    assert list(zip(df["batch"], df["rank"])) == [(1, "0"), (1, "1"), (1, "all"), (2, "0"), (2, "1"), (2, "all")]
