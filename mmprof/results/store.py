"""Run folders: one per measuring command; rows appended and flushed as each configuration finishes.

A run folder holds `measurements.csv`, `meta.json` and optional time-series CSVs. A run killed mid-way
keeps every finished row (each row is one write of one complete line, then fsynced) and stays readable;
a final line cut all the same (a full disk) is a torn row that readers skip and `resume` truncates.
An existing run folder is never overwritten: it is only ever appended to through `resume`, and only
by one writer at a time (an advisory lock, mmprof.results.lock).

MMPROF_TEST_TEAR_ROW_S (tests only): each row is written in two halves with that many seconds between,
so a test can kill a sweep while a row is half on disk.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from mmprof import __version__
from mmprof.errors import UserError
from mmprof.settings import env_seconds
from mmprof.results import schema
from mmprof.results.lock import RunLock
from mmprof.results.validate import TornRow, check_csv

MEASUREMENTS = "measurements.csv"
META = "meta.json"
DEFAULT_ROOT = Path("results") / "runs"


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def default_run_dir(command: str, root: Path = DEFAULT_ROOT) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = Path(root) / f"{stamp}-{command}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def git_commit() -> str | None:
    """The checkout's HEAD; MMPROF_GIT_COMMIT names it where the copy has no .git (a remote GPU box)."""
    if os.environ.get("MMPROF_GIT_COMMIT"):
        return os.environ["MMPROF_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def git_dirty() -> bool | None:
    """Whether tracked files differ from the checkout's HEAD (a copy whose .git lags its files: dirty)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def source_sha256(root: Path | None = None) -> str:
    """A digest of the mmprof package's source (.py and .toml files, by path; `root`: another folder):
    it names the code that measured where no git history came along or it lags; compare it with this
    function run at a commit."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".toml") and "__pycache__" not in p.parts):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return ""
        if value != 0 and abs(value) >= 1e6:
            return f"{value:.1f}"
        return f"{value:.6g}"
    return str(value)


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary name beside `path`, fsync, rename into place: never a half-written file.
    Raises OSError (the temporary file removed) when it cannot."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str))


@dataclass
class RunWriter:
    """Appends rows to one run folder's measurements.csv, flushing each row to disk."""

    path: Path
    command: str
    columns: list[str]
    meta: dict = field(default_factory=dict)
    resumed: "Run | None" = None  # the run as it was when resumed (its rows are not measured again)
    lock: RunLock | None = None   # held from create/resume until finish/close
    notices: list[str] = field(default_factory=list)  # one-line things the command should tell the user

    @classmethod
    def create(cls, path: Path | str, command: str, *, argv: Iterable[str] | None = None,
               extra_meta: dict | None = None) -> "RunWriter":
        path = Path(path)
        if path.exists() and (path / MEASUREMENTS).exists():
            raise UserError(f"run folder {path} already exists; use --resume {path} to add to it")
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UserError(f"cannot write run folder {path}: {e.strerror or e}") from None
        lock = RunLock.acquire(path)
        if (path / MEASUREMENTS).exists():       # another command created it while this one looked
            lock.release()
            raise UserError(f"run folder {path} already exists; use --resume {path} to add to it")
        columns = schema.columns(command)
        meta = {
            "command": command,
            "argv": list(argv) if argv is not None else list(sys.argv),
            "mmprof_version": __version__,
            "git_commit": git_commit(),
            "git_dirty": git_dirty(),
            "source_sha256": source_sha256(),
            "host": socket.gethostname(),
            "python": sys.version.split()[0],
            "start_utc": utc_now(),
            "end_utc": None,
            "columns": columns,
        }
        meta.update(extra_meta or {})
        writer = cls(path=path, command=command, columns=columns, meta=meta, lock=lock)
        _write_json_atomic(path / META, meta)
        with open(path / MEASUREMENTS, "w", newline="") as f:
            csv.writer(f).writerow(columns)
            f.flush()
            os.fsync(f.fileno())
        return writer

    @classmethod
    def resume(cls, path: Path | str, command: str) -> "RunWriter":
        """Lock the folder, read it (a torn final row is truncated away, to be measured again), reopen it."""
        path = Path(path)
        if not path.is_dir():
            read_run(path)                       # says what is missing
            raise UserError(f"--resume takes a run folder, not a file: {path}")
        lock = RunLock.acquire(path)
        try:
            run = read_run(path)
            if run.meta.get("command") != command:
                raise UserError(f"run {path} was written by {run.meta.get('command')!r}, not {command!r}")
            notices = []
            if run.torn is not None:
                truncate_torn(path / MEASUREMENTS, run.torn)
                notices.append(f"{run.torn.describe(path / MEASUREMENTS)}: removed; "
                               "that configuration is measured again")
                run.torn = None
            meta = dict(run.meta)
            meta.setdefault("resumed_utc", []).append(utc_now())
            meta.setdefault("resumed_commits", []).append(git_commit())
            meta.setdefault("resumed_sources_sha256", []).append(source_sha256())
            writer = cls(path=path, command=command, columns=list(run.columns), meta=meta, resumed=run,
                         lock=lock, notices=notices)
            _write_json_atomic(writer.path / META, meta)
        except BaseException:
            lock.release()
            raise
        return writer

    def append(self, row: dict[str, Any]) -> None:
        unknown = set(row) - set(self.columns)
        if unknown:
            raise ValueError(f"columns not in the {self.command} schema: {sorted(unknown)}")
        status = row.get("status")
        if status not in schema.STATUS_VALUES:
            raise ValueError(f"row status must be one of {schema.STATUS_VALUES}, got {status!r}")
        buf = io.StringIO()
        csv.writer(buf).writerow([_format_cell(row.get(c)) for c in self.columns])
        _append_whole(self.path / MEASUREMENTS, buf.getvalue().encode())

    def update_meta(self, **items: Any) -> None:
        self.meta.update(items)
        _write_json_atomic(self.path / META, self.meta)

    def finish(self) -> None:
        self.update_meta(end_utc=utc_now())
        self.close()

    def close(self) -> None:
        """Release the folder's lock (finish does; the kernel does when the process dies)."""
        if self.lock is not None:
            self.lock.release()

    def trace_path(self, name: str) -> Path:
        """A path for a time series in the run folder that never overwrites an existing file."""
        path = self.path / name
        n = 1
        while path.exists():
            n += 1
            path = self.path / f"{Path(name).stem}-{n}{Path(name).suffix}"
        return path


def _append_whole(path: Path, data: bytes) -> None:
    """Append one complete line with O_APPEND writes, then fsync (MMPROF_TEST_TEAR_ROW_S: in two halves)."""
    pause_s = env_seconds("MMPROF_TEST_TEAR_ROW_S", None)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        if pause_s:
            half, data = data[: len(data) // 2], data[len(data) // 2:]
            _write_all(fd, half)
            os.fsync(fd)
            time.sleep(pause_s)
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def truncate_torn(csv_path: Path, torn: TornRow) -> None:
    """Cut a torn final row off the file, so the next append starts on a fresh line."""
    with open(csv_path, "r+b") as f:
        f.truncate(torn.offset)
        f.flush()
        os.fsync(f.fileno())


@dataclass
class Run:
    path: Path
    meta: dict
    df: pd.DataFrame
    torn: TornRow | None = None    # a cut final row, left out of df

    def torn_notice(self) -> str | None:
        """One line for readers (report, export, plot) when a torn row was skipped."""
        if self.torn is None:
            return None
        csv_path = self.path / MEASUREMENTS if self.path.is_dir() else self.path
        return f"{self.torn.describe(csv_path)}: skipped"

    @property
    def run_id(self) -> str:
        return self.path.name if self.path.is_dir() else self.path.stem

    @property
    def command(self) -> str | None:
        return self.meta.get("command")

    @property
    def columns(self) -> list[str]:
        return list(self.df.columns)


def read_csv(path: Path, *, raw: bool = False) -> tuple[pd.DataFrame, TornRow | None]:
    """Read a measurements CSV, every cell checked against the schema (mmprof.results.validate); a torn
    final row is left out and returned beside the frame. `raw=True` keeps every cell as the exact
    stored text ('' when empty)."""
    checked = check_csv(path)
    buf = io.StringIO(checked.text)
    try:
        if raw:
            df = pd.read_csv(buf, dtype=str, keep_default_na=False)
        else:
            df = pd.read_csv(buf, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"malformed CSV {path}: {first}") from None
    return df, checked.torn


def read_run(path: Path | str, *, raw: bool = False) -> Run:
    """Read a run folder (or a bare measurements CSV) into a Run with a pandas DataFrame.

    `raw=True` keeps cells as the stored text, so renderings show exactly the stored numbers."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no such run: {path}")
    if path.is_dir():
        folder, csv_path = path, path / MEASUREMENTS
        if not csv_path.exists():
            raise UserError(f"not a run folder (no {MEASUREMENTS}): {path}")
    elif path.name == MEASUREMENTS:
        folder, csv_path = path.parent, path
    else:  # a bare CSV, no meta
        return Run(path, {}, *read_csv(path, raw=raw))
    return Run(folder, _read_meta(folder / META), *read_csv(csv_path, raw=raw))


def _read_meta(meta_path: Path) -> dict:
    if not meta_path.exists():
        return {}
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"malformed {meta_path}: {e.msg} at line {e.lineno}") from None


def done_keys(run: Run, key_columns: list[str]) -> set[tuple[str, ...]]:
    """Spec keys of the rows already in a run, as strings, for --resume."""
    df = run.df
    missing = [c for c in key_columns if c not in df.columns]
    if missing:
        raise UserError(f"run {run.path} lacks columns {missing}")
    return {tuple(_key_cell(v) for v in rec) for rec in df[key_columns].itertuples(index=False)}


def _key_cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def row_key(row: dict[str, Any], key_columns: list[str]) -> tuple[str, ...]:
    return tuple(_key_cell(row.get(c)) for c in key_columns)
