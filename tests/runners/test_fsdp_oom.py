"""An out-of-memory error on one rank: one oom row for the whole job, and no rank left hanging."""

import time

import pandas as pd

from tests.runners.torchrun import torchrun

ARGS = ["train-memory", "--size", "tiny", "--shard", "fsdp", "--device", "cpu", "--arch", "mmfree,transformer",
        "--bitlinear", "fused", "--batch", "1,2,4", "--seq", "16", "--steps", "2", "--warmup", "1",
        "--min-window-s", "0", "--idle-s", "0", "--format", "csv"]


def _run(tmp_path, where: str, timeout_s: int):
    out = tmp_path / "run"
    t0 = time.monotonic()
    r = torchrun("tests/runners/fsdp_fault_driver.py", where, "2", "--", *ARGS, "--out", str(out),
                 env={"MMPROF_DIST_TIMEOUT_S": str(timeout_s)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return pd.read_csv(out / "measurements.csv", dtype={"rank": str}), time.monotonic() - t0


def test_oom_before_any_collective_is_one_row_and_the_sweep_goes_on(tmp_path):
    df, _ = _run(tmp_path, "build", 60)
    mm = df[df["arch"] == "mmfree"]
    assert list(zip(mm["batch"], mm["rank"], mm["status"])) == [
        (1, "0", "ok"), (1, "1", "ok"), (1, "all", "ok"), (2, "all", "oom")]     # batch 4 not tried after the oom
    oom = mm.iloc[-1]
    assert oom["row_kind"] == "summary" and "rank 1: OutOfMemoryError" in oom["note"]
    assert "rank 0" not in oom["note"] and "job ended" not in oom["note"]
    tr = df[df["arch"] == "transformer"]
    assert len(tr) == 9 and set(tr["status"]) == {"ok"}                         # the job went on


def test_oom_mid_step_ends_the_job_cleanly(tmp_path):
    df, took = _run(tmp_path, "step", 8)
    assert list(zip(df["arch"], df["batch"], df["rank"], df["status"])) == [
        ("mmfree", 1, "0", "ok"), ("mmfree", 1, "1", "ok"), ("mmfree", 1, "all", "ok"),
        ("mmfree", 2, "all", "oom")]                                            # then the job ended
    note = df.iloc[-1]["note"]
    assert "rank 1: OutOfMemoryError" in note and "rank 0: left waiting in a collective for a failed rank" in note
    assert "job ended here" in note
    assert took < 60                                                            # the 8 s collective timeout, not a hang
