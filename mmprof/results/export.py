"""Export runs as one tidy file for a paper: provenance, spec columns, metrics, note."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from mmprof.errors import UserError
from mmprof.results import render, schema
from mmprof.results.store import Run

EXPORT_FORMATS = {"csv": render.to_csv, "latex": render.to_latex, "markdown": render.to_markdown}


def provenance(run: Run) -> dict[str, str]:
    meta = run.meta
    return {
        "run_id": run.run_id,
        "command": str(meta.get("command") or ""),
        "gpu": str(meta.get("gpu") or ""),
        "driver": str(meta.get("driver") or ""),
        "mmprof_version": str(meta.get("mmprof_version") or ""),
    }


def tidy(runs: list[Run]) -> pd.DataFrame:
    """All runs in one frame of stored text cells, columns ordered provenance, status, spec, metrics, note."""
    frames, spec_cols, metric_cols = [], [], []
    for run in runs:
        df = run.df.copy()
        for k, v in reversed(list(provenance(run).items())):
            df.insert(0, k, v)
        frames.append(df)
        command = run.command or ""
        known_specs = schema.spec_columns(command)
        known_metrics = schema.metric_columns(command)
        for c in run.df.columns:
            if c in ("status", "note"):
                continue
            is_spec = c in known_specs or (not known_metrics and not known_specs and c in _all_specs())
            target = spec_cols if is_spec else metric_cols
            if c not in spec_cols and c not in metric_cols:
                target.append(c)
    order = [*schema.PROVENANCE_COLUMNS, "status", *spec_cols, *metric_cols, "note"]
    out = pd.concat(frames, ignore_index=True, sort=False).fillna("")
    for c in order:
        if c not in out.columns:
            out[c] = ""
    return out[order]


def _all_specs() -> set[str]:
    return {c for cols in schema.SPEC_COLUMNS.values() for c in cols}


def export(runs: list[Run], fmt: str, dest: Path) -> int:
    """Write the tidy frame to `dest` atomically (a temp file renamed into place). Returns rows written."""
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"unknown export format {fmt!r}")
    frame = tidy(runs)
    text = EXPORT_FORMATS[fmt](frame)
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise UserError(f"cannot write {dest}: {e.strerror or e}") from None
    return len(frame)
