"""The paper's efficiency claims (claims.toml), the figures measured for them, and the verdict rule.

A claim names a derivation (`measure.fn`) that reads one number out of the training and decoding
rows; the verdict compares it with the paper's figure under the claim's rule and tolerance. Nothing
here measures: every measured figure comes from rows of a run folder (or from synthetic rows in tests).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Callable

import pandas as pd

from mmprof.results.summaries import impl_label, job_rows

RULES = ("within", "at_least", "at_most", "not_measurable", "measured_only")
REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
NOT_MEASURABLE = "not measurable on this hardware"
NOT_MEASURED = "not measured"
NOT_CLAIMED = "not claimed by the paper"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, NOT_MEASURABLE, NOT_MEASURED, NOT_CLAIMED)

MEMORY_COLUMNS = ("peak_alloc_gib", "act_mem_gib")   # what a no-GPU estimate fills (time and energy: not)
TABLE_COLUMNS = ["claim", "paper", "measured here", "ratio", "verdict", "reason"]


@dataclass(frozen=True)
class Claim:
    id: str
    panel: str
    text: str
    source: str
    unit: str
    rule: str
    paper_value: float | None = None
    tolerance: float = 0.0
    measure: dict = field(default_factory=dict)
    note: str = ""
    reason: str = ""


@dataclass(frozen=True)
class Measured:
    value: float | None
    detail: str = ""       # where the figure comes from (batch, rows), or why there is none


def load_claims(text: str | None = None) -> tuple[dict, list[dict], list[Claim]]:
    """(source, settings, claims) from claims.toml shipped with mmprof, or from `text`."""
    if text is None:
        text = resources.files("mmprof.results").joinpath("claims.toml").read_text()
    data = tomllib.loads(text)
    claims = [Claim(**c) for c in data.get("claim", [])]
    for c in claims:
        if c.rule not in RULES:
            raise ValueError(f"claim {c.id}: unknown rule {c.rule!r}; choose from {', '.join(RULES)}")
        if c.rule in ("within", "at_least", "at_most") and c.paper_value is None:
            raise ValueError(f"claim {c.id}: rule {c.rule} needs a paper_value")
        if c.measure and c.measure.get("fn") not in DERIVATIONS:
            raise ValueError(f"claim {c.id}: unknown derivation {c.measure.get('fn')!r}")
    return data.get("source", {}), data.get("setting", []), claims


def verdict(rule: str, paper: float | None, measured: float | None, tolerance: float) -> tuple[str, str]:
    """(verdict, reason) of one claim. The reason states the bound the measured figure was held to."""
    if rule == "not_measurable":
        return NOT_MEASURABLE, ""
    if rule == "measured_only":
        return (NOT_CLAIMED, "") if measured is not None else (NOT_MEASURED, "")
    if measured is None:
        return NOT_MEASURED, ""
    tol = f"{tolerance:.0%}"
    if rule == "within":
        lo, hi = paper * (1 - tolerance), paper * (1 + tolerance)
        ok = lo <= measured <= hi
        bound = f"within {tol} of the paper ({_num(lo)}..{_num(hi)})"
    elif rule == "at_least":
        bound_v = paper * (1 - tolerance)
        ok = measured >= bound_v
        bound = f"at least {_num(bound_v)} (the paper's figure{f' less {tol}' if tolerance else ''})"
    elif rule == "at_most":
        bound_v = paper * (1 + tolerance)
        ok = measured <= bound_v
        bound = f"at most {_num(bound_v)} (the paper's figure{f' plus {tol}' if tolerance else ''})"
    else:
        raise ValueError(f"unknown rule {rule!r}")
    return (REPRODUCED if ok else NOT_REPRODUCED), f"{_num(measured)} {'meets' if ok else 'misses'} {bound}"


def claim_rows(claims: list[Claim], train: pd.DataFrame | None, decode: pd.DataFrame | None,
               *, measured_on: str = "", missing: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per claim: the paper's figure, the measured one, their ratio, the verdict and why.

    `missing` maps a configuration label (e.g. 'mmfree-ref-fused', 'decode') to why it has no rows,
    so a claim that cannot be measured says the real reason (no GPU, not in this build)."""
    frames = {"train": _ok_rows(train, train=True), "decode": _ok_rows(decode, train=False)}
    missing = missing or {}
    out = []
    for c in claims:
        m = _measure(c, frames, missing)
        v, why = verdict(c.rule, c.paper_value, m.value, c.tolerance)
        if v == NOT_MEASURABLE:
            why = c.reason
        reason = "; ".join(p for p in (why, m.detail, c.note) if p)
        ratio = (m.value / c.paper_value if m.value is not None and c.paper_value else None)
        out.append({
            "id": c.id, "panel": c.panel, "claim": c.text, "source": c.source, "unit": c.unit,
            "paper": "" if c.paper_value is None else f"{_num(c.paper_value)} {c.unit}",
            "paper_value": c.paper_value, "measured_value": m.value,
            "measured here": "" if m.value is None else f"{_num(m.value)} {c.unit}",
            "ratio": "" if ratio is None else f"{ratio:.3g}",
            "verdict": v, "rule": c.rule, "tolerance": c.tolerance, "reason": reason,
            "measured on": measured_on,
        })
    return pd.DataFrame(out)


def claim_table(rows: pd.DataFrame) -> pd.DataFrame:
    """The text frame shown on the terminal and in the reports."""
    return rows[TABLE_COLUMNS].fillna("").astype(str)


# ---- derivations: one number out of the rows ----

def _ok_rows(df: pd.DataFrame | None, *, train: bool) -> pd.DataFrame:
    if df is None or df.empty:
        return pd.DataFrame()
    df = job_rows(df)
    df = df[df["status"] == "ok"].copy()
    if train and len(df):
        df["impl"] = [impl_label(r) for _, r in df.iterrows()]
    return df


def _why_none(label: str, missing: dict[str, str], kind: str, size: str) -> str:
    for key in (label, kind):
        if key in missing:
            return missing[key]
    return f"no ok {kind} row of {label} at {size}"


def _train_rows(frames, size: str) -> pd.DataFrame:
    df = frames["train"]
    return df[df["size"].astype(str) == size] if len(df) else df


def _train_pair(frames, missing, a: str, b: str, column: str, size: str):
    """Rows of impls a and b at `size`, at the largest batch both ran with `column` filled."""
    df = _train_rows(frames, size)
    for impl in (a, b):
        if df.empty or not (df["impl"] == impl).any():
            return None, _why_none(impl, missing, "training", size)
    ga = df[(df["impl"] == a) & df[column].notna()].set_index("batch")
    gb = df[(df["impl"] == b) & df[column].notna()].set_index("batch")
    common = sorted(set(ga.index) & set(gb.index))
    if not common:
        reason = None if column in MEMORY_COLUMNS else missing.get("time")
        return None, reason or f"no batch where both {a} and {b} have {column}"
    batch = common[-1]
    return (ga.loc[batch], gb.loc[batch], batch), ""


def _est(*rows) -> str:
    return " (estimate on fake tensors)" if any(int(r.get("estimated", 0) or 0) for r in rows) else ""


def train_reduction_pct(frames, missing, *, a, b, column, size, scale=1.0) -> Measured:
    pair, why = _train_pair(frames, missing, a, b, column, size)
    if pair is None:
        return Measured(None, why)
    ra, rb, batch = pair
    value = (1 - ra[column] / rb[column]) * 100 * scale
    return Measured(value, f"batch {int(batch)}: {a} {ra[column]:.2f} vs {b} {rb[column]:.2f} {column}{_est(ra, rb)}")


def train_ratio(frames, missing, *, a, b, column, size, scale=1.0) -> Measured:
    """b over a at the largest batch both ran."""
    pair, why = _train_pair(frames, missing, a, b, column, size)
    if pair is None:
        return Measured(None, why)
    ra, rb, batch = pair
    return Measured(rb[column] / ra[column] * scale,
                    f"batch {int(batch)}: {b} {rb[column]:.4g} / {a} {ra[column]:.4g} {column}{_est(ra, rb)}")


def train_value(frames, missing, *, impl, column, size, scale=1.0, at_batch_of=()) -> Measured:
    """The value at the largest batch where this implementation and every one of `at_batch_of` have
    `column` (so figures of several implementations compare at one batch); else at its own largest."""
    df = _train_rows(frames, size)
    if df.empty or not (df["impl"] == impl).any():
        return Measured(None, _why_none(impl, missing, "training", size))
    filled = df[df[column].notna()]
    g = filled[filled["impl"] == impl].sort_values("batch")
    if g.empty:
        return Measured(None, missing.get("time", f"{impl} rows have no {column}"))
    batches = set(g["batch"])
    for other in at_batch_of:
        batches &= set(filled.loc[filled["impl"] == other, "batch"])
    r = g[g["batch"] == max(batches)].iloc[-1] if batches else g.iloc[-1]
    own = "" if batches or not at_batch_of else f" (no batch shared with {', '.join(at_batch_of)})"
    return Measured(r[column] * scale, f"batch {int(r['batch'])}, seq {int(r['seq'])}{own}{_est(r)}")


def _decode_row(frames, missing, arch, size, column):
    df = frames["decode"]
    label = f"{arch} {size}"
    if df.empty:
        return None, missing.get("decode", f"no ok decode row of {label}")
    g = df[(df["arch"] == arch) & (df["size"].astype(str) == size)]
    if g.empty:
        return None, missing.get(label, f"no ok decode row of {label}")
    r = g.iloc[0]
    if pd.isna(r.get(column)):
        return None, f"{label} has no {column}" + (f" ({r['note']})" if isinstance(r.get("note"), str) else "")
    return r, ""


def decode_value(frames, missing, *, arch, size, column, scale=1.0) -> Measured:
    r, why = _decode_row(frames, missing, arch, size, column)
    if r is None:
        return Measured(None, why)
    return Measured(r[column] * scale, f"{arch} {size} {r['weights']}, batch {int(r['batch'])}, "
                                       f"{int(r['prompt_len']) + int(r['new_tokens'])} tokens")


def decode_ratio(frames, missing, *, size, column, scale=1.0) -> Measured:
    """Transformer++ over MatMul-free at one size."""
    m, why = _decode_row(frames, missing, "mmfree", size, column)
    if m is None:
        return Measured(None, why)
    t, why = _decode_row(frames, missing, "transformer", size, column)
    if t is None:
        return Measured(None, why)
    return Measured(t[column] / m[column] * scale, f"{size}: transformer {t[column]:.4g} / mmfree {m[column]:.4g} {column}")


DERIVATIONS: dict[str, Callable[..., Measured]] = {
    "train_reduction_pct": train_reduction_pct, "train_ratio": train_ratio, "train_value": train_value,
    "decode_value": decode_value, "decode_ratio": decode_ratio,
}


def _measure(c: Claim, frames, missing) -> Measured:
    if not c.measure:
        return Measured(None, "")
    args = {k: v for k, v in c.measure.items() if k != "fn"}
    return DERIVATIONS[c.measure["fn"]](frames, missing, **args)


def _num(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
