"""The `mmprof` command line: thin; parses options, builds a spec and calls into the packages."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from mmprof import __version__
from mmprof.errors import UserError


class OneLineErrors(click.Group):
    """Every usage or input error is one line on stderr and exit code 2, never a traceback."""

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        try:
            rv = super().main(args=args, prog_name=prog_name, standalone_mode=False, **extra)
        except UserError as e:
            _fail(str(e))
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.ctx.get_help() if e.ctx else str(e))
            sys.exit(0)
        except click.UsageError as e:
            _fail(e.format_message())
        except click.ClickException as e:
            _fail(e.format_message())
        except click.exceptions.Abort:
            _fail("aborted")
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        if isinstance(rv, int) and rv:
            sys.exit(rv)
        sys.exit(0)


def _fail(message: str) -> None:
    click.echo(f"error: {message.strip().splitlines()[0] if message.strip() else 'failed'}", err=True)
    sys.exit(2)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mmprof")
def main() -> None:
    """Measure what MatMul-free LMs really cost on GPUs, against a Transformer++ of the same size."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print the inventory as JSON")
def env(as_json: bool) -> None:
    """GPUs, NVML power/energy support, CPU, RAPL and library versions."""
    from mmprof.profiler import system_info
    from mmprof.results.env_view import env_text

    info = system_info()
    click.echo(json.dumps(info, indent=2, default=str) if as_json else env_text(info))


@main.command()
@click.argument("runs", nargs=-1, required=True)
@click.option("--baseline", help="COLUMN=VALUE: rows compared against, e.g. bitlinear=vanilla")
@click.option("--format", "fmt", default="table", show_default=True,
              help="table | csv | json | markdown | latex")
@click.option("--columns", help="comma-separated columns to show (default: the informative ones)")
def report(runs: tuple[str, ...], baseline: str | None, fmt: str, columns: str | None) -> None:
    """Show one or more runs (folders or CSVs), optionally relative to baseline rows."""
    from mmprof.results import FORMATS, build_report, parse_baseline, read_run, render

    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    loaded = [read_run(r, raw=True) for r in runs]
    cols = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
    frame = build_report(loaded, parse_baseline(baseline), cols)
    title = ", ".join(r.run_id for r in loaded) if fmt == "table" else None
    click.echo(render(frame, fmt, title=title), nl=False)


@main.command()
@click.argument("runs", nargs=-1, required=True)
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="write a tidy CSV")
@click.option("--latex", "latex_path", type=click.Path(dir_okay=False), help="write a LaTeX tabular")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False), help="write a Markdown table")
def export(runs: tuple[str, ...], csv_path: str | None, latex_path: str | None, md_path: str | None) -> None:
    """Concatenate runs into one tidy file for a paper (provenance on every row)."""
    from mmprof.results import export as export_runs, read_run

    targets = [(f, p) for f, p in (("csv", csv_path), ("latex", latex_path), ("markdown", md_path)) if p]
    if len(targets) != 1:
        raise UserError("give exactly one of --csv FILE, --latex FILE, --markdown FILE")
    fmt, dest = targets[0]
    loaded = [read_run(r, raw=True) for r in runs]
    n = export_runs(loaded, fmt, Path(dest))
    click.echo(f"wrote {n} rows from {len(loaded)} run(s) to {dest}")

