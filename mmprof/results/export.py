"""Export runs as one tidy file for a paper: provenance, spec columns, metrics, note."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mmprof.errors import UserError
from mmprof.results import render, schema
from mmprof.results.report import spec_like
from mmprof.results.store import Run, write_text_atomic

EXPORT_FORMATS = ("csv", "latex", "markdown")


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
    frames = [run.df.assign(**provenance(run)) for run in runs]
    out = pd.concat(frames, ignore_index=True, sort=False).fillna("")
    rest = [c for c in out.columns if c not in schema.PROVENANCE_COLUMNS and c not in ("status", "note")]
    specs = spec_like(rest)
    order = [*schema.PROVENANCE_COLUMNS, "status", *specs, *(c for c in rest if c not in specs), "note"]
    for c in order:
        if c not in out.columns:
            out[c] = ""
    return out[order]


def export(runs: list[Run], fmt: str, dest: Path) -> int:
    """Write the tidy frame to `dest` atomically (a temp file renamed into place). Returns rows written."""
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"unknown export format {fmt!r}")
    frame = tidy(runs)
    text = render.RENDERERS[fmt](frame)
    try:
        write_text_atomic(Path(dest), text)
    except OSError as e:
        raise UserError(f"cannot write {dest}: {e.strerror or e}") from None
    return len(frame)
