"""Run folders, the CSV schema, report frames, renderings and export."""

from mmprof.results.export import export, tidy
from mmprof.results.render import FORMATS, check_format, render
from mmprof.results.report import build_report, parse_baseline
from mmprof.results.store import (
    DEFAULT_ROOT,
    Run,
    RunWriter,
    default_run_dir,
    done_keys,
    read_run,
    row_key,
)

__all__ = [
    "DEFAULT_ROOT", "FORMATS", "Run", "RunWriter", "build_report", "check_format", "default_run_dir", "done_keys",
    "export", "parse_baseline", "read_run", "render", "row_key", "tidy",
]
