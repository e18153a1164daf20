"""The reproduce report: report.md and a self-contained report.html (figures embedded as base64 PNG)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mmprof.errors import UserError
from mmprof.results import plots
from mmprof.results.claims import claim_table
from mmprof.results.render import to_markdown
from mmprof.results.store import Run, write_text_atomic
from mmprof.results.summaries import decode_summary, train_memory_summary

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
SUMMARY_PNG = "summary.png"        # the report's figures in one picture, for a README
VERDICT_CLASS = {"reproduced": "ok", "not reproduced": "bad", "not measurable on this hardware": "na",
                 "not measured": "na", "not claimed by the paper": "info"}


@dataclass
class Figure:
    name: str          # file name in the report folder
    title: str
    path: Path | None = None
    why_not: str = ""  # why it was not drawn


@dataclass
class ReportInput:
    folder: Path
    source: dict
    settings: list[dict]
    claims: pd.DataFrame               # claims.claim_rows(...)
    steps: pd.DataFrame                # one row per planned configuration: what happened to it
    meta: dict
    train: Run | None = None
    decode: Run | None = None
    notes: list[str] = field(default_factory=list)


def draw_figures(r: ReportInput) -> list[Figure]:
    """Every figure the report shows; one that cannot be drawn says why instead."""
    figs = [Figure("train-memory-time-vs-batch.png", "Training: memory and step time vs batch"),
            Figure("decode-vs-size.png", "Decoding: per-token latency and memory vs model size"),
            Figure("decode-power-window.png", "Power over time of one decode window")]
    jobs = [(r.train, plots.plot_train_memory, {}), (r.decode, plots.plot_decode_vs_size, {}),
            (r.decode, plots.plot_decode_window, {"prefer": "mmfree 13b"})]
    for fig, (run, fn, kw) in zip(figs, jobs):
        if run is None:
            fig.why_not = "no run of this panel (see the notes)"
            continue
        try:
            fig.path = fn(run, r.folder / fig.name, **kw)
        except UserError as e:
            fig.why_not = str(e)
    return figs


def provenance(meta: dict) -> list[tuple[str, str]]:
    commits = meta.get("commits") or [meta.get("git_commit") or "unknown"]
    commands = [" ".join(c.get("argv", [])) for c in meta.get("calls", [])] or [" ".join(meta.get("argv", []))]
    system = meta.get("system") if isinstance(meta.get("system"), dict) else {}
    return [("GPU", meta.get("gpu") or "none (no GPU visible)"), ("driver", meta.get("driver") or ""),
            ("mmprof commits (every call that wrote the folder)", ", ".join(commits)),
            ("mmprof version", meta.get("mmprof_version", "")), ("torch", system.get("torch", "")),
            ("run", meta.get("mode", "")), ("device", meta.get("device", "")),
            ("started (UTC)", meta.get("start_utc", "")), ("finished (UTC)", meta.get("end_utc") or "not finished"),
            ("commands (in order)", "; ".join(commands))]


def write_summary(r: ReportInput, figs: list[Figure]) -> Path | None:
    drawn = [f.path for f in figs if f.path]
    if not drawn:
        return None
    on = str(r.claims["measured on"].iloc[0]) if "measured on" in r.claims and len(r.claims) else ""
    return plots.tile_figures(drawn, r.folder / SUMMARY_PNG, f"mmprof reproduce, {on}")


def write_report(r: ReportInput) -> tuple[Path, Path]:
    figs = draw_figures(r)
    write_summary(r, figs)
    md = _markdown(r, figs)
    page = _html(r, figs)
    write_text_atomic(r.folder / REPORT_MD, md)
    write_text_atomic(r.folder / REPORT_HTML, page)
    return r.folder / REPORT_MD, r.folder / REPORT_HTML


def _settings_frame(settings: list[dict]) -> pd.DataFrame:
    cols = ["panel", "name", "paper", "used", "source"]
    return pd.DataFrame([{c: s.get(c, "") for c in cols} for s in settings], columns=cols)


def _title(source: dict) -> str:
    return (f"Reproducing \"{source.get('title', '')}\" ({source.get('authors', '').split(',')[0]} et al. "
            f"{source.get('year', '')}, arXiv {source.get('arxiv', '')})")


def panels(r: ReportInput) -> list[tuple[str, pd.DataFrame]]:
    """The measured panels as the train-memory and decode-power summaries show them."""
    out = []
    if r.train is not None and len(r.train.df):
        df = r.train.df[r.train.df["status"].isin(["ok", "oom"])]
        if len(df):
            out.append(("Training panel (peak allocated GiB per batch; changes relative)", train_memory_summary(df)))
    if r.decode is not None and len(r.decode.df):
        summary = decode_summary(r.decode.df)
        if len(summary):
            out.append(("Inference panel", summary))
    return out


def _csvs(r: ReportInput) -> list[str]:
    return sorted(str(p.relative_to(r.folder)) for p in r.folder.rglob("*.csv"))


def _markdown(r: ReportInput, figs: list[Figure]) -> str:
    out = [f"# {_title(r.source)}", "", f"Paper: {r.source.get('url', '')} · code: {r.source.get('code', '')}", ""]
    out += ["## Measured on", ""] + [f"- {k}: {v}" for k, v in provenance(r.meta) if v] + [""]
    if r.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in r.notes] + [""]
    out += ["## Claims", "", to_markdown(claim_table(r.claims)), "",
            "Verdict rule: each claim's rule and tolerance are in mmprof/results/claims.toml "
            "(within / at least / at most the paper's figure, the tolerance stated in the reason).", ""]
    for title, frame in panels(r):
        out += [f"## {title}", "", to_markdown(frame.astype(str)), ""]
    out += ["## Settings (as the paper states them, and as run here)", "", to_markdown(_settings_frame(r.settings)), ""]
    out += ["## Figures", ""]
    for f in figs:
        out += [f"### {f.title}", "", f"![{f.title}]({f.name})" if f.path else f"Not drawn: {f.why_not}", ""]
    out += ["## Steps", "", to_markdown(r.steps.fillna("").astype(str)) if len(r.steps) else "none", ""]
    out += ["## Files", ""] + [f"- `{c}`" for c in _csvs(r)] + ["- `meta.json`", ""]
    return "\n".join(out)


def _table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for rec in df.itertuples(index=False):
        cells = []
        for col, v in zip(df.columns, rec):
            cls = f' class="{VERDICT_CLASS.get(str(v), "")}"' if col == "verdict" else ""
            cells.append(f"<td{cls}>{html.escape(str(v))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:.86em}td,th{border:1px solid #ccc;padding:.3em .5em;
vertical-align:top;text-align:left}th{background:#f3f3f3}td.ok{background:#d8f5d0}td.bad{background:#f8d4d0}
td.na{background:#eee}td.info{background:#dde8f8}img{max-width:100%;border:1px solid #ddd}
.note{background:#fff6d8;padding:.5em 1em;border-left:4px solid #e0b000}"""


def _html(r: ReportInput, figs: list[Figure]) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(_title(r.source))}</title>",
             f"<style>{CSS}</style></head><body>", f"<h1>{e(_title(r.source))}</h1>",
             f"<p>Paper: <a href='{e(r.source.get('url', ''))}'>{e(r.source.get('url', ''))}</a> · code: "
             f"<a href='{e(r.source.get('code', ''))}'>{e(r.source.get('code', ''))}</a></p>",
             "<h2>Measured on</h2><ul>" + "".join(f"<li>{e(k)}: {e(str(v))}</li>" for k, v in provenance(r.meta) if v)
             + "</ul>"]
    if r.notes:
        parts.append("<h2>Notes</h2>" + "".join(f"<p class='note'>{e(n)}</p>" for n in r.notes))
    parts += ["<h2>Claims</h2>", _table(claim_table(r.claims)),
              "<p>Each claim's rule and tolerance are in mmprof/results/claims.toml; the reason states the bound.</p>",
              *[f"<h2>{e(title)}</h2>" + _table(frame.astype(str)) for title, frame in panels(r)],
              "<h2>Settings (as the paper states them, and as run here)</h2>", _table(_settings_frame(r.settings)),
              "<h2>Figures</h2>"]
    for f in figs:
        parts.append(f"<h3>{e(f.title)}</h3>" + (_img(f.path, f.title) if f.path else f"<p>Not drawn: {e(f.why_not)}</p>"))
    parts += ["<h2>Steps</h2>", _table(r.steps.fillna("").astype(str)) if len(r.steps) else "<p>none</p>",
              "<h2>Files</h2><ul>" + "".join(f"<li><code>{e(c)}</code></li>" for c in _csvs(r))
              + "<li><code>meta.json</code></li></ul>", "</body></html>"]
    return "\n".join(parts) + "\n"
