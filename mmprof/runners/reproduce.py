"""`reproduce`: the paper's efficiency experiments, run at its stated settings, then judged claim by claim.

The experiments are data (TRAIN_STEPS, DECODE_STEPS): each step is one call of the train-memory or
decode-power runner into a run folder of its own inside the reproduce folder, so a killed run resumes
like any sweep (rows already written are not measured again). Without a GPU the training memory panel
comes from the fake-tensor estimate and decoding is not run (latency and energy need a GPU).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from mmprof.errors import UserError
from mmprof.profiler import cuda_index
from mmprof.results import done_keys, read_run, row_key
from mmprof.results.claims import claim_rows, load_claims
from mmprof.results.report_html import ReportInput, write_report
from mmprof.results.store import git_commit, source_sha256, utc_now, write_text_atomic
from mmprof.runners import decode_power as dp
from mmprof.runners import train_memory as tm

META = "meta.json"
CLAIMS_CSV = "claims.csv"
STEPS_CSV = "steps.csv"
TRAIN_DIR = "train-memory"
DECODE_DIR = "decode-power"
PART_COMMAND = {TRAIN_DIR: "train-memory", DECODE_DIR: "decode-power"}   # the command that writes each part


@dataclass(frozen=True)
class TrainStep:
    arch: str
    bitlinear: str                 # "" for the transformer
    batches: tuple[int, ...]       # the full run
    quick_batches: tuple[int, ...]

    @property
    def label(self) -> str:
        return f"{self.arch}-{self.bitlinear}" if self.bitlinear else self.arch


@dataclass(frozen=True)
class DecodeStep:
    arch: str
    weights: str                   # packed (MatMul-free) | bf16 (Transformer++)
    sizes: tuple[str, ...]
    quick_sizes: tuple[str, ...]


BATCHES = (1, 4, 8, 16, 32)
SIZES = ("370m", "1.3b", "2.7b", "13b")
# The training panel: 1.3B, fused vs vanilla BitLinear (the paper's), the reference's own fused kernel
# (ref-fused: run where this build's BitLinear implementations include it) and Transformer++ for energy.
TRAIN_STEPS = (
    TrainStep("mmfree", "fused", BATCHES, (1, 4, 8)),
    TrainStep("mmfree", "vanilla", BATCHES, (1, 4, 8)),
    TrainStep("mmfree", "ref-fused", BATCHES, (8,)),
    TrainStep("transformer", "", (8, 16), (8,)),     # energy per training token, at the batches the claims read
)
# The inference panel: MatMul-free (packed ternary) vs Transformer++ (bf16) at the paper's four sizes.
DECODE_STEPS = (
    DecodeStep("mmfree", "packed", SIZES, ("1.3b", "13b")),
    DecodeStep("transformer", "bf16", SIZES, ("1.3b", "13b")),
)


@dataclass(frozen=True)
class Preset:
    """The settings a run uses: `paper` (the paper's, cited in claims.toml) or `tiny` (tests and demos)."""
    train_size: str
    seq: int
    prompt_len: int
    new_tokens: int
    decode_sizes: tuple[str, ...] | None   # None: each step's own sizes
    batches: tuple[int, ...] | None        # None: each step's own batches
    repeats: int
    quick_repeats: int
    min_window_s: float
    idle_s: float


PRESETS = {
    # seq 2048 in both panels; decoding reaches 2048 tokens: a 32-token prompt and 2016 new tokens
    "paper": Preset("1.3b", 2048, 32, 2016, None, None, repeats=3, quick_repeats=1, min_window_s=5.0, idle_s=2.0),
    "tiny": Preset("tiny", 64, 8, 24, ("tiny",), (1, 2), repeats=1, quick_repeats=1, min_window_s=0.0, idle_s=0.0),
}


@dataclass(frozen=True)
class ReproduceSpec:
    device: str                    # resolved: cuda:N | cpu | meta (meta: estimate the memory panel only)
    quick: bool = False
    preset: str = "paper"
    train_steps: tuple[TrainStep, ...] = TRAIN_STEPS
    decode_steps: tuple[DecodeStep, ...] = DECODE_STEPS
    only: tuple[str, ...] = ()     # parts of ONLY_CHOICES to run this call (none: all); the report shows all

    def runs(self, panel: str, arch: str = "") -> bool:
        """Whether this call runs a step of `panel` (train | decode) for `arch`."""
        return not self.only or panel in self.only or (panel == "decode" and f"decode-{arch}" in self.only)

    @property
    def settings(self) -> Preset:
        return PRESETS[self.preset]

    @property
    def mode(self) -> str:
        return ("quick" if self.quick else "full") + ("" if self.preset == "paper" else f", {self.preset} preset")


def available_bitlinears() -> tuple[str, ...]:
    from mmprof.kernels.bitlinear import IMPLS

    return tuple(IMPLS)


def train_specs(spec: ReproduceSpec, gpu_name: str | None = None) -> list[tuple[TrainStep, tm.TrainMemorySpec | None, str]]:
    """(step, runner spec or None, why not run) for every training step."""
    p, impls, out = spec.settings, available_bitlinears(), []
    for step in spec.train_steps:
        if step.bitlinear and step.bitlinear not in impls:
            out.append((step, None, f"--bitlinear {step.bitlinear} is not in this build (it has {', '.join(impls)})"))
            continue
        batches = p.batches or (step.quick_batches if spec.quick else step.batches)
        out.append((step, tm.TrainMemorySpec(
            size=p.train_size, archs=(step.arch,), bitlinears=(step.bitlinear or "fused",), batches=tuple(batches),
            seq=p.seq, device=spec.device, idle_s=p.idle_s, gpu_name=gpu_name,
            **({"steps": 2, "warmup": 1, "min_window_s": 0.0} if spec.preset == "tiny" else {})), ""))
    return out


def decode_specs(spec: ReproduceSpec) -> list[tuple[DecodeStep, dp.DecodeSpec | None, str]]:
    p, out = spec.settings, []
    for step in spec.decode_steps:
        if spec.device == "meta":
            out.append((step, None, "decoding is measured, never estimated: latency, inference memory and energy "
                                    "need a GPU"))
            continue
        sizes = p.decode_sizes or (step.quick_sizes if spec.quick else step.sizes)
        out.append((step, dp.DecodeSpec(
            sizes=tuple(sizes), archs=(step.arch,), weights="packed" if step.arch == "mmfree" else step.weights,
            batch=1, prompt_len=p.prompt_len, new_tokens=p.new_tokens,
            repeats=p.quick_repeats if spec.quick else p.repeats, device=spec.device,
            min_window_s=p.min_window_s, idle_s=p.idle_s), ""))
    return out


ONLY_CHOICES = ("train", "decode", "decode-mmfree", "decode-transformer")


def check(spec: ReproduceSpec) -> None:
    bad = [o for o in spec.only if o not in ONLY_CHOICES]
    if bad:
        raise UserError(f"--only {','.join(bad)}: choose from {', '.join(ONLY_CHOICES)} (comma-separated)")
    if spec.preset not in PRESETS:
        raise UserError(f"unknown preset {spec.preset!r}; choose from {', '.join(PRESETS)}")
    if spec.device == "cpu" and spec.preset == "paper":
        raise UserError("--device cpu: the paper's sizes (1.3b training, 13b decoding) are not run on the CPU; "
                        "use a GPU, --device meta for the memory estimate, or --preset tiny")


def check_gpu(spec: ReproduceSpec, folder: Path, left: int) -> None:
    """A folder measured on a GPU, resumed with `left` configurations to measure, needs that GPU here."""
    import torch

    index = cuda_index(spec.device)
    if index is None:
        return
    if index >= (torch.cuda.device_count() if torch.cuda.is_available() else 0):
        raise UserError(f"{folder} is measured on {spec.device} and {left} configurations are left, but no CUDA "
                        f"device {index} is visible here (a finished folder is judged again anywhere)")


# ---- the plan and its H200 time ----
# Seconds on one H200, read off the committed results/h200/reproduce (0a82f75; estimates for planning, never
# results). Training rows at the runner's defaults (steps, warm-up and window of tm.TrainMemorySpec), each
# from the previous row's window end to its own (its model build, the previous row's tracked step and, at
# batch 1, the first call's compiling included; batches not run there are scaled by batch from the largest
# one run): (row s, step s).
H200_TRAIN_ROW = {("vanilla", 1): (45.7, 0.324), ("vanilla", 4): (27.9, 0.337), ("vanilla", 8): (28.0, 0.367),
                  ("vanilla", 16): (24.6, 0.611), ("ref-fused", 1): (13.9, 0.223), ("ref-fused", 4): (19.3, 0.272),
                  ("ref-fused", 8): (21.3, 0.340), ("ref-fused", 16): (20.4, 0.585),
                  ("fused", 1): (38.0, 0.249), ("fused", 4): (11.9, 0.303), ("fused", 8): (10.1, 0.292),
                  ("fused", 16): (9.4, 0.519), ("fused", 32): (11.0, 1.008),
                  ("transformer", 8): (9.8, 0.397), ("transformer", 16): (12.6, 0.760)}
H200_OOM_ROW_S = 3.5   # a batch that runs out of memory (vanilla, ref-fused at 32): what the train call's 360 s left
H200_FITS_BATCH = {"vanilla": 16, "ref-fused": 16, "fused": 32, "transformer": 16}
# decoding: latency_p50_ms of the 2016-token generations; the build from the previous row's end to the
# warm-up's start (Transformer++ from its 13b row only), and the Triton compiling of a call's first packed row
H200_DECODE_MS = {("mmfree", "370m"): 0.341, ("mmfree", "1.3b"): 0.390, ("mmfree", "2.7b"): 0.624,
                  ("mmfree", "13b"): 1.475, ("transformer", "370m"): 1.560, ("transformer", "1.3b"): 2.001,
                  ("transformer", "2.7b"): 3.305, ("transformer", "13b"): 9.536}
H200_DECODE_BUILD_S = {"mmfree": 10.8, "transformer": 5.4}
H200_PACKED_COMPILE_S = 31.5
H200_PREFILL_S = 0.1
H200_QUEUE_STEPS = 1024   # the host runs ahead of the GPU by about a launch queue of steps (fits 820-1360)
H200_STEP_START_S = 0.3   # a runner call's start before its idle baseline
H200_CALL_S = 40.0        # per device call: pip install -e, imports, the report


def _decode_row_s(arch: str, size: str, s: dp.DecodeSpec, compiles: bool) -> float:
    """Build, warm-up, `repeats` timed generations, idle, a prefill, then `repeats` windows: each a
    lead-in (whole passes, at least dp.LEAD_IN_S) and the passes the host enqueues before its clock
    passes min_window_s (it runs a launch queue ahead of the GPU), and idle again."""
    step_s = H200_DECODE_MS.get((arch, size), 10.0) / 1000
    pass_s = (s.new_tokens - 1) * step_s
    lead = max(1, math.ceil(dp.LEAD_IN_S / pass_s))
    window = max(1, math.ceil((s.min_window_s + H200_QUEUE_STEPS * step_s) / pass_s))
    build = H200_DECODE_BUILD_S.get(arch, 20.0) + (H200_PACKED_COMPILE_S if compiles else 0.0)
    return (build + (1 + s.repeats) * (H200_PREFILL_S + pass_s) + 2 * s.idle_s + H200_PREFILL_S
            + s.repeats * (lead + window) * pass_s)


def _window_s(step_s: float, s: tm.TrainMemorySpec) -> float:
    return tm.window_steps(step_s, s.steps, s.min_window_s) * step_s


def _train_row_s(impl: str, batch: int, s: tm.TrainMemorySpec) -> float:
    """The committed row's time with its warm-up and window replaced by this spec's."""
    if batch > H200_FITS_BATCH.get(impl, 16):
        return H200_OOM_ROW_S
    known = batch if (impl, batch) in H200_TRAIN_ROW else max(b for i, b in H200_TRAIN_ROW if i == impl)
    row_s, step_s = (v * batch / known for v in H200_TRAIN_ROW[(impl, known)])
    at = tm.TrainMemorySpec(size=s.size)
    return row_s + _window_s(step_s, s) - _window_s(step_s, at) + (s.warmup - at.warmup) * step_s


def plan(spec: ReproduceSpec, folder: Path | None = None) -> pd.DataFrame:
    """One row per configuration the spec runs (with `folder`, a reproduce folder being resumed: those
    it does not hold yet): panel, configuration and its estimated H200 seconds (only for the paper
    preset on a GPU; other presets and devices get no estimate). A runner call's idle baseline and
    start go to its first row."""
    check(spec)
    timed, rows, compiled = spec.preset == "paper", [], False
    todo, _ = _left(spec, folder, train_specs(spec), decode_specs(spec))
    for runner, sub, s, step, cfgs in todo:
        for k, cfg in enumerate(cfgs):
            if sub == TRAIN_DIR:
                est = _train_row_s(step.bitlinear or "transformer", cfg.batch, s)
            else:
                est = _decode_row_s(cfg.arch, cfg.size, s, compiles=cfg.weights == "packed" and not compiled)
                compiled |= cfg.weights == "packed"
            est += (s.idle_s + H200_STEP_START_S) if k == 0 else 0.0
            rows.append({"panel": "train" if sub == TRAIN_DIR else "decode", "configuration": cfg.label,
                         "est_h200_s": round(est, 1) if timed else None})
    return pd.DataFrame(rows, columns=["panel", "configuration", "est_h200_s"])


def plan_total_s(df: pd.DataFrame) -> float | None:
    """The plan's estimated seconds for one device call (its rows plus one call's start-up)."""
    if not len(df) or df["est_h200_s"].isna().any():
        return None
    return float(df["est_h200_s"].sum()) + H200_CALL_S


# ---- the run ----

OpenWriter = Callable[[str, Path, bool], object]   # (command, run folder, resume?) -> RunWriter


def run(spec: ReproduceSpec, folder: Path, open_writer: OpenWriter, *, argv: list[str] | None = None,
        bar=None) -> tuple[pd.DataFrame, Path]:
    """Run every step not yet done into `folder`, then judge the claims and write the report.

    `bar` is a Rich Progress (or None); it advances once per configuration measured."""
    check(spec)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = _start_meta(folder, spec, argv)
    writers = {}   # run folders this call writes to; a part with nothing left is only read, never touched
    if (folder / TRAIN_DIR / "measurements.csv").exists():
        part_meta = read_run(folder / TRAIN_DIR).meta
    else:
        writers[TRAIN_DIR] = open_writer("train-memory", folder / TRAIN_DIR, False)
        part_meta = writers[TRAIN_DIR].meta
    meta.update({k: part_meta.get(k) for k in ("gpu", "driver", "git_commit", "mmprof_version", "host", "system")})
    _write_meta(folder, meta)
    trains, decodes = train_specs(spec, part_meta.get("gpu")), decode_specs(spec)
    todo, done = _left(spec, folder, trains, decodes)
    left = sum(len(cfgs) for *_, cfgs in todo)
    if left:
        check_gpu(spec, folder, left)
    for _, sub, _, _, _ in todo:
        if sub not in writers:
            writers[sub] = open_writer(PART_COMMAND[sub], folder / sub, (folder / sub / "measurements.csv").exists())
    task = bar.add_task("reproduce", total=left) if bar is not None else None
    for runner, sub, s, _, _ in todo:
        writer = writers[sub]

        def emit(row, writer=writer):
            writer.append(row)
            if bar is not None:
                bar.advance(task)

        on_start = (lambda cfg: bar.update(task, description=f"reproduce {cfg.label}")) if bar is not None else None
        runner.run(s, emit, skip=done[sub], key=lambda r, runner=runner: row_key(r, runner.KEY_COLUMNS),
                   trace_path=writer.trace_path("power_trace.csv"), on_start=on_start)
    for w in writers.values():
        w.finish()
    meta["end_utc"] = utc_now()
    _write_meta(folder, meta)
    return judge(folder, spec, meta, trains, decodes)


def judge(folder: Path, spec: ReproduceSpec, meta: dict, trains, decodes) -> tuple[pd.DataFrame, Path]:
    """Claims, steps and report from what the folder's run folders hold."""
    train_run = read_run(folder / TRAIN_DIR) if (folder / TRAIN_DIR / "measurements.csv").exists() else None
    decode_run = read_run(folder / DECODE_DIR) if (folder / DECODE_DIR / "measurements.csv").exists() else None
    steps, missing = step_table(spec, trains, decodes, train_run, decode_run)
    meta = {**meta, "commits": commits(meta, [r.meta for r in (train_run, decode_run) if r is not None])}
    source, settings, claims = load_claims()
    rows = claim_rows(claims, train_run.df if train_run else None, decode_run.df if decode_run else None,
                      measured_on=measured_on(meta), missing=missing)
    write_text_atomic(folder / CLAIMS_CSV, rows.to_csv(index=False))
    write_text_atomic(folder / STEPS_CSV, steps.to_csv(index=False))
    write_report(ReportInput(folder=folder, source=source, settings=settings, claims=rows, steps=steps, meta=meta,
                             train=train_run, decode=decode_run, notes=notes(spec)))
    return rows, folder


def notes(spec: ReproduceSpec) -> list[str]:
    out = []
    if spec.device == "meta":
        out.append("No GPU was visible: the training memory panel is the estimate made on fake tensors "
                   "(train-memory --device meta). Step time, latency, inference memory and energy need a GPU "
                   "and are not measured here.")
    elif not spec.device.startswith("cuda"):
        out.append(f"Measured on {spec.device}, not a GPU: no power or energy, and times are not the paper's kind.")
    if spec.quick:
        out.append("--quick: a subset of the batches and sizes (and one decode repeat), not the full panels.")
    if spec.preset != "paper":
        out.append(f"The {spec.preset} preset: small shapes for tests and demos, not the paper's settings; "
                   "the claims at 1.3B and 13B are not measured by it.")
    return out


def commits(meta: dict, parts=()) -> list[str]:
    """Every commit that wrote the folder, once each: the first call's, each call's, and its run
    folders' (`parts`: their meta.json, the creating commit and each resume's)."""
    seen = [meta.get("git_commit"), *(c.get("git_commit") for c in meta.get("calls", []))]
    for part in parts:
        seen += [part.get("git_commit"), *part.get("resumed_commits", [])]
    return list(dict.fromkeys(c for c in seen if c)) or ["unknown"]


def measured_on(meta: dict) -> str:
    shas = [c[:10] for c in meta.get("commits") or commits(meta)]
    commit = ("commit " if len(shas) == 1 else "commits ") + ", ".join(shas)
    if not meta.get("gpu"):
        return f"no GPU ({meta.get('device', '')}), {commit}"
    return f"{meta['gpu']}, driver {meta.get('driver') or '?'}, {commit}"


def step_table(spec: ReproduceSpec, trains, decodes, train_run, decode_run) -> tuple[pd.DataFrame, dict[str, str]]:
    """One row per planned configuration (ok | oom | error | not run, with why), and why each
    configuration label that has no ok row has none (for the claims' reasons)."""
    rows, missing = [], {}
    if spec.device == "meta":
        missing["time"] = "step time and energy need a GPU (this run estimated memory on fake tensors)"
        missing["decode"] = "latency, inference memory and energy need a GPU (none was visible)"
    for panel, runner, items, run_ in (("training", tm, trains, train_run), ("inference", dp, decodes, decode_run)):
        df = run_.df if run_ is not None else pd.DataFrame()
        for step, s, why in items:
            label = step.label if panel == "training" else step.arch
            if s is None:
                rows.append({"panel": panel, "configuration": label, "status": "not run", "note": why})
                missing.setdefault(label, why)
                continue
            stopped = None
            for cfg in runner.configs(s):
                key = _cfg_key(runner, cfg, s)
                match = df[[row_key(r, runner.KEY_COLUMNS) == key for r in df.to_dict("records")]] if len(df) else df
                name = cfg.label
                if len(match):
                    r = match.iloc[-1]
                    status, note = str(r["status"]), r.get("note")
                    note = "" if not isinstance(note, str) else note
                    if status == "oom" and panel == "training":
                        stopped = stopped or cfg.batch
                    if status != "ok":
                        missing.setdefault(f"{cfg.arch} {cfg.size}" if panel == "inference" else label,
                                           f"{name}: {status} ({note})" if note else f"{name}: {status}")
                elif stopped is not None:
                    status, note = "not run", f"batch {stopped} ran out of memory"
                elif not spec.runs("train" if panel == "training" else "decode", step.arch):
                    status, note = "not run", (f"not run yet: this call ran --only {','.join(spec.only)}; "
                                               "--resume this folder with --only for the rest")
                else:
                    status, note = "not run", "not reached (the run was stopped before it)"
                rows.append({"panel": panel, "configuration": name, "status": status,
                             "note": "" if status == "ok" else note})   # an ok row's notes are in its CSV
    return pd.DataFrame(rows, columns=["panel", "configuration", "status", "note"]), missing


def _left(spec: ReproduceSpec, folder: Path | None, trains, decodes) -> tuple[list, dict[str, set]]:
    """What this call measures: (runner, part folder, runner spec, step, configurations `folder` does
    not hold yet) for each step with some left, and the keys each part folder already holds."""
    jobs = [(tm, TRAIN_DIR, s, step) for step, s, _ in trains if s is not None and spec.runs("train")]
    jobs += [(dp, DECODE_DIR, s, step) for step, s, _ in decodes if s is not None and spec.runs("decode", step.arch)]
    done = {sub: _done_in(folder, sub, runner) if folder is not None else set() for runner, sub, _, _ in jobs}
    todo = [(runner, sub, s, step, [c for c in runner.configs(s) if _cfg_key(runner, c, s) not in done[sub]])
            for runner, sub, s, step in jobs]
    return [t for t in todo if t[4]], done


def _done_in(folder: Path, sub: str, runner) -> set:
    path = Path(folder) / sub
    return done_keys(read_run(path), runner.KEY_COLUMNS) if (path / "measurements.csv").exists() else set()


def _cfg_key(runner, cfg, s) -> tuple:
    return row_key(cfg.spec_row(s), runner.KEY_COLUMNS)


# ---- the folder's own meta.json ----

def _start_meta(folder: Path, spec: ReproduceSpec, argv) -> dict:
    """The folder's meta.json, with this call (its time, command line and commit) added to `calls`."""
    path = folder / META
    call = {"utc": utc_now(), "argv": list(argv or []), "git_commit": git_commit(), "source_sha256": source_sha256()}
    if path.exists():
        meta = load_meta(folder)
        meta.setdefault("resumed_utc", []).append(call["utc"])
        meta.setdefault("calls", [{"utc": meta.get("start_utc"), "argv": meta.get("argv", []),   # kept since
                                   "git_commit": meta.get("git_commit")}]).append(call)      # 2026-12-04
        meta["end_utc"] = None
        return meta
    return {"calls": [call], "command": "reproduce", "argv": list(argv or []), "mode": spec.mode, "quick": spec.quick,
            "preset": spec.preset, "device": spec.device, "start_utc": utc_now(), "end_utc": None,
            "train_steps": [asdict(s) for s in spec.train_steps], "decode_steps": [asdict(s) for s in spec.decode_steps]}


def _write_meta(folder: Path, meta: dict) -> None:
    write_text_atomic(folder / META, json.dumps(meta, indent=2, sort_keys=True, default=str))


def load_meta(folder: Path) -> dict:
    path = Path(folder) / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"not a reproduce folder (no {META}): {folder}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"malformed {path}: {e.msg} at line {e.lineno}") from None
    if meta.get("command") != "reproduce":
        raise UserError(f"{folder} was written by {meta.get('command')!r}, not 'reproduce'")
    return meta


def resumed_spec(folder: Path) -> ReproduceSpec:
    """The spec a reproduce folder was started with (its steps as they were then)."""
    meta = load_meta(folder)
    return ReproduceSpec(device=meta["device"], quick=bool(meta.get("quick")), preset=meta.get("preset", "paper"),
                         train_steps=tuple(TrainStep(**{**s, "batches": tuple(s["batches"]),
                                                        "quick_batches": tuple(s["quick_batches"])})
                                           for s in meta["train_steps"]),
                         decode_steps=tuple(DecodeStep(**{**s, "sizes": tuple(s["sizes"]),
                                                          "quick_sizes": tuple(s["quick_sizes"])})
                                            for s in meta["decode_steps"]))


__all__ = ["DECODE_STEPS", "PRESETS", "ReproduceSpec", "check_gpu", "TRAIN_STEPS", "judge", "commits", "resumed_spec", "run"]
