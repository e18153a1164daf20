import csv

import pandas as pd
import pytest
import torch

from tests.cli.helpers import assert_one_line_exit_2, assert_rejected_before_writing, invoke
from mmprof.runners import train_memory as tm
from mmprof.workloads import build_model, get_config




def _rows(path):
    return pd.read_csv(path / "measurements.csv")




def test_meta_estimate_sweep_at_tiny(tmp_path):
    out = tmp_path / "run"
    r = invoke("train-memory", "--size", "tiny", "--device", "meta", "--batch", "1,2", "--seq", "32",
               "--out", str(out))
    assert r.exit_code == 0, r.output
    df = _rows(out)
    assert len(df) == 8 and set(df["status"]) == {"ok"}  # vanilla, ref-fused, fused, transformer x 2 batches
    assert set(df["bitlinear"].fillna("")) == {"vanilla", "ref-fused", "fused", ""}
    assert (df["estimated"] == 1).all() and df["step_time_s"].isna().all()
    assert df["note"].str.contains("estimated on fake tensors").all()
    # more batch, more activation memory
    for _, g in df.groupby(["arch", "bitlinear"], dropna=False):
        g = g.sort_values("batch")
        assert g["act_mem_gib"].is_monotonic_increasing and g["act_mem_gib"].iloc[0] > 0
    act = {impl: df[df["bitlinear"] == impl].set_index("batch")["act_mem_gib"] for impl in ("fused", "ref-fused",
                                                                                           "vanilla")}
    # at this tiny size the gradients can set the peak at batch 1, so the implementations may tie there
    assert (act["fused"] <= act["ref-fused"]).all() and (act["ref-fused"] <= act["vanilla"]).all()
    assert act["fused"][2] < act["ref-fused"][2] < act["vanilla"][2]
    for shown in ("paper: fused vs vanilla", "reference: ref-fused vs vanilla", "mmprof: fused vs vanilla"):
        assert shown in r.output


def test_estimated_state_bytes_equal_analytic_counts():
    """Parameters, gradients and AdamW state, as the CUDA allocator would hold them (512-byte blocks)."""
    cfg = get_config("tiny")
    spec = tm.TrainMemorySpec(size="tiny", seq=16, device="meta")
    gib = float(1 << 30)
    for arch in ("mmfree", "transformer"):
        params = list(build_model(arch, cfg, device="meta").parameters())
        fp32_bytes = sum(-(-p.numel() * 4 // 512) * 512 for p in params)
        row = tm.estimate(tm.Config(arch, "fused" if arch == "mmfree" else "", 2), spec)
        assert round(row["param_gib"] * gib) == fp32_bytes          # fp32 master weights
        assert round(row["grad_gib"] * gib) == fp32_bytes           # fp32 gradients
        # exp_avg and exp_avg_sq per parameter, plus one 4-byte `step` per parameter when it is counted
        assert round(row["optim_gib"] * gib) in (2 * fp32_bytes, 2 * fp32_bytes + 512 * len(params))


def test_cpu_sweep_measures_time(tmp_path):
    out = tmp_path / "run"
    r = invoke("train-memory", "--size", "tiny", "--device", "cpu", "--batch", "1", "--seq", "16",
               "--arch", "mmfree", "--bitlinear", "fused", "--steps", "2", "--warmup", "1",
               "--min-window-s", "0", "--idle-s", "0", "--out", str(out))
    assert r.exit_code == 0, r.output
    df = _rows(out)
    assert list(df["status"]) == ["ok"]
    assert df["step_time_s"].iloc[0] > 0 and df["tokens_per_s"].iloc[0] > 0
    assert df["estimated"].iloc[0] == 0


def test_oom_becomes_a_row_and_stops_that_implementation(tmp_path, monkeypatch):
    real = tm.make_trainer

    def fake_oom(tspec, device):
        if tspec.batch >= 2 and tspec.arch == "mmfree":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(tspec, device)

    monkeypatch.setattr(tm, "make_trainer", fake_oom)
    out = tmp_path / "run"
    r = invoke("train-memory", "--size", "tiny", "--device", "cpu", "--batch", "1,2,4", "--seq", "8",
               "--steps", "1", "--warmup", "1", "--min-window-s", "0", "--idle-s", "0", "--out", str(out))
    assert r.exit_code == 0, r.output
    df = _rows(out)
    mm = df[df["arch"] == "mmfree"]
    for impl in ("vanilla", "ref-fused", "fused"):
        got = mm[mm["bitlinear"] == impl].sort_values("batch")
        assert list(got["batch"]) == [1, 2] and list(got["status"]) == ["ok", "oom"]
        assert "out of memory" in got["note"].iloc[1]
    assert list(df[df["arch"] == "transformer"]["status"]) == ["ok", "ok", "ok"]


def test_resume_skips_finished_configurations(tmp_path):
    out = tmp_path / "run"
    args = ["--size", "tiny", "--device", "meta", "--seq", "8", "--arch", "mmfree"]
    assert invoke("train-memory", *args, "--batch", "1", "--out", str(out)).exit_code == 0
    before = (out / "measurements.csv").read_text()
    r = invoke("train-memory", *args, "--batch", "1,2", "--resume", str(out))
    assert r.exit_code == 0, r.output
    after = (out / "measurements.csv").read_text()
    assert after.startswith(before)
    rows = list(csv.DictReader(open(out / "measurements.csv")))
    assert sorted((r["bitlinear"], r["batch"]) for r in rows) == [
        ("fused", "1"), ("fused", "2"), ("ref-fused", "1"), ("ref-fused", "2"), ("vanilla", "1"), ("vanilla", "2")]


@pytest.mark.parametrize("args, needle", [
    (["--size", "7b"], "size"),
    (["--arch", "rwkv"], "unknown value 'rwkv'"),
    (["--bitlinear", "turbo"], "unknown value 'turbo'"),
    (["--batch", "0"], "--batch"),
    (["--batch", "1,,2"], "malformed list"),
    (["--batch", "x"], "--batch"),
    (["--seq", "0"], "--seq"),
    (["--seq", "-5"], "--seq"),
    (["--device", "tpu"], "unknown device"),
    pytest.param(["--device", "cuda"], "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")),
    (["--gpus", "a"], "--gpus"),
    (["--gpus", "7"], "GPU index 7 does not exist"),
    (["--format", "xml"], "unknown format"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, needle):
    assert_rejected_before_writing(tmp_path, ["train-memory", "--device", "meta", "--size", "tiny", *args], needle)


def test_existing_run_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    args = ["train-memory", "--size", "tiny", "--device", "meta", "--batch", "1", "--seq", "8", "--out", str(out)]
    assert invoke(*args).exit_code == 0
    before = (out / "measurements.csv").read_text()
    assert_one_line_exit_2(invoke(*args), "already exists")
    assert (out / "measurements.csv").read_text() == before


def test_plot_train_memory(tmp_path):
    out = tmp_path / "run"
    assert invoke("train-memory", "--size", "tiny", "--device", "meta", "--batch", "1,2", "--seq", "8",
                  "--out", str(out)).exit_code == 0
    r = invoke("plot", str(out), "--out", str(tmp_path / "fig.png"))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"


def test_set_breakdown_and_full_estimate_from_the_cli(tmp_path):
    args = ["train-memory", "--size", "tiny", "--device", "meta", "--seq", "32", "--batch", "1,2",
            "--arch", "mmfree", "--set", "layers=5", "--set", "hidden=96"]
    fast = invoke(*args, "--breakdown", "--out", str(tmp_path / "fast"))
    assert fast.exit_code == 0, fast.output
    assert "activations: BitLinear inputs" in fast.output and "bytes/token/layer" in fast.output
    full = invoke(*args, "--estimate", "full", "--out", str(tmp_path / "full"))
    assert full.exit_code == 0, full.output
    a = pd.read_csv(tmp_path / "fast" / "measurements.csv")
    b = pd.read_csv(tmp_path / "full" / "measurements.csv")
    assert len(a) == len(b) == 6      # vanilla, ref-fused, fused at batch 1 and 2
    assert ((a["peak_alloc_gib"] / b["peak_alloc_gib"] - 1).abs() < 5e-3).all()
    assert_one_line_exit_2(invoke(*args, "--set", "depth=3", "--out", str(tmp_path / "bad")), "--set")
