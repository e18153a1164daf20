"""Render a text frame as a Rich table, CSV, JSON, Markdown or LaTeX, cell for cell the same."""

from __future__ import annotations

import io
import json

import pandas as pd
from rich.console import Console
from rich.table import Table

from mmprof.errors import UserError

FORMATS = ("table", "csv", "json", "markdown", "latex")


def to_csv(df: pd.DataFrame) -> str:
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    return buf.getvalue()


def to_json(df: pd.DataFrame) -> str:
    return json.dumps(df.to_dict(orient="records"), indent=2) + "\n"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(_md_cell(c) for c in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for rec in df.itertuples(index=False):
        lines.append("| " + " | ".join(_md_cell(v) for v in rec) + " |")
    return "\n".join(lines) + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}


def _tex(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def to_latex(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = [r"\begin{tabular}{" + "l" * len(cols) + "}", r"\toprule",
             " & ".join(_tex(c) for c in cols) + r" \\", r"\midrule"]
    for rec in df.itertuples(index=False):
        lines.append(" & ".join(_tex(v) for v in rec) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


NOTE_WIDTH = 32   # the terminal table shows each note in one line this wide; other formats keep it whole


def to_table(df: pd.DataFrame, title: str | None = None, console: Console | None = None) -> str:
    cut = "note" in df.columns and any(len(str(v)) > NOTE_WIDTH for v in df["note"])
    table = Table(title=title, show_lines=False,
                  caption="notes shortened: the full text is in the CSV (--format csv)" if cut else None)
    for c in df.columns:
        if c == "note":      # one line a row: the note is the widest cell by far
            table.add_column("note", overflow="ellipsis", no_wrap=True, max_width=NOTE_WIDTH)
        else:
            table.add_column(str(c), overflow="fold")
    for rec in df.itertuples(index=False):
        table.add_row(*[str(v) for v in rec])
    console = console or Console(file=io.StringIO(), width=max(120, 14 * len(df.columns)))
    console.print(table)
    return console.file.getvalue() if isinstance(console.file, io.StringIO) else ""


RENDERERS = {"csv": to_csv, "json": to_json, "markdown": to_markdown, "latex": to_latex}


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def render(df: pd.DataFrame, fmt: str, title: str | None = None) -> str:
    check_format(fmt)
    return to_table(df, title) if fmt == "table" else RENDERERS[fmt](df)
