"""Rows written whole or not at all: torn final rows, cell validation, and the run folder's lock."""

import os

import pytest

from mmprof.errors import UserError
from mmprof.results import RunWriter, read_run
from mmprof.results.lock import RunLock
from tests.cli.helpers import assert_one_line_exit_2, invoke

ROWS = [{"status": "ok", "arch": "mmfree", "size": "tiny", "bitlinear": "fused", "batch": b, "seq": 8,
         "peak_alloc_gib": 0.00086689 * b, "act_mem_gib": 0.0004 * b, "note": "estimated"} for b in (1, 2, 3)]


def _run(tmp_path, rows=ROWS):
    w = RunWriter.create(tmp_path / "run", "train-memory")
    for r in rows:
        w.append(r)
    w.finish()
    return tmp_path / "run", tmp_path / "run" / "measurements.csv"


def _cut_last_row(csv_path, keep_chars: int) -> None:
    """Leave only the first `keep_chars` characters of the last row, no newline: a crash mid-write."""
    data = csv_path.read_bytes()
    start = data.rstrip(b"\r\n").rfind(b"\n") + 1
    csv_path.write_bytes(data[:start + keep_chars])


def test_rows_end_with_a_newline_and_read_back_whole(tmp_path):
    run_dir, csv_path = _run(tmp_path)
    assert csv_path.read_bytes().endswith(b"\r\n")
    run = read_run(run_dir)
    assert run.torn is None and list(run.df["batch"]) == [1, 2, 3]


@pytest.mark.parametrize("keep", [1, 30, 60])
def test_a_final_line_without_newline_is_torn_and_skipped(tmp_path, keep):
    run_dir, csv_path = _run(tmp_path)
    _cut_last_row(csv_path, keep)
    run = read_run(run_dir)
    assert list(run.df["batch"]) == [1, 2]
    assert run.torn.line == 4 and "no newline" in run.torn.reason
    assert "line 4 is a torn row" in run.torn_notice()


def test_a_final_line_with_too_few_fields_is_torn(tmp_path):
    run_dir, csv_path = _run(tmp_path)
    with open(csv_path, "ab") as f:
        f.write(b"ok,mmfree,tiny\r\n")
    run = read_run(run_dir)
    assert len(run.df) == 3 and "3 fields, the header has" in run.torn.reason


def test_report_and_export_skip_the_torn_row_with_one_line(tmp_path):
    run_dir, csv_path = _run(tmp_path)
    _cut_last_row(csv_path, 60)           # batch 3's row cut inside its peak_alloc_gib
    r = invoke("report", str(run_dir), "--format", "csv")
    assert r.exit_code == 0, r.output
    warnings = [ln for ln in r.output.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "torn row" in warnings[0] and "skipped" in warnings[0]
    body = [ln for ln in r.output.splitlines() if ln.startswith("ok,")]
    assert len(body) == 2
    out = tmp_path / "paper.csv"
    r = invoke("export", str(run_dir), "--csv", str(out))
    assert r.exit_code == 0 and "wrote 2 rows" in r.output and "torn row" in r.output
    assert len(out.read_text().splitlines()) == 3


def test_resume_cuts_the_torn_row_off_and_appends_on_a_fresh_line(tmp_path):
    run_dir, csv_path = _run(tmp_path)
    _cut_last_row(csv_path, 40)
    w = RunWriter.resume(run_dir, "train-memory")
    assert len(w.notices) == 1 and "removed" in w.notices[0] and "measured again" in w.notices[0]
    assert list(w.resumed.df["batch"]) == [1, 2]
    w.append(ROWS[2])
    w.finish()
    run = read_run(run_dir)
    assert run.torn is None and list(run.df["batch"]) == [1, 2, 3]
    assert run.df["peak_alloc_gib"].iloc[2] == pytest.approx(0.00086689 * 3, rel=1e-5)


@pytest.mark.parametrize("column, value, what", [
    ("batch", "x", "an integer"),
    ("batch", "1.5", "an integer"),
    ("peak_alloc_gib", "12 GiB", "a finite number"),
    ("peak_alloc_gib", "inf", "a finite number"),
    ("estimated", "2", "0 or 1"),
    ("rank", "first", "an integer or 'all'"),
])
def test_malformed_cells_name_file_line_and_column(tmp_path, column, value, what):
    rows = [dict(ROWS[0]), dict(ROWS[1], **{column: value}), dict(ROWS[2])]
    w = RunWriter.create(tmp_path / "run", "train-memory")
    for r in rows:
        w.append(r)
    w.finish()
    with pytest.raises(UserError) as e:
        read_run(tmp_path / "run")
    msg = str(e.value)
    assert "measurements.csv" in msg and "line 3" in msg and f"column {column!r}" in msg and what in msg


def test_plot_and_resume_refuse_non_numeric_rows_before_measuring(tmp_path):
    w = RunWriter.create(tmp_path / "run", "train-memory")
    w.append(dict(ROWS[0], batch="big", peak_alloc_gib="lots"))
    w.finish()
    assert_one_line_exit_2(invoke("plot", str(tmp_path / "run")), "line 2, column 'batch'")
    before = (tmp_path / "run" / "measurements.csv").read_bytes()
    r = invoke("train-memory", "--size", "tiny", "--device", "meta", "--seq", "8", "--resume", str(tmp_path / "run"))
    assert_one_line_exit_2(r, "line 2, column 'batch'")
    assert (tmp_path / "run" / "measurements.csv").read_bytes() == before


def test_a_row_with_the_wrong_width_inside_the_file_is_an_error(tmp_path):
    run_dir, csv_path = _run(tmp_path)
    lines = csv_path.read_bytes().split(b"\r\n")
    lines[2] = b"ok,mmfree"
    csv_path.write_bytes(b"\r\n".join(lines))
    with pytest.raises(UserError, match="line 3 has 2 fields"):
        read_run(run_dir)


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    run_dir, _ = _run(tmp_path)
    first = RunWriter.resume(run_dir, "train-memory")
    with pytest.raises(UserError, match=f"being written by another mmprof \\(pid {os.getpid()}\\)"):
        RunWriter.resume(run_dir, "train-memory")
    first.close()
    RunWriter.resume(run_dir, "train-memory").close()      # released: the next one gets it


def test_cli_resume_of_a_locked_folder_is_one_line_exit_2(tmp_path):
    run_dir, csv_path = _run(tmp_path)
    before = csv_path.read_bytes()
    lock = RunLock.acquire(run_dir)
    try:
        r = invoke("train-memory", "--size", "tiny", "--device", "meta", "--seq", "8", "--resume", str(run_dir))
        assert_one_line_exit_2(r, f"pid {os.getpid()}")
    finally:
        lock.release()
    assert csv_path.read_bytes() == before


def test_sigkill_while_a_row_is_half_written_then_resume(tmp_path):
    """A sweep killed with half a row on disk: readers skip it, a concurrent resume is refused while
    the sweep holds the folder, and --resume cuts the half row off and measures it again."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = ["train-memory", "--size", "tiny", "--device", "meta", "--seq", "8", "--arch", "transformer",
            "--batch", "1,2"]
    env = dict(os.environ, MMPROF_TEST_TEAR_ROW_S="120",
               PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "mmprof", *args, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    csv_path = out / "measurements.csv"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            data = csv_path.read_bytes() if csv_path.exists() else b""
            if data.count(b"\n") >= 1 and not data.endswith(b"\n"):
                break                                   # the first row is half on disk, the writer asleep
            time.sleep(0.2)
        else:
            pytest.fail(f"the sweep never paused mid-row: {proc.stderr.read().decode()[-500:]}")
        r = invoke(*args, "--resume", str(out))
        assert_one_line_exit_2(r, f"pid {proc.pid}")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run = read_run(out)
    assert len(run.df) == 0 and run.torn is not None and run.torn.line == 2
    r = invoke(*args, "--resume", str(out), "--format", "csv")
    assert r.exit_code == 0, r.output
    assert "note:" in r.output and "line 2 is a torn row" in r.output and "measured again" in r.output
    run = read_run(out)
    assert run.torn is None and list(run.df["batch"]) == [1, 2] and set(run.df["status"]) == {"ok"}
    assert csv_path.read_bytes().endswith(b"\r\n")


def test_plot_checks_the_power_trace_cells(tmp_path):
    w = RunWriter.create(tmp_path / "run", "decode-power")
    w.append({"status": "ok", "arch": "mmfree", "size": "tiny", "batch": 1})
    w.finish()
    (tmp_path / "run" / "power_trace.csv").write_text("t_s,gpu,power_w\n0.0,0,100.5\n0.01,0,high\n")
    assert_one_line_exit_2(invoke("plot", str(tmp_path / "run")), "power_trace.csv: line 3, column 'power_w'")


def test_the_lock_file_goes_with_the_writer(tmp_path):
    run_dir, _ = _run(tmp_path)
    assert not (run_dir / ".lock").exists()
    w = RunWriter.resume(run_dir, "train-memory")
    assert (run_dir / ".lock").read_text().strip() == str(os.getpid())
    w.finish()
    assert not (run_dir / ".lock").exists()
