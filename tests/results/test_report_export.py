import csv
import json

import numpy as np
import pytest

from mmprof.errors import UserError
from mmprof.results import RunWriter, build_report, export, parse_baseline, read_run, render, tidy


@pytest.fixture
def run_pair(tmp_path):
    rng = np.random.default_rng()
    w = RunWriter.create(tmp_path / "r1", "train-memory", extra_meta={"gpu": "NVIDIA H200", "driver": "580"})
    stored = []
    for impl in ("fused", "vanilla"):
        for b in (1, 2):
            row = dict(status="ok", arch="mmfree", size="tiny", bitlinear=impl, batch=b,
                       peak_alloc_gib=float(rng.uniform(1, 50)), step_time_s=float(rng.uniform(0.1, 1)),
                       tokens_per_s=float(rng.uniform(1e3, 1e4)))
            w.append(row)
            stored.append(row)
    w.append(dict(status="oom", arch="transformer", size="tiny", batch=2, note="CUDA out of memory"))
    w.finish()
    return tmp_path / "r1", stored


def _stored_text(run_dir):
    with open(run_dir / "measurements.csv") as f:
        return list(csv.DictReader(f))


def test_report_shows_exactly_the_stored_numbers_in_every_format(run_pair):
    run_dir, _ = run_pair
    stored = _stored_text(run_dir)
    frame = build_report([read_run(run_dir, raw=True)])
    for fmt in ("table", "csv", "json", "markdown", "latex"):
        text = render(frame, fmt)
        for rec in stored:
            for col in ("peak_alloc_gib", "step_time_s", "tokens_per_s"):
                if rec[col]:
                    cell = rec[col] if fmt != "latex" else rec[col].replace("_", r"\_")
                    assert cell in text, (fmt, col, cell)
    js = json.loads(render(frame, "json"))
    assert [r["peak_alloc_gib"] for r in js] == [r["peak_alloc_gib"] for r in stored]


def test_report_relative_columns_match_arithmetic(run_pair):
    run_dir, rows = run_pair
    frame = build_report([read_run(run_dir, raw=True)], parse_baseline("bitlinear=vanilla"))
    fused = [r for r in rows if r["bitlinear"] == "fused"]
    vanilla = {r["batch"]: r for r in rows if r["bitlinear"] == "vanilla"}
    for i, r in enumerate(fused):
        want = (float(f"{r['peak_alloc_gib']:.6g}") / float(f"{vanilla[r['batch']]['peak_alloc_gib']:.6g}") - 1) * 100
        assert frame.loc[i, "peak_alloc_gib vs vanilla"] == f"{want:+.1f}%"
        ratio = float(f"{r['tokens_per_s']:.6g}") / float(f"{vanilla[r['batch']]['tokens_per_s']:.6g}")
        assert frame.loc[i, "tokens_per_s vs vanilla"] == f"{ratio:.2f}x"
    assert list(frame.columns)[-1] == "note"


def test_bad_baseline(run_pair):
    run_dir, _ = run_pair
    run = read_run(run_dir, raw=True)
    with pytest.raises(UserError):
        parse_baseline("novalue")
    with pytest.raises(UserError, match="not in the runs"):
        build_report([run], ("colour", "red"))
    with pytest.raises(UserError, match="no rows"):
        build_report([run], ("bitlinear", "turbo"))


def test_export_tidy_order_and_provenance(run_pair, tmp_path):
    run_dir, _ = run_pair
    run = read_run(run_dir, raw=True)
    frame = tidy([run, run])
    cols = list(frame.columns)
    assert cols[:5] == ["run_id", "command", "gpu", "driver", "mmprof_version"]
    assert cols.index("batch") < cols.index("peak_alloc_gib") < cols.index("note")
    assert set(frame["gpu"]) == {"NVIDIA H200"} and set(frame["run_id"]) == {"r1"}
    dest = tmp_path / "out.csv"
    assert export([run, run], "csv", dest) == 10
    with open(dest) as f:
        got = list(csv.DictReader(f))
    stored = _stored_text(run_dir)
    assert [g["peak_alloc_gib"] for g in got] == [s["peak_alloc_gib"] for s in stored] * 2


def test_export_failure_leaves_no_partial_file(run_pair, tmp_path):
    run_dir, _ = run_pair
    with pytest.raises(UserError, match="cannot write"):
        export([read_run(run_dir, raw=True)], "csv", tmp_path / "missing-dir" / "out.csv")
    assert not (tmp_path / "missing-dir").exists()


def test_baseline_ignores_columns_fixed_by_the_baseline_column(tmp_path):
    """Decode rows: the transformer is always bf16, the MatMul-free model fake-quant; still comparable."""
    w = RunWriter.create(tmp_path / "d", "decode-power")
    rng = np.random.default_rng()
    speeds = {}
    for size in ("370m", "1.3b"):
        for arch, weights in (("mmfree", "fake-quant"), ("transformer", "bf16")):
            speeds[arch, size] = float(f"{rng.uniform(5, 90):.6g}")
            w.append(dict(status="ok", arch=arch, size=size, weights=weights, batch=1,
                          tokens_per_s=speeds[arch, size]))
    frame = build_report([read_run(tmp_path / "d", raw=True)], ("arch", "transformer"))
    for i, size in enumerate(("370m", "370m", "1.3b", "1.3b")):
        arch = frame.loc[i, "arch"]
        want = speeds[arch, size] / speeds["transformer", size]
        assert frame.loc[i, "tokens_per_s vs transformer"] == f"{want:.2f}x"


def test_baseline_compares_like_with_like_only(tmp_path):
    """A row is compared only with the baseline row of the same arch, size, batch and seq: a
    Transformer++ row is never compared with a MatMul-free vanilla row, nor a row with a baseline
    of another sequence length or size."""
    w = RunWriter.create(tmp_path / "r", "train-memory")
    rows = [
        dict(arch="mmfree", size="1.3b", bitlinear="vanilla", batch=1, seq=2048, peak_alloc_gib=20.0),
        dict(arch="mmfree", size="1.3b", bitlinear="vanilla", batch=2, seq=2048, peak_alloc_gib=40.0),
        dict(arch="mmfree", size="1.3b", bitlinear="fused", batch=1, seq=2048, peak_alloc_gib=10.0),
        dict(arch="mmfree", size="1.3b", bitlinear="fused", batch=2, seq=2048, peak_alloc_gib=30.0),
        dict(arch="mmfree", size="1.3b", bitlinear="fused", batch=1, seq=1024, peak_alloc_gib=5.0),
        dict(arch="mmfree", size="370m", bitlinear="fused", batch=1, seq=2048, peak_alloc_gib=4.0),
        dict(arch="transformer", size="1.3b", bitlinear="", batch=1, seq=2048, peak_alloc_gib=25.0),
    ]
    for row in rows:
        w.append(dict(status="ok", **row))
    w.finish()
    frame = build_report([read_run(tmp_path / "r", raw=True)], parse_baseline("bitlinear=vanilla"))
    assert list(frame["peak_alloc_gib vs vanilla"]) == ["+0.0%", "+0.0%", "-50.0%", "-25.0%", "", "", ""]
    by_arch = build_report([read_run(tmp_path / "r", raw=True)], parse_baseline("arch=transformer"))
    # against the Transformer++ row of the same size, batch and seq, whatever the BitLinear
    assert list(by_arch["peak_alloc_gib vs transformer"]) == ["-20.0%", "", "-60.0%", "", "", "", "+0.0%"]
