import csv
import pandas as pd
import pytest

from tests.cli.helpers import assert_rejected_before_writing, invoke
from mmprof.profiler import Profiler
from mmprof.runners import decode_power as dp
from tests.profiler.fakes import ScriptedGpu




def test_decode_rows_and_trace_on_cpu(tmp_path):
    out = tmp_path / "run"
    r = invoke("decode-power", "--size", "tiny", "--device", "cpu", "--new-tokens", "8", "--prompt-len", "4",
               "--repeats", "2", "--min-window-s", "0", "--idle-s", "0", "--out", str(out))
    assert r.exit_code == 0, r.output
    df = pd.read_csv(out / "measurements.csv")
    assert sorted(df["arch"]) == ["mmfree", "transformer"] and set(df["status"]) == {"ok"}
    assert (df["n_tokens_measured"] == 2 * 7).all()     # 2 windows of one pass of the 7 decode steps
    assert (df["repeats"] == 2).all()
    assert (df["tokens_per_s"] > 0).all() and (df["latency_p50_ms"] > 0).all()
    assert (df["latency_p50_ms"] <= df["latency_p99_ms"]).all()
    assert (df["weights_gib"] > 0).all()
    assert df["energy_j"].isna().all()          # no NVML on this machine; the note says why
    assert df["note"].notna().all()
    trace = pd.read_csv(out / "power_trace.csv")
    assert list(trace.columns)[:3] == ["t_s", "gpu", "power_w"]
    phases = pd.read_csv(out / "phases.csv")
    assert phases["label"].str.startswith("prefill").any() and phases["label"].str.startswith("decode").any()


def test_short_window_is_extended_with_generations(tmp_path):
    spec = dp.DecodeSpec(sizes=("tiny",), archs=("transformer",), batch=1, prompt_len=2, new_tokens=3, repeats=1,
                         device="cpu", min_window_s=1.0, idle_s=0)
    rows = []
    dp.run(spec, rows.append)
    row = rows[0]
    assert row["status"] == "ok", row
    assert row["repeats"] == 1 and row["energy_window_s"] >= 1.0 and row["energy_window_min_s"] >= 1.0
    assert row["n_tokens_measured"] > 2 and row["n_tokens_measured"] % 2 == 0   # whole passes of 2 steps


def test_energy_per_token_from_scripted_power(tmp_path):
    gpu = ScriptedGpu(index=0, power_w=200.0)
    spec = dp.DecodeSpec(sizes=("tiny",), archs=("transformer",), prompt_len=2, new_tokens=6, repeats=3,
                         device="cpu", min_window_s=0.3, idle_s=0.1)
    with Profiler(device="cpu", gpu_source=gpu, idle_s=0.1, sample_hz=200) as prof:
        row = dp.measure(dp.configs(spec)[0], spec, prof, None)
    assert row["repeats"] == 3 and row["energy_window_min_s"] >= 0.3
    assert row["energy_j"] == pytest.approx(200.0 * row["energy_window_s"], rel=0.1)
    assert row["j_per_token_min"] <= row["j_per_token"] <= row["j_per_token_max"]
    assert row["power_avg_min_w"] <= row["power_avg_w"] <= row["power_avg_max_w"]
    assert row["power_avg_w"] == pytest.approx(200.0, rel=0.02)
    assert row["idle_power_w"] == pytest.approx(200.0, rel=0.02) and abs(row["idle_drift_w"]) < 2.0
    assert row["j_per_token_above_idle"] == pytest.approx(0.0, abs=0.05 * row["j_per_token"])
    # a 0.3 s window sees ~6 counter reads: too few updates, and the row says so (on a loaded machine a
    # window can run long enough for 20: then the flag must follow the count it shows)
    assert row["n_counter_updates"] is not None
    if row["n_counter_updates"] < 20:
        assert row["low_confidence"] == 1 and "counter updates < 20" in row["note"]


def test_decode_reads_the_counter_at_window_edges_only():
    gpu = ScriptedGpu(index=0, power_w=150.0)
    spec = dp.DecodeSpec(sizes=("tiny",), archs=("transformer",), prompt_len=2, new_tokens=3, repeats=2,
                         device="cpu", min_window_s=0.3, idle_s=0.05)
    with Profiler(device="cpu", gpu_source=gpu, idle_s=0.05, sample_hz=0) as prof:
        reads = gpu.energy_reads
        row = dp.measure(dp.configs(spec)[0], spec, prof, None)
    assert row["n_tokens_measured"] % 2 == 0 and row["repeats"] == 2
    # the peak-memory window, idle before and after, and the two energy windows: two reads each
    assert gpu.energy_reads - reads == 2 * (1 + 2 + 2)
    assert "counter updates not sampled" in row["note"]


def test_max_window_tokens_caps_a_window_and_flags_it():
    gpu = ScriptedGpu(index=0, power_w=150.0)
    spec = dp.DecodeSpec(sizes=("tiny",), archs=("mmfree",), prompt_len=2, new_tokens=3, repeats=1,
                         device="cpu", min_window_s=30.0, idle_s=0, max_window_tokens=6)   # 3 passes of 2 steps
    with Profiler(device="cpu", gpu_source=gpu, idle_s=0, sample_hz=100) as prof:
        row = dp.measure(dp.configs(spec)[0], spec, prof, None)
    assert row["n_tokens_measured"] == 6 and row["energy_window_s"] < 30.0
    assert row["low_confidence"] == 1 and "< 30 s" in row["note"]


@pytest.mark.parametrize("args, needle", [
    (["--graph", "--device", "cpu"], "--graph needs a CUDA device"),
    (["--size", "70b"], "size"),
    (["--batch", "0"], "--batch"),
    (["--new-tokens", "1"], "--new-tokens"),
    (["--arch", "gpt"], "unknown value"),
])
def test_decode_bad_input(tmp_path, args, needle):
    assert_rejected_before_writing(tmp_path, ["decode-power", "--size", "tiny", "--device", "cpu", *args], needle)


def test_plot_decode_power(tmp_path):
    out = tmp_path / "run"
    gpu_free = invoke("decode-power", "--size", "tiny", "--device", "cpu", "--new-tokens", "4", "--repeats", "1",
                      "--min-window-s", "0", "--idle-s", "0", "--out", str(out))
    assert gpu_free.exit_code == 0
    r = invoke("plot", str(out))
    assert r.exit_code == 2 and "no power samples" in r.output


def test_decode_packed_weights(tmp_path):
    out = tmp_path / "run"
    r = invoke("decode-power", "--size", "tiny", "--device", "cpu", "--weights", "packed", "--new-tokens", "4",
               "--repeats", "1", "--min-window-s", "0", "--idle-s", "0", "--format", "csv", "--out", str(out))
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((out / "measurements.csv").open()))
    by_arch = {row["arch"]: row for row in rows}
    assert by_arch["mmfree"]["weights"] == "packed" and by_arch["transformer"]["weights"] == "bf16"
    assert all(row["status"] == "ok" and row["cuda_graph"] == "0" for row in rows)
    packed = by_arch["mmfree"]
    # a step reads the packed weights but one embedding row, so less than all the weights held
    assert 0 < float(packed["bytes_per_step_gib"]) < float(packed["weights_gib"])


def test_rewind_windows_on_a_100ms_step_nvml(monkeypatch):
    """Windows of decode steps replayed back to back on NVML that moves in 100 ms steps and samples
    power part time: each window is long enough, spans >= 20 counter updates, agrees with its power
    integral, and runs no prefill (prefills do not grow with the number of passes)."""
    import time

    from mmprof.workloads.decode import GraphDecoder
    from tests.profiler.fakes import SteppedGpu

    prefills = []
    real_prefill = GraphDecoder.prefill
    monkeypatch.setattr(GraphDecoder, "prefill", lambda self, ids: prefills.append(1) or real_prefill(self, ids))
    gpu = SteppedGpu(lambda t: 300.0, time.monotonic)
    spec = dp.DecodeSpec(sizes=("tiny",), archs=("transformer",), prompt_len=3, new_tokens=5, repeats=2,
                         device="cpu", min_window_s=2.2, idle_s=0.2)
    with Profiler(device="cpu", gpu_source=gpu, idle_s=0.2, sample_hz=100, min_window_s=2.2) as prof:
        row = dp.measure(dp.configs(spec)[0], spec, prof, None)
    assert row["energy_window_min_s"] >= 2.2 and row["n_counter_updates"] >= 20
    assert abs(row["counter_integral_diff_pct"]) < 2.0 and row["low_confidence"] == 0, row["note"]
    assert row["n_tokens_measured"] % 4 == 0 and row["n_tokens_measured"] > 100 * 4   # many passes of 4 steps
    assert len(prefills) == 1 + spec.repeats + 1      # warm-up, timed generations, once before the windows
    assert row["power_avg_w"] == pytest.approx(300.0, rel=0.02)
    decode = [p for p in prof.phases if p.label.startswith("decode")]
    assert len(decode) == 2 and not any(p.label.startswith("prefill") and decode[0].t_start_s < p.t_start_s
                                        for p in prof.phases)


def test_decode_batch_list_gives_a_row_per_batch_and_resumes(tmp_path):
    out = tmp_path / "run"
    common = ("decode-power", "--size", "tiny", "--arch", "mmfree", "--device", "cpu", "--new-tokens", "3",
              "--prompt-len", "2", "--repeats", "1", "--min-window-s", "0", "--idle-s", "0")
    r = invoke(*common, "--batch", "1,3", "--out", str(out))
    assert r.exit_code == 0, r.output
    df = pd.read_csv(out / "measurements.csv")
    assert list(df["batch"]) == [1, 3] and set(df["status"]) == {"ok"}
    assert list(df["n_tokens_measured"]) == [2, 6]          # one pass of 2 decode steps per sequence
    # a resume with a longer list measures only the new batch
    r = invoke(*common, "--batch", "1,3,2", "--resume", str(out))
    assert r.exit_code == 0, r.output
    df = pd.read_csv(out / "measurements.csv")
    assert sorted(df["batch"]) == [1, 2, 3] and len(df) == 3


@pytest.mark.parametrize("batch", ["0", "1,,2", "2,2", "x"])
def test_decode_bad_batch_list(tmp_path, batch):
    assert_rejected_before_writing(tmp_path, ("decode-power", "--size", "tiny", "--device", "cpu", "--batch", batch),
                                   "--batch")
