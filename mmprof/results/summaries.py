"""Command-specific summary frames: the comparisons a paper quotes, with the paper's claims beside them."""

from __future__ import annotations

import pandas as pd

# What the MatMul-free LM paper claims (fused vs vanilla BitLinear in training; 13B decoding).
PAPER_TRAIN = "paper: fused vs vanilla -61% memory, +25.6% speed (1.3B-class, A100)"
PAPER_DECODE = "paper: 13B MatMul-free 4.19 GB / 695 ms vs Transformer++ 48.50 GB / 3183 ms (4.57x)"


def _pct(a, b) -> str:
    if pd.isna(a) or pd.isna(b) or not b:
        return ""
    return f"{(a - b) / b * 100:+.1f}%"


def _fmt(v, digits: int = 2) -> str:
    return "" if pd.isna(v) else f"{v:.{digits}f}"


def impl_label(row) -> str:
    """mmfree-<bitlinear> (vanilla, ref-fused, fused, naive) or transformer (+ckpt with activation
    checkpointing): what a row measured."""
    impl = row.get("bitlinear")
    label = f"{row['arch']}-{impl}" if isinstance(impl, str) and impl else str(row["arch"])
    return label + ("+ckpt" if row.get("checkpointing") == "layer" else "")


def job_rows(df: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: a multi-process run's summary rows (rank 'all'), else every row."""
    if "row_kind" in df and (df["row_kind"] == "summary").any():
        return df[df["row_kind"] == "summary"]
    return df


# The comparisons the train-memory summary shows per batch: (label, implementation, its baseline).
TRAIN_SAVINGS = (
    ("reference: ref-fused vs vanilla", "mmfree-ref-fused", "mmfree-vanilla"),
    ("mmprof: fused vs vanilla", "mmfree-fused", "mmfree-vanilla"),
    ("mmprof: fused vs ref-fused", "mmfree-fused", "mmfree-ref-fused"),
    ("fused vs transformer", "mmfree-fused", "transformer"),
)
# The paper's fused vs vanilla claim (1.3B-class, A100), shown beside the measured savings.
PAPER_TRAIN_ROW = {"comparison": "paper: fused vs vanilla", "peak": "-61.0%", "activations": "",
                   "tokens/s": "+25.6%"}


def train_memory_summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per batch and comparison: the paper's claim (fused vs vanilla), the reference's own
    saving (ref-fused vs vanilla) and mmprof's (fused vs vanilla, vs ref-fused, vs Transformer++),
    each as the change in peak, activations and tokens/s. Rows are compared within one size and seq."""
    df = job_rows(df).copy()
    df["impl"] = [impl_label(r) for _, r in df.iterrows()]
    rows = []
    groups = [c for c in ("size", "seq", "batch") if c in df.columns]
    ok = lambda r: r is not None and r["status"] == "ok"  # noqa: E731
    for key, group in df.groupby(groups, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        spec = {c: (int(v) if c in ("batch", "seq") else v) for c, v in zip(groups, key)}
        by = {r["impl"]: r for _, r in group.iterrows()}
        shown = []
        for label, impl, base in TRAIN_SAVINGS:
            a, b = by.get(impl), by.get(base)
            if ok(a) and ok(b):
                shown.append({
                    "comparison": label,
                    "peak": _pct(a["peak_alloc_gib"], b["peak_alloc_gib"]),
                    "activations": _pct(a.get("act_mem_gib"), b.get("act_mem_gib")) if base != "transformer" else "",
                    "tokens/s": _pct(a.get("tokens_per_s"), b.get("tokens_per_s")),
                })
        if any(r["comparison"].endswith("vs vanilla") for r in shown):
            shown.insert(0, dict(PAPER_TRAIN_ROW))
        rows += [{**spec, **r} for r in shown]
    return pd.DataFrame(rows).fillna("")


def decode_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per size: MatMul-free vs Transformer++ tokens/s, J/token, memory and the fraction of the
    weight-bytes roofline (`bandwidth_frac`), and the ratios."""
    rows = []
    ok = job_rows(df)
    ok = ok[ok["status"] == "ok"]
    for size, group in ok.groupby("size", sort=False):
        m = group[group["arch"] == "mmfree"]
        t = group[group["arch"] == "transformer"]
        out = {"size": size}
        for name, g in (("mmfree", m), ("transformer", t)):
            if len(g):
                r = g.iloc[0]
                out[f"{name} tokens/s"] = _fmt(r.get("tokens_per_s"), 1)
                out[f"{name} J/token"] = _fmt(r.get("j_per_token"), 4)
                out[f"{name} peak GiB"] = _fmt(r.get("peak_alloc_gib"))
                out[f"{name} roofline"] = _fmt(r.get("bandwidth_frac"), 3)  # of the copy bandwidth (GPU rows)
        if len(m) and len(t):
            mr, tr = m.iloc[0], t.iloc[0]
            if tr.get("tokens_per_s"):
                out["speed mmfree/transformer"] = f"{mr['tokens_per_s'] / tr['tokens_per_s']:.2f}x"
            if pd.notna(mr.get("j_per_token")) and pd.notna(tr.get("j_per_token")) and tr["j_per_token"]:
                out["J/token mmfree/transformer"] = f"{mr['j_per_token'] / tr['j_per_token']:.2f}x"
        rows.append(out)
    return pd.DataFrame(rows).fillna("")
