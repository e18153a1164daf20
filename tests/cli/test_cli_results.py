import csv
import json

import numpy as np
import pytest

from tests.cli.helpers import assert_one_line_exit_2, invoke
from mmprof.results import RunWriter




@pytest.fixture
def run_dir(tmp_path):
    rng = np.random.default_rng()
    w = RunWriter.create(tmp_path / "run", "train-memory", extra_meta={"gpu": "G", "driver": "1"})
    for impl in ("fused", "vanilla"):
        w.append(dict(status="ok", arch="mmfree", size="tiny", bitlinear=impl, batch=4,
                      peak_alloc_gib=float(rng.uniform(1, 9)), tokens_per_s=float(rng.uniform(100, 900))))
    w.finish()
    return tmp_path / "run"




def test_report_formats(run_dir):
    stored = list(csv.DictReader(open(run_dir / "measurements.csv")))
    for fmt in ("table", "csv", "json", "markdown", "latex"):
        r = invoke("report", str(run_dir), "--baseline", "bitlinear=vanilla", "--format", fmt)
        assert r.exit_code == 0, r.output
        for rec in stored:
            assert rec["peak_alloc_gib"] in r.output
    data = json.loads(invoke("report", str(run_dir), "--format", "json").output)
    assert [d["tokens_per_s"] for d in data] == [s["tokens_per_s"] for s in stored]


def test_report_errors(run_dir, tmp_path):
    assert_one_line_exit_2(invoke("report", str(tmp_path / "missing")), "no such run")
    assert_one_line_exit_2(invoke("report", str(run_dir), "--format", "yaml"), "unknown format")
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n1,2\n")
    assert_one_line_exit_2(invoke("report", str(bad)), "malformed CSV")
    assert_one_line_exit_2(invoke("report", str(run_dir), "--baseline", "oops"), "COLUMN=VALUE")
    assert_one_line_exit_2(invoke("report"), "Missing argument")
    assert_one_line_exit_2(invoke("report", str(run_dir), "--bogus"), "No such option")


def test_export_writes_one_tidy_file(run_dir, tmp_path):
    for flag, name in (("--csv", "o.csv"), ("--latex", "o.tex"), ("--markdown", "o.md")):
        r = invoke("export", str(run_dir), str(run_dir), flag, str(tmp_path / name))
        assert r.exit_code == 0, r.output
        assert "wrote 4 rows" in r.output
    rows = list(csv.DictReader(open(tmp_path / "o.csv")))
    assert len(rows) == 4 and rows[0]["gpu"] == "G" and rows[0]["run_id"] == "run"


def test_export_errors_keep_existing_file(run_dir, tmp_path):
    dest = tmp_path / "keep.csv"
    dest.write_text("precious\n")
    assert_one_line_exit_2(invoke("export", str(tmp_path / "missing"), "--csv", str(dest)), "no such run")
    assert dest.read_text() == "precious\n"
    assert_one_line_exit_2(invoke("export", str(run_dir)), "exactly one of")
    assert_one_line_exit_2(invoke("export", str(run_dir), "--csv", str(tmp_path / "no" / "x.csv")), "cannot write")


def test_env_runs_without_gpu():
    r = invoke("env")
    assert r.exit_code == 0, r.output
    assert "torch" in r.output
    info = json.loads(invoke("env", "--json").output)
    assert "gpus" in info and "versions" in info


def test_version_and_help():
    assert invoke("--version").exit_code == 0
    r = invoke("--help")
    assert r.exit_code == 0 and "report" in r.output
