"""The `mmprof` command line: thin; parses options, builds a spec and calls into the packages."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click

from mmprof import __version__
from mmprof.errors import UserError
from mmprof.runners.options import MAX_SECONDS, MAX_STEPS, FiniteFloat


class OneLineErrors(click.Group):
    """Every usage or input error is one line on stderr and exit code 2, never a traceback."""

    def main(self, args=None, prog_name=None, **extra):
        global _WRITER
        extra.pop("standalone_mode", None)
        _WRITER = None
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
            unfinished = _WRITER is not None and _WRITER.lock is not None and _WRITER.lock.held
            _fail(f"aborted; the finished rows are kept: add --resume {_WRITER.path} to the same command "
                  "to measure the rest" if unfinished else "aborted")
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        finally:
            if _WRITER is not None:
                _WRITER.close()          # the run folder's lock (a finished writer has released it)
        if isinstance(rv, int) and rv:
            sys.exit(rv)
        sys.exit(0)


_WRITER = None     # the RunWriter of the run folder a command writes (named if it is interrupted)


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
    from mmprof.results import build_report, check_format, parse_baseline, render

    check_format(fmt)
    loaded = _read_runs(runs, raw=True)
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
    from mmprof.results import export as export_runs

    targets = [(f, p) for f, p in (("csv", csv_path), ("latex", latex_path), ("markdown", md_path)) if p]
    if len(targets) != 1:
        raise UserError("give exactly one of --csv FILE, --latex FILE, --markdown FILE")
    fmt, dest = targets[0]
    loaded = _read_runs(runs, raw=True)
    n = export_runs(loaded, fmt, Path(dest))
    click.echo(f"wrote {n} rows from {len(loaded)} run(s) to {dest}")


def _read_runs(paths, raw: bool = False) -> list:
    """Read runs; a torn final row (cut mid-write) is skipped, with one line on stderr for each."""
    from mmprof.results import read_run

    loaded = [read_run(p, raw=raw) for p in paths]
    for run in loaded:
        if run.torn_notice():
            click.echo(f"warning: {run.torn_notice()}", err=True)
    return loaded


def _open_writer(command: str, out: str | None, resume: str | None, device: str, spec=None,
                 swept: set[str] = frozenset()):
    """A new run folder (or the resumed one, locked, checked against `spec`) with GPU and driver in its
    meta.json; `swept`: the spec's list fields a resume may extend."""
    global _WRITER
    from mmprof.results import RunWriter, default_run_dir
    from mmprof.runners.options import check_path_option, check_resume, spec_record

    check_path_option("out", out)
    check_path_option("resume", resume)
    if out and resume:
        raise UserError("give --out or --resume, not both")
    if resume:
        writer = RunWriter.resume(resume, command)
        try:
            if spec is not None:
                check_resume(writer.resumed, spec, swept)
        except UserError:
            writer.close()
            raise
        for notice in writer.notices:
            click.echo(f"note: {notice}", err=True)
        _WRITER = writer
        return writer
    from mmprof.profiler import cuda_index, system_info

    info = system_info()
    meta = {"system": info}
    if spec is not None:
        meta["spec"] = spec_record(spec)
    index = cuda_index(device)
    if index is not None:
        gpu = next((g for g in info["gpus"] if g.get("index") == index), {})
        meta.update(gpu=gpu.get("name"), driver=gpu.get("driver"))
    path = Path(out) if out else default_run_dir(command)
    _WRITER = RunWriter.create(path, command, argv=sys.argv, extra_meta=meta)
    return _WRITER


def _checkpoint_shape(ctx, checkpoint: str, archs: str):
    """(folder, arch, ModelConfig) of --checkpoint; --size may not be given beside it, and --arch
    must include the checkpoint's architecture (the only one measured)."""
    from mmprof.runners.sweep import parse_list
    from mmprof.workloads.checkpoint import read_config, resolve_checkpoint

    if ctx.get_parameter_source("size") is not click.core.ParameterSource.DEFAULT:
        raise UserError("give --size or --checkpoint, not both: the checkpoint's config.json sets the shape")
    folder = resolve_checkpoint(checkpoint)
    arch, cfg, _ = read_config(folder)
    if arch not in parse_list(archs, "arch", str, ("mmfree", "transformer")):
        raise UserError(f"checkpoint {checkpoint} is a {arch} model; --arch {archs} leaves it out")
    return folder, arch, cfg


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True)


def _sweep(writer, runner, spec, label: str, fmt: str, summarize, paper_claim: str) -> None:
    """Run a sweep into `writer` (skipping what a resumed run has), with a progress bar; then print it."""
    from mmprof.results import build_report, done_keys, read_run, render, row_key

    skip = done_keys(writer.resumed, runner.KEY_COLUMNS) if writer.resumed is not None else set()
    todo = runner.configs(spec)
    with _progress() as bar:
        task = bar.add_task(label, total=len(todo))

        def emit(row):
            writer.append(row)
            if row.get("row_kind") != "rank" or row.get("world_size", 1) == 1:   # one step per configuration
                bar.advance(task)

        runner.run(spec, emit, skip=skip, key=lambda r: row_key(r, runner.KEY_COLUMNS),
                   trace_path=writer.trace_path("power_trace.csv"),
                   on_start=lambda cfg: bar.update(task, description=f"{label} {cfg.label}"))
    writer.finish()
    click.echo(render(build_report([read_run(writer.path, raw=True)]), fmt,
                      title=str(writer.path) if fmt == "table" else None), nl=False)
    if fmt == "table":
        df = read_run(writer.path).df
        summary = summarize(df[df["status"].isin(["ok", "oom"])]) if len(df) else None
        if summary is not None and len(summary):
            click.echo(render(summary, "table", title=paper_claim), nl=False)
    click.echo(f"run folder: {writer.path}", err=True)


def _sweep_job(plan, make_runner, spec, command: str, out, resume, sweep_args: tuple, swept=frozenset()) -> None:
    """The sweep under torchrun: every rank measures; rank 0 alone opens the run folder, writes, prints."""
    from mmprof.runners.distributed import start

    job = start(plan.device)
    try:
        spec = dataclasses.replace(spec, device=job.device)
        runner = make_runner(job)
        writer = job.share_call(lambda: _open_writer(command, out, resume, job.device, spec, swept))
        if job.rank == 0:
            _sweep(writer, runner, spec, *sweep_args)
        else:
            runner.run(spec, lambda row: None)
    finally:
        job.finish()


@main.command("train-memory")
@click.option("--size", default="1.3b", show_default=True, help="tiny | 370m | 1.3b | 2.7b | 13b")
@click.option("--arch", default="mmfree,transformer", show_default=True)
@click.option("--bitlinear", default="vanilla,ref-fused,fused", show_default=True,
              help="vanilla | ref-fused | fused | naive (README: what each keeps for backward)")
@click.option("--batch", default="1,2,4,8,16,32", show_default=True)
@click.option("--seq", type=click.IntRange(min=1), default=2048, show_default=True)
@click.option("--steps", type=click.IntRange(min=1, max=MAX_STEPS), default=5, show_default=True,
              help="timed steps (more when needed to fill --min-window-s)")
@click.option("--warmup", type=click.IntRange(min=1, max=MAX_STEPS), default=2, show_default=True,
              help="untimed steps first (the first one allocates the optimizer state)")
@click.option("--device", default="auto", show_default=True, help="auto | cuda | cpu | meta")
@click.option("--gpus", default=None, help="GPU index (default 0)")
@click.option("--precision", type=click.Choice(["bf16-autocast", "bf16", "fp32"]), default="bf16-autocast",
              show_default=True)
@click.option("--estimate", type=click.Choice(["fast", "full", "beside"]), is_flag=False, flag_value="beside",
              default=None,
              help="bare: on a GPU, add the no-GPU estimate and its error; fast|full: also how it is made: fast "
                   "(default: three blocks traced, composed) or full (the whole step traced)")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="override the size's shape: layers, hidden, intermediate, heads, kv_heads, vocab (repeatable)")
@click.option("--breakdown", is_flag=True,
              help="print what is alive at each row's peak: parameters, gradients, optimizer state, "
                   "activations by module kind (GiB and bytes per token per layer)")
@click.option("--checkpointing", default="none", show_default=True,
              help="none,layer: activation checkpointing of every block (a list sweeps both)")
@click.option("--shard", type=click.Choice(["none", "fsdp"]), default="none", show_default=True,
              help="fsdp: FSDP2 under torchrun, one process per GPU (or its estimate with --device meta)")
@click.option("--world-size", type=click.IntRange(min=1), default=None,
              help="processes of the sharded job (required with --shard fsdp --device meta)")
@click.option("--min-window-s", type=FiniteFloat(min=0, max=MAX_SECONDS), default=5.0, show_default=True,
              help="the energy window is stretched (more steps) to at least this long")
@click.option("--idle-s", type=FiniteFloat(min=0, max=MAX_SECONDS), default=2.0, show_default=True)
@click.option("--peak-tflops", type=FiniteFloat(min=0, min_open=True), default=None,
              help="dense bf16 peak for MFU (default: the GPU's datasheet figure)")
@click.option("--out", default=None, help="run folder to create (default results/runs/<UTC>-train-memory)")
@click.option("--resume", default=None, help="add the missing configurations to this run folder")
@click.option("--format", "fmt", default="table", show_default=True, help="table | csv | json | markdown | latex")
@click.option("--checkpoint", default=None,
              help="checkpoint folder or cached Hub repo id: its config.json sets the shape (instead of --size)")
@click.pass_context
def train_memory(ctx, size, arch, bitlinear, batch, seq, steps, warmup, device, gpus, precision, estimate, overrides,
                 breakdown, checkpointing, shard, world_size, min_window_s, idle_s, peak_tflops, out, resume, fmt,
                 checkpoint) -> None:
    """Training memory, time and energy: the BitLinear implementations vs Transformer++."""
    from mmprof.results import check_format
    from mmprof.results.summaries import PAPER_TRAIN, train_memory_summary
    from mmprof.runners import train_memory as tm
    from mmprof.runners.options import check_device_choice, check_estimate, check_train_fits
    from mmprof.runners.shard_plan import plan as shard_plan
    from mmprof.settings import check_environment
    from mmprof.runners.sweep import parse_list, positive_int
    from mmprof.workloads import get_config
    from mmprof.workloads.checkpointing import CHECKPOINTING
    from mmprof.workloads.overrides import parse_overrides

    check_format(fmt)
    check_environment()
    check_device_choice(device, ("auto", "cuda", "cpu", "meta"), "train-memory")
    model = None
    if checkpoint:
        if shard != "none":
            raise UserError("--checkpoint with --shard fsdp is not supported yet; measure one GPU")
        _, arch, model = _checkpoint_shape(ctx, checkpoint, arch)
        size = checkpoint
    else:
        get_config(size)
    how = shard_plan(shard, world_size, device, gpus)
    check_estimate(estimate == "beside", how.device)
    spec = tm.TrainMemorySpec(
        size=size,
        archs=tuple(parse_list(arch, "arch", str, ("mmfree", "transformer"))),
        bitlinears=tuple(parse_list(bitlinear, "bitlinear", str, ("vanilla", "ref-fused", "fused", "naive"))),
        batches=tuple(parse_list(batch, "batch", positive_int)),
        seq=seq, steps=steps, warmup=warmup, device=how.device, precision=precision,
        estimate=estimate is not None and how.device != "meta", estimate_method=estimate if estimate in ("fast", "full") else "fast", overrides=parse_overrides(overrides),
        breakdown=breakdown, min_window_s=min_window_s, idle_s=idle_s, peak_tflops=peak_tflops,
        checkpointings=tuple(parse_list(checkpointing, "checkpointing", str, CHECKPOINTING)),
        shard=how.shard, world_size=how.world_size, model=model,
    )
    check_train_fits(tm.model_config(spec), spec.batches, seq, precision, spec.device, spec.world_size)
    if how.distributed:
        from mmprof.runners.train_memory_fsdp import Runner

        return _sweep_job(how, Runner, spec, "train-memory", out, resume,
                          (f"train-memory {size}", fmt, train_memory_summary, PAPER_TRAIN), tm.SWEPT)
    tm.model_config(spec)            # a bad --set shape fails before a run folder is made
    writer = _open_writer("train-memory", out, resume, spec.device, spec, tm.SWEPT)
    spec = dataclasses.replace(spec, gpu_name=writer.meta.get("gpu"))
    parts = _BreakdownWriter(writer) if breakdown else writer
    _sweep(parts, tm, spec, f"train-memory {size}", fmt, train_memory_summary, PAPER_TRAIN)
    if breakdown:
        from mmprof.results import render
        from mmprof.results.breakdown import breakdown_table

        click.echo(render(breakdown_table(parts.parts), "table", title="at the peak (bytes/token/layer)"), nl=False)


class _BreakdownWriter:
    """The run folder's writer, keeping each row's `_breakdown` aside (it is printed, not written)."""

    def __init__(self, writer):
        self._writer, self.parts = writer, []

    def __getattr__(self, name):
        return getattr(self._writer, name)

    def append(self, row: dict) -> None:
        part = row.pop("_breakdown", None)
        if part is not None:
            self.parts.append((_row_label(row), part))
        self._writer.append(row)


def _row_label(row: dict) -> str:
    impl = f"-{row['bitlinear']}" if row.get("bitlinear") else ""
    ckpt = " ckpt" if row.get("checkpointing", "none") != "none" else ""
    return f"{row['arch']}{impl}{ckpt} b{row['batch']}"


@main.command()
@click.argument("run")
@click.option("--out", "out_path", default=None, help="figure file (default RUN/plot.png)")
def plot(run: str, out_path: str | None) -> None:
    """Plot a run: memory and step time vs batch, or power over time with phases marked."""
    from mmprof.results.plots import plot_run
    from mmprof.runners.options import check_path_option

    check_path_option("out", out_path)
    (loaded,) = _read_runs([run])
    dest = Path(out_path) if out_path else loaded.path / "plot.png"
    click.echo(f"wrote {plot_run(loaded, dest)}")


@main.command("decode-power")
@click.option("--size", default="1.3b", show_default=True, help="one size or a list: 370m,1.3b,2.7b")
@click.option("--arch", default="mmfree,transformer", show_default=True)
@click.option("--weights", type=click.Choice(["fake-quant", "packed", "bf16"]), default="fake-quant",
              show_default=True, help="MatMul-free weights; the transformer always decodes bf16")
@click.option("--graph/--no-graph", default=None,
              help="replay each decode step from a CUDA graph (default: on CUDA devices)")
@click.option("--batch", default="1", show_default=True, help="sequences decoded at once; a list (1,4,16,64) gives a row per batch")
@click.option("--prompt-len", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1, max=MAX_STEPS), default=3, show_default=True)
@click.option("--min-window-s", type=FiniteFloat(min=0, max=MAX_SECONDS), default=5.0, show_default=True,
              help="each energy window decodes generations back to back until at least this long")
@click.option("--max-window-tokens", type=click.IntRange(min=1, max=10**9), default=None,
              help="end an energy window after this many tokens even when shorter (then low_confidence)")
@click.option("--device", default="auto", show_default=True, help="auto | cuda | cpu")
@click.option("--gpus", default=None, help="GPU index (default 0)")
@click.option("--shard", type=click.Choice(["none", "replicate"]), default="none", show_default=True,
              help="replicate: under torchrun, every GPU decodes its own prompts with a full replica")
@click.option("--idle-s", type=FiniteFloat(min=0, max=MAX_SECONDS), default=2.0, show_default=True)
@click.option("--out", default=None, help="run folder to create (default results/runs/<UTC>-decode-power)")
@click.option("--resume", default=None, help="add the missing configurations to this run folder")
@click.option("--format", "fmt", default="table", show_default=True, help="table | csv | json | markdown | latex")
@click.option("--checkpoint", default=None,
              help="checkpoint folder or cached Hub repo id: decode its real weights (instead of --size)")
@click.option("--prompt", default=None, help="prompt text, tokenised with the checkpoint's tokenizer.json")
@click.pass_context
def decode_power(ctx, size, arch, weights, graph, batch, prompt_len, new_tokens, repeats, min_window_s, max_window_tokens,
                 device, gpus, shard, idle_s, out, resume, fmt, checkpoint, prompt) -> None:
    """Decoding speed, latency, memory, power and energy per token for both models."""
    from mmprof.results import check_format
    from mmprof.results.summaries import PAPER_DECODE, decode_summary
    from mmprof.runners import decode_power as dp
    from mmprof.runners.options import check_decode_fits, check_device_choice
    from mmprof.runners.shard_plan import plan as shard_plan
    from mmprof.settings import check_environment
    from mmprof.runners.sweep import parse_list, positive_int
    from mmprof.workloads import get_config

    batches = tuple(parse_list(batch, "batch", positive_int))
    check_format(fmt)
    check_environment()
    check_device_choice(device, ("auto", "cuda", "cpu"), "decode-power", "decoding is measured, never estimated")
    prompt_ids = None
    if checkpoint:
        folder, arch, cfg = _checkpoint_shape(ctx, checkpoint, arch)
        sizes = [checkpoint]
        if prompt is not None:
            from mmprof.workloads.checkpoint import encode_prompt

            if ctx.get_parameter_source("prompt_len") is not click.core.ParameterSource.DEFAULT:
                raise UserError("give --prompt or --prompt-len, not both: the prompt's tokens set its length")
            prompt_ids = tuple(encode_prompt(folder, prompt, cfg.vocab_size))
            prompt_len = len(prompt_ids)
    else:
        if prompt is not None:
            raise UserError("--prompt needs --checkpoint (a folder with tokenizer.json); random weights take --prompt-len")
        sizes = parse_list(size, "size", str)
        for s in sizes:
            get_config(s)
    how = shard_plan(shard, None, device, gpus, sharded="replicate", estimate_ok=False)
    resolved = how.device
    if resolved == "meta":
        resolved = "cpu"            # decoding is measured, never estimated: no GPU means the CPU
    spec = dp.DecodeSpec(
        sizes=tuple(sizes), archs=tuple(parse_list(arch, "arch", str, ("mmfree", "transformer"))),
        weights=weights, batch=batches[0] if len(batches) == 1 else batches, prompt_len=prompt_len,
        new_tokens=new_tokens, repeats=repeats,
        device=resolved, min_window_s=min_window_s, idle_s=idle_s, graph=graph, max_window_tokens=max_window_tokens,
        checkpoint=str(folder) if checkpoint else None, prompt_ids=prompt_ids,
    )
    todo = dp.configs(spec)          # refuses unsupported weights or options before anything is written
    for b in spec.batches:
        check_decode_fits([(c.arch, c.size, c.weights) for c in todo if c.batch == b], b, prompt_len, new_tokens,
                          spec.device)
    if how.distributed:
        from mmprof.runners.decode_replicate import Runner

        return _sweep_job(how, Runner, spec, "decode-power", out, resume,
                          ("decode-power", fmt, decode_summary, PAPER_DECODE), dp.SWEPT)
    writer = _open_writer("decode-power", out, resume, spec.device, spec, dp.SWEPT)
    _sweep(writer, dp, spec, "decode-power", fmt, decode_summary, PAPER_DECODE)


@main.command()
@click.option("--quick", is_flag=True, help="a subset (1.3b batches 1,4,8; decode 1.3b and 13b), planned to take under 10 minutes on an H200")
@click.option("--device", default="auto", show_default=True,
              help="auto | cuda | cpu | meta (meta, or auto with no GPU: the memory panel from the estimate)")
@click.option("--gpus", default=None, help="GPU index (default 0)")
@click.option("--preset", type=click.Choice(["paper", "tiny"]), default="paper", show_default=True,
              help="paper: the paper's settings; tiny: small shapes for tests and demos")
@click.option("--out", default=None, help="folder to create (default results/runs/<UTC>-reproduce)")
@click.option("--resume", default=None, help="continue this reproduce folder where it stopped (with its settings)")
@click.option("--only", default="", help="run only these parts this call (train, decode, decode-mmfree, "
              "decode-transformer; comma-separated); --resume the same folder for the rest")
@click.option("--plan", "plan_only", is_flag=True, help="print the configurations and their estimated H200 "
              "seconds, then exit")
def reproduce(quick, device, gpus, preset, out, resume, only, plan_only) -> None:
    """The paper's efficiency claims checked on this GPU: runs, claim table, report.md and report.html."""
    from mmprof.results import default_run_dir, render
    from mmprof.results.claims import claim_table
    from mmprof.runners import reproduce as rp
    from mmprof.runners.sweep import resolve_device

    if out and resume:
        raise UserError("give --out or --resume, not both")
    if resume:
        spec, folder = rp.resumed_spec(Path(resume)), Path(resume)
    else:
        folder = Path(out) if out else default_run_dir("reproduce")
        if (folder / rp.META).exists():
            raise UserError(f"folder {folder} already holds a reproduce run; use --resume {folder}")
        dev = "cuda:0" if plan_only and device in ("auto", "cuda") else resolve_device(device, gpus)  # plan: as on a GPU
        spec = rp.ReproduceSpec(device=dev, quick=quick, preset=preset)
    spec = dataclasses.replace(spec, only=tuple(o.strip() for o in only.split(",") if o.strip()))
    rp.check(spec)
    steps = rp.plan(spec, folder if resume else None)
    total = rp.plan_total_s(steps)
    est = f"estimated {total / 60:.1f} min on one H200" if total is not None else "no H200 estimate for this preset"
    if plan_only:
        click.echo(render(steps, "table", title=f"reproduce plan: {len(steps)} configurations, {est}"), nl=False)
        return
    if len(steps):
        rp.check_gpu(spec, folder, len(steps))
    click.echo(f"reproduce: {len(steps)} configurations this call, {est}" if len(steps) else
               "reproduce: every configuration is measured; judging the claims and writing the report again", err=True)

    def open_writer(command, path, exists):
        return _open_writer(command, None if exists else str(path), str(path) if exists else None, spec.device)

    with _progress() as bar:
        rows, folder = rp.run(spec, folder, open_writer, argv=sys.argv, bar=bar)
    click.echo(render(claim_table(rows), "table", title=f"paper claims, {rows['measured on'].iloc[0]}"), nl=False)
    click.echo(f"report: {folder / 'report.html'} (and report.md)", err=True)


@main.command()
@click.argument("checkpoint")
@click.option("--format", "fmt", default="table", show_default=True, help="table | csv | json | markdown | latex")
def inspect(checkpoint: str, fmt: str) -> None:
    """A checkpoint's shape, parameter count and packed size, and per BitLinear its ternary zero
    fraction and scale."""
    import pandas as pd

    from mmprof.results import check_format, render
    from mmprof.workloads.ternary_stats import inspect_checkpoint

    check_format(fmt)
    summary, layers = inspect_checkpoint(checkpoint)
    click.echo(render(pd.DataFrame([summary]), fmt, title=checkpoint if fmt == "table" else None), nl=False)
    if layers:
        click.echo(render(pd.DataFrame(layers), fmt, title="BitLinear weights" if fmt == "table" else None), nl=False)
