import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from mmprof.errors import UserError
from mmprof.results import RunWriter, done_keys, read_run, row_key
from mmprof.results import schema


def _rows(n, rng):
    return [
        dict(status="ok", arch="mmfree", size="tiny", bitlinear="fused", batch=b,
             peak_alloc_gib=float(rng.uniform(0.1, 90)), step_time_s=float(rng.uniform(0.01, 2)),
             tokens_per_s=float(rng.uniform(1e3, 1e5)))
        for b in range(1, n + 1)
    ]


def test_round_trip_keeps_rows_and_meta(tmp_path):
    import numpy as np
    rng = np.random.default_rng()
    rows = _rows(5, rng)
    w = RunWriter.create(tmp_path / "run", "train-memory", argv=["mmprof", "train-memory"],
                         extra_meta={"gpu": "TestGPU"})
    for r in rows:
        w.append(r)
    w.finish()
    run = read_run(tmp_path / "run")
    assert list(run.df.columns) == schema.columns("train-memory")
    assert len(run.df) == 5
    for got, want in zip(run.df.itertuples(), rows):
        assert got.batch == want["batch"]
        assert got.peak_alloc_gib == pytest.approx(want["peak_alloc_gib"], rel=1e-5)
        assert got.tokens_per_s == pytest.approx(want["tokens_per_s"], rel=1e-5)
    assert run.meta["gpu"] == "TestGPU"
    assert run.meta["argv"] == ["mmprof", "train-memory"]
    assert run.meta["end_utc"] is not None and run.meta["start_utc"] <= run.meta["end_utc"]


def test_existing_run_is_never_overwritten(tmp_path):
    w = RunWriter.create(tmp_path / "run", "train-memory")
    w.append({"status": "ok", "arch": "mmfree"})
    before = (tmp_path / "run" / "measurements.csv").read_bytes()
    with pytest.raises(UserError, match="already exists"):
        RunWriter.create(tmp_path / "run", "train-memory")
    assert (tmp_path / "run" / "measurements.csv").read_bytes() == before


def test_rejects_unknown_column_and_status(tmp_path):
    w = RunWriter.create(tmp_path / "run", "train-memory")
    with pytest.raises(ValueError, match="not in the train-memory schema"):
        w.append({"status": "ok", "watts": 3})
    with pytest.raises(ValueError, match="status"):
        w.append({"status": "fine"})


def test_resume_appends_and_reports_done_keys(tmp_path):
    w = RunWriter.create(tmp_path / "run", "train-memory")
    w.append({"status": "ok", "arch": "mmfree", "bitlinear": "fused", "batch": 1})
    w.append({"status": "oom", "arch": "mmfree", "bitlinear": "fused", "batch": 2})
    w.finish()                                   # releases the folder's lock
    keys = ["arch", "bitlinear", "batch"]
    w2 = RunWriter.resume(tmp_path / "run", "train-memory")
    w2.append({"status": "ok", "arch": "transformer", "batch": 1})
    run = read_run(tmp_path / "run")
    done = done_keys(run, keys)
    assert row_key({"arch": "mmfree", "bitlinear": "fused", "batch": 2}, keys) in done
    assert row_key({"arch": "transformer", "batch": 1}, keys) in done
    assert row_key({"arch": "mmfree", "bitlinear": "vanilla", "batch": 1}, keys) not in done
    with pytest.raises(UserError, match="written by"):
        RunWriter.resume(tmp_path / "run", "decode-power")


def test_missing_and_malformed_runs_raise_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such run"):
        read_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a run folder"):
        read_run(tmp_path / "empty")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="no 'status' column"):
        read_run(bad)
    bad.write_text('status,x\nok,"unterminated\n')
    with pytest.raises(UserError, match="malformed CSV"):
        read_run(bad)
    bad.write_text("status,x\nmaybe,1\n")
    with pytest.raises(UserError, match="unknown status"):
        read_run(bad)


def test_unwritable_out_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write run folder"):
        RunWriter.create(blocker / "run", "train-memory")


def test_sigkill_mid_run_keeps_finished_rows(tmp_path):
    run_dir = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import sys, time
        from mmprof.results import RunWriter
        w = RunWriter.create({str(run_dir)!r}, "train-memory")
        i = 0
        while True:
            i += 1
            w.append({{"status": "ok", "arch": "mmfree", "batch": i, "peak_alloc_gib": i * 1.25}})
            print(i, flush=True)
            time.sleep(0.02)
    """)
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    seen = 0
    deadline = time.time() + 60
    while seen < 5 and time.time() < deadline:
        line = proc.stdout.readline()
        if line.strip():
            seen = int(line)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = read_run(run_dir)
    assert len(run.df) >= seen >= 5
    assert list(run.df["batch"]) == list(range(1, len(run.df) + 1))
    assert (run.df["peak_alloc_gib"] == run.df["batch"] * 1.25).all()
    json.loads((run_dir / "meta.json").read_text())


def test_meta_names_the_source_that_measured(tmp_path):
    """meta.json carries a digest of the package source (it names the code where a copy's .git lags
    its files, as on a remote GPU box) and whether tracked files differ from HEAD."""
    from mmprof.results.store import source_sha256

    w = RunWriter.create(tmp_path / "run", "train-memory")
    w.finish()
    meta = read_run(tmp_path / "run").meta
    assert meta["source_sha256"] == source_sha256() and len(meta["source_sha256"]) == 64
    assert meta["git_dirty"] in (True, False, None)
    copy = tmp_path / "src" / "mmprof"
    copy.mkdir(parents=True)
    (copy / "a.py").write_text("x = 1\n")
    (copy / "notes.txt").write_text("not source")
    first = source_sha256(copy.parent)
    (copy / "notes.txt").write_text("changed, still not source")
    assert source_sha256(copy.parent) == first
    (copy / "a.py").write_text("x = 2\n")
    assert source_sha256(copy.parent) != first
    RunWriter.resume(tmp_path / "run", "train-memory").finish()
    assert read_run(tmp_path / "run").meta["resumed_sources_sha256"] == [source_sha256()]
