import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from mmprof.results import RunWriter
from mmprof.results import claims as cl
from mmprof.results.store import git_commit
from mmprof.runners import decode_power as dp
from mmprof.runners import reproduce as rp
from mmprof.runners import train_memory as tm
from tests.cli.helpers import assert_one_line_exit_2, invoke


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def png_images(html_path):
    parser = Images()
    parser.feed(html_path.read_text())
    heads = [base64.b64decode(s.split(",", 1)[1])[:8] for s in parser.srcs if s.startswith("data:image/png;base64,")]
    assert len(heads) == len(parser.srcs)
    assert all(h == b"\x89PNG\r\n\x1a\n" for h in heads)
    return len(heads)


def open_writer(command, path, exists):
    return RunWriter.resume(path, command) if exists else RunWriter.create(path, command, argv=[],
                                                                             extra_meta={"gpu": "GPU X", "driver": "1"})


def synthetic_folder(folder):
    """A reproduce folder whose run folders hold synthetic rows (keys as the steps would write them)."""
    spec = rp.ReproduceSpec(device="cuda:0", quick=True)
    trains, decodes = rp.train_specs(spec), rp.decode_specs(spec)
    w = open_writer("train-memory", folder / rp.TRAIN_DIR, False)
    for step, s, _ in trains:
        for cfg in (tm.configs(s) if s else []):
            row = {**cfg.spec_row(s), "status": "ok", "peak_alloc_gib": 20.0 + cfg.batch,
                   "act_mem_gib": 5.0 + cfg.batch, "step_time_s": 0.1 * cfg.batch, "j_per_token": 0.01}
            if cfg.bitlinear == "vanilla":
                row.update(peak_alloc_gib=30.0 + 5 * cfg.batch, step_time_s=0.15 * cfg.batch)
                if cfg.batch == 8:
                    row = {**cfg.spec_row(s), "status": "oom", "note": "OutOfMemoryError: CUDA out of memory"}
            w.append(row)
    w = open_writer("decode-power", folder / rp.DECODE_DIR, False)
    for step, s, _ in decodes:
        for cfg in dp.configs(s):
            big = cfg.arch == "transformer"
            w.append({**cfg.spec_row(s), "status": "ok", "peak_alloc_gib": (45.0 if big else 3.5) / (4 if cfg.size == "1.3b" else 1),
                      "latency_p50_ms": 8.5 if big else 1.5, "tokens_per_s": 117.0 if big else 669.0, "weights_gib": 1.0 if cfg.size == "1.3b" else 10.0,
                      "j_per_token": 4.0 if big else 0.8})
    t = [i * 0.01 for i in range(400)]
    # two step groups, two profilers: each trace has its own clock and its phases beside it
    for n, (name, label) in enumerate((("", "decode mmfree 13b packed #0"), ("-2", "decode transformer 13b bf16 #0"))):
        pd.DataFrame({"t_s": t, "gpu": 0, "power_w": [120 + (200 if 1 + n < x < 3 else 0) for x in t]}).to_csv(
            folder / rp.DECODE_DIR / f"power_trace{name}.csv", index=False)
        pd.DataFrame({"label": ["idle", label], "t_start_s": [0.0, 1.0 + n],
                      "t_end_s": [0.9, 3.0]}).to_csv(folder / rp.DECODE_DIR / f"phases{name}.csv", index=False)
    meta = {"command": "reproduce", "gpu": "GPU X", "driver": "1", "git_commit": "abcdef1234", "argv": ["mmprof"]}
    return spec, trains, decodes, meta


def test_report_from_synthetic_rows(tmp_path):
    spec, trains, decodes, meta = synthetic_folder(tmp_path)
    rows, folder = rp.judge(tmp_path, spec, meta, trains, decodes)
    by = rows.set_index("id")
    assert by.loc["train-memory-reduction", "measured_value"] == pytest.approx((1 - 24 / 50) * 100)   # batch 4
    assert by.loc["infer-13b-memory-ratio", "verdict"] == cl.REPRODUCED
    # ref-fused is in this build: measured beside fused, and not a claim of the paper
    assert by.loc["train-ref-fused-activations", "verdict"] == cl.NOT_CLAIMED
    assert by.loc["train-ref-fused-activations", "measured_value"] == pytest.approx(1.0)   # same synthetic rows
    shas = ", ".join(c[:10] for c in dict.fromkeys(c for c in ("abcdef1234", git_commit()) if c))  # the parts': this checkout's
    assert (by["measured on"] == f"GPU X, driver 1, commit{'s' if ',' in shas else ''} {shas}").all()
    for name in ("report.md", "report.html", "claims.csv", "steps.csv"):
        assert (folder / name).stat().st_size > 0
    assert png_images(folder / "report.html") == 3          # memory/time vs batch, decode vs size, power window
    md = (folder / "report.md").read_text()
    assert "Not drawn" not in md and "| reproduced |" in md and "2406.02528" in md
    assert "batch size of 1 and a sequence length of 2048" in md    # the cited setting
    steps = pd.read_csv(folder / "steps.csv").fillna("")
    after_oom = steps[steps["configuration"] == "mmfree-vanilla b8"]
    assert after_oom["status"].tolist() == ["oom"] and "out of memory" in after_oom["note"].iloc[0]
    assert len(pd.read_csv(folder / "claims.csv")) == len(rows)


def test_ref_fused_runs_when_the_build_has_it(monkeypatch):
    spec = rp.ReproduceSpec(device="cuda:0", quick=True)
    monkeypatch.setattr(rp, "available_bitlinears", lambda: ("vanilla", "fused"))
    assert [why for step, _, why in rp.train_specs(spec) if step.bitlinear == "ref-fused"][0].startswith("--bitlinear")
    monkeypatch.setattr(rp, "available_bitlinears", lambda: ("vanilla", "fused", "ref-fused"))
    s = [s for step, s, _ in rp.train_specs(spec) if step.bitlinear == "ref-fused"][0]
    assert s.bitlinears == ("ref-fused",) and s.seq == 2048 and s.size == "1.3b"


def test_paper_settings_in_the_specs():
    full = rp.ReproduceSpec(device="cuda:0")
    d = [s for _, s, _ in rp.decode_specs(full)]
    assert all(s.batch == 1 and s.prompt_len + s.new_tokens == 2048 for s in d)
    assert {x for s in d for x in s.sizes} == {"370m", "1.3b", "2.7b", "13b"}
    assert [s.weights for s in d] == ["packed", "bf16"]
    meta = rp.ReproduceSpec(device="meta", quick=True)
    assert all(s is None and "need a GPU" in why for _, s, why in rp.decode_specs(meta))


def test_cli_on_cpu_writes_the_report(tmp_path):
    out = tmp_path / "rp"
    r = invoke("reproduce", "--preset", "tiny", "--device", "cpu", "--quick", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "paper claims" in r.output and "verdict" in r.output and "FPGA" in r.output
    assert set(pd.read_csv(out / "claims.csv")["verdict"]) <= set(cl.VERDICTS)
    for name in ("report.md", "report.html", "claims.csv", "steps.csv", "meta.json",
                 "train-memory/measurements.csv", "decode-power/measurements.csv"):
        assert (out / name).exists(), name
    assert png_images(out / "report.html") == 2             # no power samples on the CPU: no window figure
    meta = json.loads((out / "meta.json").read_text())
    assert meta["command"] == "reproduce" and meta["end_utc"] and meta["preset"] == "tiny"
    decode = pd.read_csv(out / "decode-power" / "measurements.csv")
    assert set(decode["arch"]) == {"mmfree", "transformer"} and (decode["status"] == "ok").all()
    assert "tiny preset" in (out / "report.md").read_text()
    again = invoke("reproduce", "--preset", "tiny", "--device", "cpu", "--out", str(out))
    assert_one_line_exit_2(again, "--resume")


def test_killed_run_resumes_without_redoing_rows(tmp_path, monkeypatch):
    steps = (rp.TrainStep("mmfree", "fused", (1, 2), (1, 2)), rp.TrainStep("mmfree", "vanilla", (1, 2), (1, 2)))
    spec = rp.ReproduceSpec(device="meta", quick=True, preset="tiny", train_steps=steps, decode_steps=())
    real, calls = tm.estimate, []

    def dies_on_third(cfg, s):
        calls.append(cfg.label)
        if len(calls) == 3:
            raise KeyboardInterrupt                         # the process is killed mid-run
        return real(cfg, s)

    monkeypatch.setattr(tm, "estimate", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        rp.run(spec, tmp_path, open_writer)
    assert len(pd.read_csv(tmp_path / "train-memory" / "measurements.csv")) == 2
    assert not (tmp_path / "report.html").exists()
    resumed = rp.resumed_spec(tmp_path)
    assert resumed.train_steps == steps and resumed.device == "meta" and resumed.preset == "tiny"
    calls.clear()
    monkeypatch.setattr(tm, "estimate", lambda cfg, s: (calls.append(cfg.label), real(cfg, s))[1])
    rows, _ = rp.run(resumed, tmp_path, open_writer)
    assert calls == ["mmfree-vanilla b1", "mmfree-vanilla b2"]          # only what the killed run had not done
    df = pd.read_csv(tmp_path / "train-memory" / "measurements.csv")
    assert len(df) == 4 and not df.duplicated(["bitlinear", "batch"]).any()
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["end_utc"] and len(meta["resumed_utc"]) == 1
    calls.clear()
    rp.run(resumed, tmp_path, open_writer)                               # a finished run: nothing measured again
    assert calls == []
    assert rows.set_index("id").loc["infer-13b-mmfree-latency", "reason"].startswith("latency, inference memory")
    assert (tmp_path / "report.html").exists()
    notes = (tmp_path / "report.md").read_text()
    assert "No GPU was visible" in notes and "need a GPU" in notes


def test_resume_of_a_folder_that_is_not_a_reproduce_run(tmp_path):
    assert_one_line_exit_2(invoke("reproduce", "--resume", str(tmp_path)), "not a reproduce folder")


def test_paper_sizes_are_not_run_on_the_cpu(tmp_path):
    out = tmp_path / "never"
    assert_one_line_exit_2(invoke("reproduce", "--device", "cpu", "--out", str(out)), "--device cpu")
    assert not out.exists()


def test_plan_estimates_the_h200_time_per_part():
    full = rp.plan(rp.ReproduceSpec(device="cuda:0"))
    train = rp.plan(rp.ReproduceSpec(device="cuda:0", only=("train",)))
    mm = rp.plan(rp.ReproduceSpec(device="cuda:0", only=("decode-mmfree",)))
    tf = rp.plan(rp.ReproduceSpec(device="cuda:0", only=("decode-transformer",)))
    assert set(train["panel"]) == {"train"} and set(mm["configuration"].str.split().str[0]) == {"mmfree"}
    assert len(train) + len(mm) + len(tf) == len(full) and (full["est_h200_s"] > 0).all()
    parts = [rp.plan_total_s(p) for p in (train, mm, tf)]
    assert abs(sum(parts) - 2 * rp.H200_CALL_S - rp.plan_total_s(full)) < 1e-6
    assert all(p < 600 for p in (parts[0] + parts[1] - rp.H200_CALL_S, parts[2]))   # two calls of < 10 min
    # the paper's windows: >= 5 s, 3 repeats; a 13b Transformer++ row is its longest decode row
    assert full.set_index("configuration")["est_h200_s"].idxmax() == "transformer 13b bf16 b1"
    assert rp.plan_total_s(rp.plan(rp.ReproduceSpec(device="cpu", preset="tiny"))) is None
    r = invoke("reproduce", "--plan", "--only", "train,decode-mmfree")
    assert r.exit_code == 0, r.output
    assert "min on one H200" in r.output and "mmfree 13b packed" in r.output and "transformer 13b" not in r.output
    assert_one_line_exit_2(invoke("reproduce", "--plan", "--only", "decode-rnn"), "--only decode-rnn")


COMMITTED = Path(__file__).resolve().parents[2] / "results" / "h200" / "reproduce"


def test_plan_matches_the_committed_decode_rows():
    """Each decode row of the committed H200 run, from the previous row's end (a call's first row: from
    the call's start) to its own, against the plan of the same call: windows, lead-ins, warm-up counted."""
    n = 0
    for phases in sorted((COMMITTED / "decode-power").glob("phases*.csv")):
        df = pd.read_csv(phases)
        ends = {label[4:]: end for label, end in zip(df["label"], df["t_end_s"]) if label.startswith("all ")}
        labels = list(ends)
        archs = {label.split()[0] for label in labels}
        steps = tuple(rp.DecodeStep(arch, "packed" if arch == "mmfree" else "bf16",
                                    tuple(lb.split()[1] for lb in labels if lb.startswith(arch)), ())
                      for arch in sorted(archs))
        est = rp.plan(rp.ReproduceSpec(device="cuda:0", only=("decode",), decode_steps=steps))
        seconds = pd.Series(ends).diff().fillna(pd.Series(ends).iloc[0])
        assert est.set_index("configuration")["est_h200_s"].to_dict() == pytest.approx(seconds.to_dict(), rel=0.05)
        n += len(labels)
    assert n >= 5


def test_only_parts_compose_with_resume_into_one_report(tmp_path):
    out = tmp_path / "rp"
    r = invoke("reproduce", "--preset", "tiny", "--device", "cpu", "--quick", "--only", "train", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert not (out / "decode-power").exists()
    steps = pd.read_csv(out / "steps.csv")
    assert steps[steps["panel"] == "inference"]["note"].str.contains("--only train").all()
    trained = pd.read_csv(out / "train-memory" / "measurements.csv")
    r = invoke("reproduce", "--resume", str(out), "--only", "decode")
    assert r.exit_code == 0, r.output
    assert pd.read_csv(out / "train-memory" / "measurements.csv").equals(trained)   # not measured again
    assert set(pd.read_csv(out / "decode-power" / "measurements.csv")["arch"]) == {"mmfree", "transformer"}
    assert (pd.read_csv(out / "steps.csv")["status"] == "ok").all()
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "meta.json").read_text())
    assert len(meta["resumed_utc"]) == 1 and meta["end_utc"]
    assert len(meta["calls"]) == 2 and all(c["utc"] and "argv" in c for c in meta["calls"])
    decoded = pd.read_csv(out / "decode-power" / "measurements.csv")
    part_metas = [(out / part / "meta.json").read_text() for part in ("train-memory", "decode-power")]
    r = invoke("reproduce", "--resume", str(out))        # nothing left: the claims and report again, no GPU needed
    assert r.exit_code == 0, r.output
    assert [(out / part / "meta.json").read_text() for part in ("train-memory", "decode-power")] == part_metas
    assert "every configuration is measured" in r.output
    assert pd.read_csv(out / "decode-power" / "measurements.csv").equals(decoded)
    calls = json.loads((out / "meta.json").read_text())["calls"]
    assert len(calls) == 3       # the report's command line is every call's
    assert f"- commands (in order): {'; '.join(' '.join(c['argv']) for c in calls)}" in (out / "report.md").read_text()


def test_a_gpu_folder_resumed_without_its_gpu_is_a_one_line_error(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    out = tmp_path / "rp"
    assert invoke("reproduce", "--preset", "tiny", "--device", "cpu", "--quick", "--only", "train",
                  "--out", str(out)).exit_code == 0
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "device": "cuda:0"}))   # as if measured on a GPU
    assert_one_line_exit_2(invoke("reproduce", "--resume", str(out), "--only", "decode"), "no CUDA device 0 is visible")
    assert not (out / "decode-power" / "measurements.csv").exists()
