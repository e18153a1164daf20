"""Reading a measurements CSV back safely: torn final rows found, every cell checked against the schema.

A row is written whole (one write of one complete line); a crash or a full disk can still leave the
last line cut. That final line (no newline at its end, or the wrong number of fields) is a *torn
row*: readers skip it and say so, `--resume` truncates it away and measures it again. Any other
row that does not fit the header or the schema's types is an error naming file, line and column.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

from mmprof.errors import UserError
from mmprof.results import schema

_INT = re.compile(r"-?\d+")
_WHAT = {"int": "an integer", "flag": "0 or 1", "rank": "an integer or 'all'", "float": "a finite number"}


@dataclass(frozen=True)
class TornRow:
    """The cut final row of a CSV: its line number, the byte offset it starts at, and why it is torn."""

    line: int
    offset: int
    reason: str

    def describe(self, path: Path) -> str:
        return f"{path}: line {self.line} is a torn row ({self.reason}; cut mid-write)"


@dataclass(frozen=True)
class CheckedCsv:
    text: str                 # header and complete rows, the torn row left out
    torn: TornRow | None


def cell_ok(kind: str, cell: str) -> bool:
    if cell == "" or kind == "text":
        return True
    if kind == "int":
        return bool(_INT.fullmatch(cell))
    if kind == "flag":
        return cell in ("0", "1")
    if kind == "rank":
        return cell == "all" or bool(_INT.fullmatch(cell))
    try:
        return math.isfinite(float(cell))
    except ValueError:
        return False


def check_csv(path: Path, kind_of=schema.column_type, status: bool = True) -> CheckedCsv:
    """Read `path`, find a torn final row, and check every other row's width, status and cell types.

    `kind_of(column)` gives a column's type (the results schema's by default); `status`: whether
    the file must have a `status` column (measurements do; time series do not)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"no such file: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"malformed CSV {path}: not UTF-8 text at byte {e.start}") from None
    if not text.strip():
        raise UserError(f"malformed CSV {path}: the file is empty")
    starts = [0] + [m.end() for m in re.finditer("\n", text)]     # char offset of every line
    torn = None
    complete = text
    if not text.endswith("\n"):
        cut = starts[-1]
        if cut == 0:
            raise UserError(f"malformed CSV {path}: the header line is cut (no newline)")
        torn = TornRow(line=len(starts), offset=len(text[:cut].encode()), reason="no newline at its end")
        complete = text[:cut]
    records = _records(complete, path)
    header, rows = records[0][1], records[1:]
    if status and "status" not in header:
        raise UserError(f"malformed CSV {path}: no 'status' column")
    if torn is None and rows and len(rows[-1][1]) != len(header):
        line, fields = rows.pop()
        torn = TornRow(line=line, offset=len(text[:starts[line - 1]].encode()),
                       reason=f"{len(fields)} fields, the header has {len(header)}")
        complete = text[:starts[line - 1]]
    kinds = [kind_of(c) for c in header]
    for line, fields in rows:
        if len(fields) != len(header):
            raise UserError(f"malformed CSV {path}: line {line} has {len(fields)} fields, the header has {len(header)}")
        for col, kind, cell in zip(header, kinds, fields):
            if status and col == "status" and cell not in schema.STATUS_VALUES:
                raise UserError(f"malformed CSV {path}: line {line}, column 'status': unknown status {cell!r}")
            if not cell_ok(kind, cell):
                raise UserError(f"malformed CSV {path}: line {line}, column {col!r}: {cell!r} is not {_WHAT[kind]}")
    return CheckedCsv(text=complete, torn=torn)


def _records(text: str, path: Path) -> list[tuple[int, list[str]]]:
    """(first line number, fields) of every non-blank record."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    out = []
    line = 1
    try:
        for fields in reader:
            if fields:
                out.append((line, fields))
            line = reader.line_num + 1
    except csv.Error as e:
        raise UserError(f"malformed CSV {path}: line {reader.line_num}: {e}") from None
    if not out:
        raise UserError(f"malformed CSV {path}: no header")
    return out


def series_kind(column: str) -> str:
    """Cell types of the time series (power_trace.csv, phases.csv): every column a number but the label."""
    return "int" if column == "gpu" else "text" if column == "label" else "float"


def read_series(path: Path):
    """A time-series CSV as a DataFrame, every cell checked; a torn final line is left out."""
    import pandas as pd

    checked = check_csv(path, series_kind, status=False)
    return pd.read_csv(io.StringIO(checked.text))
