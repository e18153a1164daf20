"""decode-power --shard replicate: two CPU replicas under torchrun, one run folder, a summed summary."""

import pandas as pd
import pytest

from mmprof.runners.job_summary import summarize_decode
from tests.runners.torchrun import torchrun


def test_two_replicas_decode_side_by_side(tmp_path):
    out = tmp_path / "run"
    r = torchrun("-m", "mmprof", "decode-power", "--size", "tiny", "--shard", "replicate", "--device", "cpu",
                 "--new-tokens", "8", "--repeats", "1", "--min-window-s", "0", "--idle-s", "0", "--format", "csv",
                 "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and r.stderr.count("run folder:") == 1
    df = pd.read_csv(out / "measurements.csv", dtype={"rank": str})
    assert set(df["status"]) == {"ok"} and set(df["shard"]) == {"replicate"} and set(df["world_size"]) == {2}
    for _, g in df.groupby("arch"):
        assert list(g["rank"]) == ["0", "1", "all"] and list(g["row_kind"]) == ["rank", "rank", "summary"]
        ranks, summary = g.iloc[:2], g.iloc[2]
        assert summary["n_tokens_measured"] == ranks["n_tokens_measured"].sum() == 2 * 7   # one pass of new_tokens - 1 = 7 decode steps each
        assert summary["tokens_per_s"] == pytest.approx(ranks["tokens_per_s"].sum(), rel=1e-5)
        assert summary["latency_p50_ms"] == pytest.approx(ranks["latency_p50_ms"].max(), rel=1e-5)


def test_decode_summary_energy_per_token_is_the_jobs():
    rows = [{"tokens_per_s": 100.0, "n_tokens_measured": 500, "energy_j": 50.0, "energy_above_idle_j": 20.0,
             "power_avg_w": 300.0, "bandwidth_gbps": 2000.0, "latency_p50_ms": 10.0},
            {"tokens_per_s": 90.0, "n_tokens_measured": 450, "energy_j": 45.0, "energy_above_idle_j": 19.0,
             "power_avg_w": 280.0, "bandwidth_gbps": 1800.0, "latency_p50_ms": 11.0}]
    s = summarize_decode(rows, {"rank": "all"}, copy_gbps=4000.0)
    assert s["tokens_per_s"] == 190.0 and s["n_tokens_measured"] == 950 and s["power_avg_w"] == 580.0
    assert s["j_per_token"] == pytest.approx(95.0 / 950) and s["j_per_token_above_idle"] == pytest.approx(39.0 / 950)
    assert s["latency_p50_ms"] == 11.0 and s["bandwidth_frac"] == pytest.approx(3800.0 / 8000.0)
