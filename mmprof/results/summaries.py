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
    """mmfree-fused, mmfree-vanilla or transformer (+ckpt with activation checkpointing): what a row measured."""
    impl = row.get("bitlinear")
    label = f"{row['arch']}-{impl}" if isinstance(impl, str) and impl else str(row["arch"])
    return label + ("+ckpt" if row.get("checkpointing") == "layer" else "")


def job_rows(df: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: a multi-process run's summary rows (rank 'all'), else every row."""
    if "row_kind" in df and (df["row_kind"] == "summary").any():
        return df[df["row_kind"] == "summary"]
    return df


def train_memory_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per batch: peak GiB of each implementation, fused vs vanilla and fused vs Transformer++."""
    df = job_rows(df).copy()
    df["impl"] = [impl_label(r) for _, r in df.iterrows()]
    rows = []
    for batch, group in df.groupby("batch", sort=True):
        by = {r["impl"]: r for _, r in group.iterrows()}
        out = {"batch": int(batch)}
        for impl in sorted(by):
            r = by[impl]
            out[f"{impl} peak GiB"] = _fmt(r.get("peak_alloc_gib")) if r["status"] == "ok" else r["status"]
        f, v, t = by.get("mmfree-fused"), by.get("mmfree-vanilla"), by.get("transformer")
        ok = lambda r: r is not None and r["status"] == "ok"  # noqa: E731
        if ok(f) and ok(v):
            out["fused vs vanilla: peak"] = _pct(f["peak_alloc_gib"], v["peak_alloc_gib"])
            out["fused vs vanilla: activations"] = _pct(f.get("act_mem_gib"), v.get("act_mem_gib"))
            out["fused vs vanilla: speed"] = _pct(f.get("tokens_per_s"), v.get("tokens_per_s"))
        if ok(f) and ok(t):
            out["fused vs transformer: peak"] = _pct(f["peak_alloc_gib"], t["peak_alloc_gib"])
            out["fused vs transformer: speed"] = _pct(f.get("tokens_per_s"), t.get("tokens_per_s"))
        rows.append(out)
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
