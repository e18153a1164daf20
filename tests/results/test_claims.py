import math

import pandas as pd
import pytest

from mmprof.results import claims as cl


@pytest.mark.parametrize("rule,paper,measured,tol,expected", [
    ("within", 48.5, 50.0, 0.10, cl.REPRODUCED),
    ("within", 48.5, 54.0, 0.10, cl.NOT_REPRODUCED),
    ("within", 48.5, 43.0, 0.10, cl.NOT_REPRODUCED),
    ("at_least", 61.0, 58.0, 0.05, cl.REPRODUCED),        # 58 >= 57.95
    ("at_least", 61.0, 57.9, 0.05, cl.NOT_REPRODUCED),
    ("at_least", 10.0, 10.0, 0.0, cl.REPRODUCED),
    ("at_most", 695.48, 1.5, 0.10, cl.REPRODUCED),
    ("at_most", 4.19, 4.60, 0.10, cl.REPRODUCED),         # 4.60 <= 4.609
    ("at_most", 4.19, 4.62, 0.10, cl.NOT_REPRODUCED),
    ("at_least", 61.0, None, 0.05, cl.NOT_MEASURED),
    ("not_measurable", 13.0, None, 0.0, cl.NOT_MEASURABLE),
    ("not_measurable", 13.0, 13.0, 0.0, cl.NOT_MEASURABLE),
    ("measured_only", None, 0.5, 0.0, cl.NOT_CLAIMED),
    ("measured_only", None, None, 0.0, cl.NOT_MEASURED),
], ids=lambda v: str(v))
def test_verdict_rule(rule, paper, measured, tol, expected):
    v, reason = cl.verdict(rule, paper, measured, tol)
    assert v == expected
    if v in (cl.REPRODUCED, cl.NOT_REPRODUCED):
        assert ("meets" if v == cl.REPRODUCED else "misses") in reason
        assert (f"{tol:.0%}" in reason) == bool(tol)


def test_shipped_claims_are_sourced_and_consistent():
    source, settings, claims = cl.load_claims()
    assert source["arxiv"] == "2406.02528"
    assert {s["panel"] for s in settings} >= {"training", "inference"}
    assert all(s.get("source") for s in settings)
    by_id = {c.id: c for c in claims}
    assert len(by_id) == len(claims)
    assert all(c.source and c.unit for c in claims)
    # the paper's own figures agree with the ratios the claims quote
    assert math.isclose(by_id["train-memory-reduction"].paper_value, (1 - 32 / 82) * 100, abs_tol=0.1)
    assert math.isclose(by_id["train-step-speedup"].paper_value, 1.52 / 1.21, abs_tol=1e-3)
    assert math.isclose(by_id["infer-13b-latency-ratio"].paper_value, 3183.10 / 695.48, abs_tol=1e-3)
    assert 48.50 / 4.19 > by_id["infer-13b-memory-ratio"].paper_value
    assert by_id["fpga-13w"].rule == "not_measurable" and by_id["fpga-13w"].reason


def test_claims_file_errors_name_the_claim():
    with pytest.raises(ValueError, match="claim x: unknown rule"):
        cl.load_claims('[[claim]]\nid="x"\npanel="p"\ntext="t"\nsource="s"\nunit="u"\nrule="roughly"\n')
    with pytest.raises(ValueError, match="claim y: unknown derivation"):
        cl.load_claims('[[claim]]\nid="y"\npanel="p"\ntext="t"\nsource="s"\nunit="u"\nrule="measured_only"\n'
                       'measure={fn="guess"}\n')


def train_rows():
    rows = []
    for impl, peak, step in (("fused", lambda b: 20 + 2 * b, 0.3), ("vanilla", lambda b: 25 + 6 * b, 0.4)):
        for b in (1, 4, 8):
            rows.append({"status": "ok", "arch": "mmfree", "size": "1.3b", "bitlinear": impl, "batch": b, "seq": 2048,
                         "peak_alloc_gib": peak(b), "act_mem_gib": peak(b) - 15, "step_time_s": step * b,
                         "j_per_token": 0.01 * (2 if impl == "vanilla" else 1), "estimated": 0})
    rows[-1] = {**rows[-1], "status": "oom", "peak_alloc_gib": None, "step_time_s": None, "note": "OutOfMemoryError"}
    rows.append({"status": "ok", "arch": "transformer", "size": "1.3b", "bitlinear": None, "batch": 4, "seq": 2048,
                 "peak_alloc_gib": 50.0, "step_time_s": 1.0, "j_per_token": 0.017, "estimated": 0})
    rows.append({"status": "ok", "arch": "mmfree", "size": "tiny", "bitlinear": "fused", "batch": 64, "seq": 2048,
                 "peak_alloc_gib": 0.1, "step_time_s": 0.1, "estimated": 0})       # another size: never read
    return pd.DataFrame(rows)


def decode_rows():
    base = {"status": "ok", "batch": 1, "prompt_len": 32, "new_tokens": 2016}
    return pd.DataFrame([
        {**base, "arch": "mmfree", "size": "13b", "weights": "packed", "peak_alloc_gib": 3.5, "latency_p50_ms": 1.5,
         "j_per_token": 0.8},
        {**base, "arch": "transformer", "size": "13b", "weights": "bf16", "peak_alloc_gib": 45.0,
         "latency_p50_ms": 8.5, "j_per_token": 4.2},
    ])


def test_claim_table_from_synthetic_rows():
    _, _, claims = cl.load_claims()
    rows = cl.claim_rows(claims, train_rows(), decode_rows(), measured_on="GPU X, driver 1, commit abc",
                         missing={"mmfree-ref-fused": "ref-fused is not in this build"}).set_index("id")
    red = rows.loc["train-memory-reduction"]
    # vanilla ran out of memory at batch 8, so the claim is read at batch 4: 1 - 28/49
    assert red["measured_value"] == pytest.approx((1 - 28 / 49) * 100)
    assert red["verdict"] == cl.NOT_REPRODUCED and "batch 4" in red["reason"]
    assert rows.loc["train-step-speedup", "measured_value"] == pytest.approx(1.6 / 1.2)
    assert rows.loc["train-step-speedup", "verdict"] == cl.REPRODUCED
    mem = rows.loc["infer-13b-mmfree-memory"]
    assert mem["measured_value"] == pytest.approx(3.5 * 1.073741824) and mem["verdict"] == cl.REPRODUCED
    assert mem["ratio"] == f"{3.5 * 1.073741824 / 4.19:.3g}"
    assert rows.loc["infer-13b-transformer-memory", "verdict"] == cl.REPRODUCED      # 48.3 GB within 10%
    assert rows.loc["infer-13b-memory-ratio", "measured_value"] == pytest.approx(45 / 3.5)
    assert rows.loc["infer-13b-latency-ratio", "measured_value"] == pytest.approx(8.5 / 1.5)
    assert rows.loc["fpga-13w", "verdict"] == cl.NOT_MEASURABLE and "FPGA" in rows.loc["fpga-13w", "reason"]
    # energy per token at the batch fused and vanilla share (4), in mJ; the transformer's at its batch 4
    assert rows.loc["train-energy-fused", "measured_value"] == pytest.approx(10.0)
    assert "batch 4" in rows.loc["train-energy-fused", "reason"]
    assert rows.loc["train-energy-vanilla", "measured_value"] == pytest.approx(20.0)
    assert rows.loc["train-energy-transformer", "measured_value"] == pytest.approx(17.0)
    assert rows.loc["train-energy-fused", "verdict"] == cl.NOT_CLAIMED
    assert rows.loc["train-ref-fused-activations", "verdict"] == cl.NOT_MEASURED
    assert rows.loc["train-ref-fused-activations", "reason"] == "ref-fused is not in this build"
    assert rows.loc["decode-energy-ratio", "measured_value"] == pytest.approx(4.2 / 0.8)
    assert (rows["measured on"] == "GPU X, driver 1, commit abc").all()
    table = cl.claim_table(rows.reset_index())
    assert list(table.columns) == cl.TABLE_COLUMNS and len(table) == len(claims)


def test_no_rows_say_why():
    _, _, claims = cl.load_claims()
    rows = cl.claim_rows(claims, None, None, missing={"decode": "needs a GPU"}).set_index("id")
    assert (rows["verdict"].isin([cl.NOT_MEASURED, cl.NOT_MEASURABLE])).all()
    assert rows.loc["infer-13b-mmfree-latency", "reason"].startswith("needs a GPU")
    assert "no ok training row of mmfree-fused at 1.3b" in rows.loc["train-memory-reduction", "reason"]
