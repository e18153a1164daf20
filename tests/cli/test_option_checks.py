"""Every option's range and meaning checked before anything is measured (issue 28)."""

import json

import pytest

from mmprof.profiler.host import HostSource
from mmprof.results import read_run
from mmprof.profiler.measurement import Measurement
from mmprof.results.render import to_csv, to_table
from mmprof.runners import options
from mmprof.workloads import PRESETS, build_model
from tests.cli.helpers import assert_one_line_exit_2, assert_rejected_before_writing, invoke

TRAIN = ["train-memory", "--size", "tiny", "--seq", "8", "--arch", "transformer"]
DECODE = ["decode-power", "--size", "tiny", "--new-tokens", "4"]


@pytest.mark.parametrize("args, needle", [
    (["--device", "meta", "--min-window-s", "nan"], "'nan' is not a finite number"),
    (["--device", "meta", "--idle-s", "inf"], "--idle-s"),
    (["--device", "meta", "--peak-tflops", "nan"], "not a finite number"),
    (["--device", "meta", "--batch", "1,2,1"], "--batch: '1' is given twice"),
    (["--device", "meta", "--batch", ",".join(map(str, range(1, 10001)))], "a sweep takes at most 64"),
    (["--device", "meta", "--arch", "mmfree,mmfree"], "given twice"),
    (["--device", "meta", "--estimate"], "--estimate"),
    (["--device", "meta", "--steps", "1000000000"], "--steps"),
    (["--device", "meta", "--seq", str(10**17)], "past what torch can index"),
    (["--device", "cpu", "--seq", str(10**12)], "this host's RAM is"),
    (["--device", "cpu", "--batch", str(10**9)], "needs at least"),
])
def test_train_options_refused_up_front(tmp_path, args, needle):
    assert_rejected_before_writing(tmp_path, [*TRAIN, *args], needle)


@pytest.mark.parametrize("args, needle", [
    (["--device", "meta"], "decode-power does not run on meta"),
    (["--device", "cpu", "--batch", str(10**7)], "this host's RAM is"),
    (["--device", "cpu", "--min-window-s", "nan"], "not a finite number"),
    (["--device", "cpu", "--repeats", "10000000"], "--repeats"),
    (["--device", "cpu", "--size", "tiny,tiny"], "given twice"),
])
def test_decode_options_refused_up_front(tmp_path, args, needle):
    assert_rejected_before_writing(tmp_path, [*DECODE, *args], needle)


@pytest.mark.parametrize("flag", ["--out", "--resume"])
def test_empty_paths_are_refused(tmp_path, monkeypatch, flag):
    monkeypatch.chdir(tmp_path)
    assert_one_line_exit_2(invoke(*TRAIN, "--device", "meta", flag, ""), f"--{flag[2:]}: empty path")
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("value", ["abc", "nan", "-1", "0"])
def test_dist_timeout_is_parsed_up_front(tmp_path, monkeypatch, value):
    monkeypatch.setenv("MMPROF_DIST_TIMEOUT_S", value)
    assert_rejected_before_writing(tmp_path, [*TRAIN, "--device", "meta"], "MMPROF_DIST_TIMEOUT_S")


def test_lower_bounds_stay_below_the_real_figures():
    for size in PRESETS:
        for arch in ("mmfree", "transformer"):
            assert options.min_params(size) <= build_model(arch, size, device="meta").num_params()


def test_resume_refuses_options_that_contradict_the_folder(tmp_path):
    out = tmp_path / "run"
    args = [*TRAIN, "--device", "meta", "--batch", "1"]
    assert invoke(*args, "--out", str(out)).exit_code == 0
    spec = json.loads((out / "meta.json").read_text())["spec"]
    assert spec["size"] == "tiny" and spec["seq"] == 8 and spec["device"] == "meta"
    before = (out / "measurements.csv").read_bytes()
    for change, needle in ((["--size", "370m"], "--size 370m contradicts the run's tiny"),
                           (["--seq", "16"], "--seq 16 contradicts the run's 8"),
                           (["--device", "cpu"], "--device cpu contradicts the run's meta"),
                           (["--precision", "fp32"], "--precision fp32")):
        r = invoke(*args, *change, "--resume", str(out))
        assert_one_line_exit_2(r, needle)
    # a folder from before meta.json kept the spec: its rows are the reference
    meta = json.loads((out / "meta.json").read_text())
    del meta["spec"]
    (out / "meta.json").write_text(json.dumps(meta))
    assert_one_line_exit_2(invoke(*args, "--seq", "16", "--resume", str(out)), "rows (seq=8)")
    assert (out / "measurements.csv").read_bytes() == before
    r = invoke(*args, "--batch", "1,2", "--resume", str(out))      # the sweep lists may grow
    assert r.exit_code == 0, r.output


def test_an_estimate_above_every_device_is_a_row_naming_the_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(options, "LARGEST_DEVICE_BYTES", 1000)      # tiny's estimate is above 1000 bytes
    out = tmp_path / "run"
    r = invoke(*TRAIN, "--device", "meta", "--batch", "1", "--out", str(out), "--format", "csv")
    assert r.exit_code == 0, r.output
    assert "fits no single device" in (out / "measurements.csv").read_text()
    monkeypatch.undo()
    assert options.fit_note(1.0) == "" and "fits no single device (the largest hold 268.2 GiB" in options.fit_note(300.0)


def test_interrupt_names_the_resume_command(tmp_path, monkeypatch):
    from mmprof.runners import train_memory as tm

    def interrupted(spec, emit, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(tm, "run", interrupted)
    out = tmp_path / "run"
    r = invoke(*TRAIN, "--device", "meta", "--batch", "1", "--out", str(out))
    assert_one_line_exit_2(r, f"--resume {out}")
    r = invoke(*TRAIN, "--device", "meta", "--batch", "1", "--resume", str(out))   # the lock was released
    assert "being written" not in r.output


def test_low_confidence_is_empty_without_power_readings():
    assert Measurement(name="w", duration_s=5.0).row()["low_confidence"] is None
    assert Measurement(name="w", duration_s=0.1, energy_j=3.0).row()["low_confidence"] == 1


def test_rapl_reason_on_linux_does_not_say_not_linux(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.platform", "linux")
    reason = HostSource(powercap_root=tmp_path / "none").rapl_reason
    assert "not Linux" not in reason and "exposes no RAPL" in reason


def test_terminal_table_shortens_notes_and_csv_keeps_them():
    import pandas as pd

    note = "x" * 40 + " " + "y" * 200
    df = pd.DataFrame([{"status": "ok", "arch": "mmfree", "note": note}] * 6)
    table = to_table(df)
    assert len(table.splitlines()) < 20 and "full text is in the CSV" in table and "y" * 100 not in table
    assert note in to_csv(df)


def test_a_batch_past_the_device_is_an_oom_row_naming_the_bound(tmp_path):
    out = tmp_path / "run"
    r = invoke(*TRAIN, "--device", "cpu", "--batch", f"1,{10**8}", "--steps", "1", "--warmup", "1",
               "--idle-s", "0", "--min-window-s", "0", "--out", str(out), "--format", "csv")
    assert r.exit_code == 0, r.output
    run = read_run(out)
    assert list(run.df["status"]) == ["ok", "oom"]
    assert "not run" in run.df["note"].iloc[1] and "this host's RAM is" in run.df["note"].iloc[1]
