#!/usr/bin/env python
"""Check the profiler against itself and the CUDA allocator on a real GPU (issue 3, item 10).

  (a) counter energy vs the integral of instant power over a >= 5 s square-wave load (target 2%)
  (b) the slowdown that 100 Hz sampling (--sample-hz) causes, interleaved A/B rounds with the sampling process paused
      and running (target: the 95% CI's upper end < 1%), for a compute-bound and a launch-bound
      workload; the in-process thread (the fallback, --kinds process,thread) can be shown beside it
  (c) the live-tensor tracker's peak vs torch.cuda.max_memory_allocated on a training step (target 5%)

    python scripts/profiler_check.py --out results/h200/profiler/profiler_check.csv

Writes the rows (schema "profiler-check") to --out, the square wave's power_trace.csv and phases.csv
and system_info.json beside it. Needs a CUDA GPU; exits 2 without one. Takes about two minutes on an
H200, the A/B rounds most of it.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))



def _row(check, device, value, unit, reference, target, passed, note, status="ok"):
    diff = None if value is None or not reference else 100.0 * (value - reference) / reference
    return {"status": status, "check": check, "device": device, "value": value, "unit": unit,
            "reference": reference, "diff_pct": diff, "target": target,
            "passed": None if passed is None else int(passed), "note": note}


def square_wave(device: str, seconds: float, trace_dir: Path) -> dict:
    """(a) Alternate 0.25 s of bf16 matmuls with 0.25 s of sleep inside one energy window."""
    import torch

    from mmprof.profiler import Profiler, time_fn

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    c = torch.empty_like(a)
    torch.mm(a, a, out=c)
    per_mm_s = time_fn(lambda: torch.mm(a, a, out=c), warmup=1, repeats=10, device=device).median_s
    burst = max(1, round(0.25 / per_mm_s))
    with Profiler(device=device, sample_hz=100, idle_s=2.0, trace_path=trace_dir / "power_trace.csv",
                  min_window_s=5.0) as prof:
        with prof.window("square-wave") as w:
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end:
                for _ in range(burst):
                    torch.mm(a, a, out=c)
                torch.cuda.synchronize(device)
                time.sleep(0.25)
    m = w.measurement
    source = prof.power_sources.get(torch.device(device).index or 0)
    target = "|diff| <= 2% on a window >= 5 s, instant power"
    if m.energy_j is None or m.energy_integral_j is None:
        return _row("counter-vs-instant-integral", device, m.energy_integral_j, "J", m.energy_j, target, None,
                    m.note(), status="error")
    note = (f"window {m.duration_s:.2f} s; {m.n_samples} samples; {m.n_power_updates} power updates; "
            f"{m.n_counter_updates} counter updates; sampled from a {prof.sampler_kind}; power read as {source}; avg {m.power_avg_w:.0f} W, peak {m.power_peak_w:.0f} W, "
            f"idle {m.idle_power_w or math.nan:.0f} W; {burst} matmuls of 8192^2 bf16 per 0.25 s burst")
    if m.note():
        note += "; " + m.note()
    diff = 100.0 * (m.energy_integral_j - m.energy_j) / m.energy_j
    passed = abs(diff) <= 2.0 and m.duration_s >= 5.0 and source == "instant"
    return _row("counter-vs-instant-integral", device, m.energy_integral_j, "J", m.energy_j, target, passed, note)


def _workloads(device: str):
    import torch

    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    c = torch.empty_like(a)
    x = torch.randn(1024, device=device)

    def compute():  # GPU-bound: the host waits on the GPU
        for _ in range(200):
            torch.mm(a, a, out=c)

    def launch_bound():  # host-bound: 9,000 tiny kernels a call, like batch-1 decoding
        y = x
        for _ in range(3000):
            y = torch.tanh(y * 1.0001 + 0.5)
        return y

    return {"compute-bound": compute, "launch-bound": launch_bound}


def paired_ci(ratios: list[float], level: float = 0.95, resamples: int = 4000) -> tuple[float, float, float]:
    """Mean of paired slowdowns (%, one per round) and its bootstrap percentile interval."""
    import random

    rng = random.Random(0)
    n = len(ratios)
    means = sorted(statistics.fmean(rng.choices(ratios, k=n)) for _ in range(resamples))
    tail = (1.0 - level) / 2
    return statistics.fmean(ratios), means[int(tail * resamples)], means[int((1 - tail) * resamples) - 1]


class Block(NamedTuple):
    """One timed block: `calls` calls back to back between two marks of the profiler's Timer."""

    per_call_s: float      # the block's time (CUDA events on a GPU) over its calls
    host_per_call_s: float  # host clock over the same calls, without the final wait: = per_call_s when launch-bound


def time_block(work, calls: int, device: str) -> Block:
    """A fixed number of calls (so a fixed kernel count) timed as one span: every periodic cost of
    the sampler (its 10 ms ticks, 20 ms counter reads, 100 ms slow fields) falls inside it in
    proportion, none is dropped as an outlier."""
    from mmprof.profiler import Timer, synchronize

    timer = Timer(device)
    synchronize(device)
    t0 = time.perf_counter()
    timer.mark()
    for _ in range(calls):
        work()
    t1 = time.perf_counter()
    timer.mark()           # total_s waits for the device
    return Block(timer.total_s() / calls, (t1 - t0) / calls)


@contextmanager
def steady_host(pin_off: int | None, pin: bool = True):
    """Python's cyclic GC off (collected once before) and the calling thread pinned to one CPU off the
    sampling process's core, for the A/B rounds: a GC pass or a migration inside a 0.1 s block is noise
    of the size of the effect. Restores both on leaving. Yields the CPU pinned to (None: not pinned;
    pin=False leaves the affinity alone: a thread sampler created inside would share the one CPU)."""
    from mmprof.profiler.sampler_process import current_cpu, workload_cpus

    was_enabled, before, cpu = gc.isenabled(), None, None
    if pin and hasattr(os, "sched_setaffinity"):
        try:
            before = os.sched_getaffinity(0)
            cpus = workload_cpus(pin_off, set(before))
            now = current_cpu()
            cpu = now if now in cpus else min(cpus)
            os.sched_setaffinity(0, {cpu})
        except OSError:
            before, cpu = None, None
    gc.collect()
    gc.disable()
    try:
        yield cpu
    finally:
        if was_enabled:
            gc.enable()
        if before is not None:
            os.sched_setaffinity(0, before)


def warm_up(work, device: str, seconds: float) -> None:
    """Run the workload until `seconds` have passed: GPU and CPU clocks, caches and the allocator in
    their steady state before the first timed block."""
    from mmprof.profiler import synchronize

    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        work()
    synchronize(device)


def _ab_rounds(work, device: str, rounds: int, off, on, calls: int = 1, blocks: list | None = None) -> list[float]:
    """Paired slowdowns, %: each round times a block of `calls` calls off-on-on-off (on-off-off-on in
    odd rounds) and compares the mean of its two on blocks with the mean of its two off blocks, so
    drifts slower than a round cancel. Switching costs nothing (a signal to the sampling process),
    so blocks follow each other without sleeps (an idle CPU or GPU would clock down), and short
    blocks (one call of ~0.1 s) with many rounds cancel more of the machine's drift than long ones
    in the same time: the interval narrows as 1/sqrt(rounds) either way for noise that is not a drift.
    `blocks`, when given, collects (round, state, Block) for the log."""
    out = []
    for r in range(rounds):
        t = {False: [], True: []}
        for state in ((False, True, True, False) if r % 2 == 0 else (True, False, False, True)):
            (on if state else off)()
            b = time_block(work, calls, device)
            t[state].append(b.per_call_s)
            if blocks is not None:
                blocks.append((r, state, b))
        out.append(100.0 * (statistics.fmean(t[True]) / statistics.fmean(t[False]) - 1.0))
    return out


def _child_calls(stats: dict | None, hz: float = 100.0) -> str:
    """The sampling process's NVML calls: how often and how long each, and its share of its ticks' time."""
    if not stats or not stats.get("calls"):
        return "sampling process call times not reported"
    parts = [f"{name} {1e3 * s / n:.2f} ms x {n}" for name, (n, s) in stats["calls"].items()]
    busy = sum(s for _, s in stats["calls"].values()) / max(stats["ticks"] / hz, 1e-9)
    return (f"sampling process: {stats['ticks']} ticks, in NVML {100 * busy:.0f}% of the time; "
            "NVML calls (mean time x count): " + ", ".join(parts))


def _summary(ratios: list[float], blocks: list) -> str:
    off = [b.per_call_s for _, state, b in blocks if not state]
    host = statistics.median(b.host_per_call_s / b.per_call_s for _, _, b in blocks if b.per_call_s > 0)
    spread = 100.0 * statistics.pstdev(off) / statistics.fmean(off) if len(off) > 1 else math.nan
    return (f"median {statistics.median(ratios):+.2f}%, rounds sd {statistics.pstdev(ratios):.2f}%; "
            f"off blocks {1e3 * statistics.fmean(off):.2f} ms a call, sd {spread:.2f}% between blocks; "
            f"host enqueue time / block time {host:.2f} (about 1: launch-bound)")


def sampling_slowdown(device: str, rounds: int, kinds=("process",), calls: int = 1,
                      warmup_s: float = 2.0, log_blocks: bool = False, hz: float = 100.0) -> list[dict]:
    """(b) Interleaved A/B: one sampling session (`hz`, 100 as the runners sample) per kind; the
    process sampler is paused (SIGSTOP) for the off blocks and resumed for the on blocks, so both run
    in the same session and machine state. The thread sampler (the fallback; --kinds thread) cannot be paused: its off blocks
    are timed between two sessions instead. The figure is the mean paired slowdown with its 95%
    bootstrap interval; the process sampler passes when the interval's upper end is below 1%.
    Each workload is warmed up for `warmup_s` first, and timed with the GC off and this thread
    pinned off the sampling process's core (steady_host)."""
    from mmprof.profiler import Profiler

    rows = []
    for name, work in _workloads(device).items():
        for kind in kinds:
            blocks: list = []
            stats, pinned = None, None
            with Profiler(device=device, sample_hz=hz, idle_s=0, sampler=kind) as prof:
                assert prof.sampler_kind == kind, prof.sampler_note
                sampler = prof.sampler
                with steady_host(getattr(sampler, "cpu", None), pin=kind == "process") as pinned:
                    warm_up(work, device, warmup_s)
                    if kind == "process":
                        def on():   # the next block starts once a fresh tick is stored, so it is sampled throughout
                            sampler.resume()
                            sampler.wait_past(time.monotonic(), timeout_s=0.2)

                        ratios = _ab_rounds(work, device, rounds, sampler.pause, on, calls, blocks)
                        sampler.resume()
            if kind == "process":
                stats = sampler.call_stats
            else:
                with steady_host(None, pin=False) as pinned:
                    ratios = _thread_rounds(work, device, rounds, calls, blocks, hz)
            mean, lo, hi = paired_ci(ratios)
            held = kind == "process"   # the default on a GPU; the thread is the fallback, shown for comparison
            where = f"workload thread pinned to CPU {pinned}" if pinned is not None else "workload thread not pinned"
            if held:
                where += f", sampling process on CPU {sampler.cpu}"
            note = (f"sampler: {kind} at {hz:g} Hz; {rounds} interleaved A/B rounds (ABBA/BAAB) after "
                    f"{warmup_s:g} s of warm-up, blocks of {calls} calls timed whole (CUDA events), GC off, {where}; "
                    f"paired slowdown mean {mean:+.2f}% [95% CI {lo:+.2f}, {hi:+.2f}], {_summary(ratios, blocks)}")
            if held:
                note += "; " + _child_calls(stats, hz)
            rows.append(_row(f"sampling-slowdown-{name}-{kind}", device, mean, "%", None,
                             "slowdown < 1% (95% CI upper end)" if held else "shown for comparison",
                             hi < 1.0 if held else None, note) | {"diff_pct": mean})
            print(f"    {name} {kind}: slowdown {mean:+.2f}% [95% CI {lo:+.2f}, {hi:+.2f}] over {rounds} rounds; "
                  f"{_summary(ratios, blocks)}", flush=True)
            if held:
                print(f"    {_child_calls(stats, hz)}", flush=True)
            if log_blocks:
                _print_rounds(ratios, blocks)
    return rows


def _print_rounds(ratios: list[float], blocks: list) -> None:
    for r, ratio in enumerate(ratios):
        own = [(state, b) for k, state, b in blocks if k == r]
        cells = " ".join(f"{'on ' if state else 'off'} {1e3 * b.per_call_s:8.3f}" for state, b in own)
        print(f"      round {r:3d}: {cells} ms a call -> {ratio:+6.2f}%", flush=True)


def _thread_rounds(work, device: str, rounds: int, calls: int = 1, blocks: list | None = None,
                   hz: float = 100.0) -> list[float]:
    """The thread sampler's rounds: off blocks outside a session, on blocks inside one, ABBA/BAAB."""
    from mmprof.profiler import Profiler

    out = []
    for r in range(rounds):
        t = {False: [], True: []}
        for state in ((False, True, True, False) if r % 2 == 0 else (True, False, False, True)):
            if state:
                with Profiler(device=device, sample_hz=hz, idle_s=0, sampler="thread"):
                    time.sleep(0.02)
                    b = time_block(work, calls, device)
            else:
                b = time_block(work, calls, device)
            t[state].append(b.per_call_s)
            if blocks is not None:
                blocks.append((r, state, b))
        out.append(100.0 * (statistics.fmean(t[True]) / statistics.fmean(t[False]) - 1.0))
    return out


def tracker_vs_allocator(device: str, batch: int = 8, seq: int = 1024) -> dict:
    """(c) One training step (bf16 autocast, AdamW) of mmprof's own Transformer++ at 370m."""
    import torch

    from mmprof.profiler import GIB, MemoryTracker
    from mmprof.workloads import TrainSpec, make_trainer

    trainer = make_trainer(TrainSpec(arch="transformer", size="370m", batch=batch, seq=seq), device)
    trainer.step()  # optimizer state, cuBLAS workspaces and kernels exist before the measured step
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with MemoryTracker(trainer.model, trainer.optimizer) as mt:
        trainer.step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    cats = mt.peak_bytes_by_category
    untracked = before - mt.start_bytes
    above_t, above_a = (mt.peak_bytes - mt.start_bytes) / GIB, (peak - before) / GIB
    note = (f"Transformer++ 370m, {trainer.model.num_params() / 1e6:.0f}M params, batch {batch}, seq {seq}; "
            f"at the peak: " + ", ".join(f"{k} {v / GIB:.3f}" for k, v in cats.items()) + " GiB; "
            f"allocated before the step but not a tensor the tracker sees: {untracked / 2**20:.1f} MiB; "
            f"peak above the start: tracker {above_t:.3f} GiB, allocator {above_a:.3f} GiB")
    value, reference = mt.peak_bytes / GIB, peak / GIB
    diff = 100.0 * (value - reference) / reference
    return _row("tracker-vs-max-memory-allocated", device, value, "GiB", reference, "|diff| <= 5%",
                abs(diff) <= 5.0, note)


def _print(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="mmprof profiler check")
    for col in ("check", "value", "reference", "unit", "diff_pct", "target", "passed"):
        table.add_column(col, justify="right" if col in ("value", "reference", "diff_pct") else "left")

    def fmt(v, digits=4):
        return "" if v is None else (f"{v:.{digits}g}" if isinstance(v, float) else str(v))

    for r in rows:
        passed = {1: "[green]yes[/]", 0: "[red]no[/]"}.get(r["passed"], r["status"])
        table.add_row(r["check"], fmt(r["value"], 6), fmt(r["reference"], 6), r["unit"],
                      "" if r["diff_pct"] is None else f"{r['diff_pct']:+.2f}", r["target"], passed)
    console = Console()
    console.print(table)
    for r in rows:
        console.print(f"[bold]{r['check']}[/]: {r['note']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="CSV file to write the check rows to")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--square-s", type=float, default=6.0, help="length of the square-wave window, s")
    parser.add_argument("--rounds", type=int, default=150, help="interleaved A/B rounds of the slowdown check")
    parser.add_argument("--block-calls", type=int, default=1,
                        help="calls of the workload per A/B block, timed as one span")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="untimed run of each workload before its rounds, s")
    parser.add_argument("--log-rounds", action="store_true", help="print every round's four blocks")
    parser.add_argument("--sample-hz", type=float, default=100.0, help="sampling rate of the slowdown check")
    parser.add_argument("--kinds", default="process",
                        help="samplers the slowdown check times: process (held to < 1%%), thread (for comparison)")
    parser.add_argument("--only", default=None,
                        help="comma-separated checks to run (counter-vs-instant-integral, sampling-slowdown, "
                             "tracker-vs-max-memory-allocated); default all")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("profiler_check needs a CUDA GPU, and torch.cuda.is_available() is False here", file=sys.stderr)
        return 2
    if args.square_s < 5.0:
        print("--square-s must be at least 5 (the 2% target is for windows of 5 s or more)", file=sys.stderr)
        return 2

    from mmprof.profiler import system_info
    from mmprof.results.schema import columns

    args.out.parent.mkdir(parents=True, exist_ok=True)
    info = system_info()
    (args.out.parent / "system_info.json").write_text(json.dumps(info, indent=2) + "\n")
    gpu = next((g for g in info["gpus"] if g["index"] == (torch.device(args.device).index or 0)), None)
    print(f"GPU: {gpu['name'] if gpu else info['gpu_unavailable']}; driver {gpu['driver'] if gpu else '-'}; "
          f"torch {info['versions']['torch']}", flush=True)

    rows = []
    checks = (
        ("counter-vs-instant-integral", lambda: [square_wave(args.device, args.square_s, args.out.parent)]),
        ("sampling-slowdown", lambda: sampling_slowdown(args.device, args.rounds, tuple(args.kinds.split(",")),
                                                        args.block_calls, args.warmup_s, args.log_rounds,
                                                        args.sample_hz)),
        ("tracker-vs-max-memory-allocated", lambda: [tracker_vs_allocator(args.device)]),
    )
    wanted = set(args.only.split(",")) if args.only else {label for label, _ in checks}
    for label, run in [(label, run) for label, run in checks if label in wanted]:
        print(f"{label} ...", flush=True)
        t0 = time.perf_counter()
        try:
            rows += run()
        except Exception as exc:  # noqa: BLE001 - one failed check must not hide the others
            rows.append(_row(label, args.device, None, "", None, "", None, f"{type(exc).__name__}: {exc}",
                             status="error"))
        print(f"    {time.perf_counter() - t0:.1f} s", flush=True)

    header = columns("profiler-check")
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in header})
    _print(rows)
    print(f"wrote {args.out}")
    return 0 if all(r["status"] == "ok" and r["passed"] != 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
