"""The report frame: stored cells as text, plus relative columns against baseline rows.

Every rendering (Rich table, CSV, JSON, Markdown, LaTeX) is made from this one frame, so the numbers
are the same in every format and equal to the stored text.
"""

from __future__ import annotations

import math

import pandas as pd

from mmprof.errors import UserError
from mmprof.results import schema
from mmprof.results.store import Run

# Metrics where higher is better get a ratio ("1.47x"); the rest a percent change ("-61.0%").
HIGHER_IS_BETTER = {"tokens_per_s", "mfu", "bandwidth_gbps", "bandwidth_frac"}

# A row is only ever compared with a baseline row of the same architecture, size, batch and
# sequence (never a Transformer++ row with a MatMul-free one), whatever the other columns say.
LIKE_WITH_LIKE = ["arch", "size", "batch", "seq"]

# Metrics a report shows relative columns for, when present and non-empty.
KEY_METRICS = [
    "peak_alloc_gib", "act_mem_gib", "step_time_s", "tokens_per_s", "j_per_token",
    "latency_p50_ms", "energy_j", "power_avg_w",
]


def parse_baseline(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    if "=" not in text or text.startswith("=") or text.endswith("="):
        raise UserError(f"--baseline must look like COLUMN=VALUE, got {text!r}")
    col, val = text.split("=", 1)
    return col.strip(), val.strip()


def combine(runs: list[Run]) -> pd.DataFrame:
    """Concatenate runs (raw text cells) into one frame with a run_id column first."""
    frames = []
    for run in runs:
        df = run.df.copy()
        df.insert(0, "run_id", run.run_id)
        frames.append(df)
    out = pd.concat(frames, ignore_index=True, sort=False)
    return out.fillna("")


def _num(cell: str) -> float | None:
    try:
        v = float(cell)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _relative(value: float | None, base: float | None, metric: str) -> str:
    if value is None or base is None or base == 0:
        return ""
    if metric in HIGHER_IS_BETTER:
        return f"{value / base:.2f}x"
    return f"{(value - base) / base * 100:+.1f}%"


def spec_like(columns: list[str]) -> list[str]:
    specs: list[str] = []
    for cols in schema.SPEC_COLUMNS.values():
        specs += [c for c in cols if c in columns and c not in specs]
    return specs


def shown_columns(df: pd.DataFrame) -> list[str]:
    """Columns worth showing: spec columns that vary or identify, then non-empty metrics, then note."""
    cols = list(df.columns)
    specs = [c for c in spec_like(cols) if (df[c] != "").any()]
    varying = [c for c in specs if df[c].nunique() > 1 or c in ("arch", "size")]
    rest = [c for c in cols if c not in specs and c not in ("run_id", "status", "note")]
    metrics = [c for c in rest if (df[c] != "").any()]
    head = ["run_id"] if df["run_id"].nunique() > 1 else []
    return head + ["status"] + varying + metrics + (["note"] if (df.get("note", "") != "").any() else [])


def build_report(runs: list[Run], baseline: tuple[str, str] | None = None,
                 columns: list[str] | None = None) -> pd.DataFrame:
    """One text frame: the chosen stored columns, plus `<metric> vs <col>=<val>` relative columns."""
    df = combine(runs)
    if columns:
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise UserError(f"unknown column(s) {missing}; the runs have {list(df.columns)}")
    show = columns or shown_columns(df)
    out = df[show].copy()
    if baseline is None:
        return out
    col, val = baseline
    if col not in df.columns:
        raise UserError(f"--baseline column {col!r} is not in the runs; they have {list(df.columns)}")
    base_rows = df[df[col] == val]
    if base_rows.empty:
        raise UserError(f"no rows with {col}={val} to use as baseline")
    must = [c for c in LIKE_WITH_LIKE if c in df.columns and c != col]
    keys = [c for c in spec_like(list(df.columns)) if c != col and c not in must and not _follows(df, c, col)]
    metrics = [m for m in KEY_METRICS if m in df.columns and (df[m] != "").any()]
    for m in metrics:
        rel = []
        for _, row in df.iterrows():
            match = _find_baseline(row, base_rows, keys, must)
            rel.append("" if match is None else _relative(_num(row[m]), _num(match[m]), m))
        out[f"{m} vs {val}"] = rel
    if "note" in out.columns:
        out = out[[c for c in out.columns if c != "note"] + ["note"]]
    return out


def _follows(df: pd.DataFrame, column: str, by: str) -> bool:
    """True when `column` is fixed by `by` (one value per group, several overall), like a decode row's
    weights by its arch: such a column cannot be held equal when comparing across `by`."""
    if df[column].nunique() <= 1:
        return False
    return bool((df.groupby(by)[column].nunique() <= 1).all())


def _find_baseline(row: pd.Series, base_rows: pd.DataFrame, keys: list[str], must: list[str] = ()) -> pd.Series | None:
    """The baseline row equal to `row` on every `must` column and agreeing on every other spec key
    that the baseline row sets."""
    for _, b in base_rows.iterrows():
        if b.get("status") not in ("ok", None):
            continue
        if all(b[k] == row[k] for k in must) and all(b[k] == "" or b[k] == row[k] for k in keys):
            return b
    return None
