"""Wall time of the no-GPU training-memory estimate: the default sweeps of 1.3b and 13b, fast and full.

    python scripts/bench_estimate.py [--sizes 1.3b,13b] [--full-batches 1] [--fsdp 13b:8]
                                     [--out results/cpu/bench_estimate.txt]

Each fast run is the CLI itself (`mmprof train-memory --size S --device meta`) in a fresh process, so
the time includes the interpreter's start and the imports. The full trace of the same sweep is timed
in a fresh process too, at the batches given (every batch traces the whole step, so the whole sweep's
full-trace time is the sum over batches; the script reports what it ran). Rows of the fast run are
compared with the full trace's at the batches both ran. `--fsdp SIZE:N` adds the per-rank FSDP2
estimate of an N-process job (`--shard fsdp --world-size N`), fast and full, alike. The machine's
load average is printed beside each run: on a shared machine the wall time is mostly waiting for a
core, the CPU time what the run itself cost.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd


def _run(args: list[str]) -> tuple[float, float, Path]:
    """Wall seconds of one CLI run (its CPU seconds, user + system, are printed beside: on a shared
    machine the wall time is mostly waiting for a core)."""
    out = Path(tempfile.mkdtemp(prefix="bench-estimate-")) / "run"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mmprof", "train-memory", *args, "--device", "meta", "--out", str(out),
                    "--format", "csv"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(f"  {' '.join(args)}: {wall:.1f} s wall, {cpu:.1f} s CPU, load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    return wall, cpu, out



# The committed H200 sweeps at seq 2048, newest first: (measurements.csv, how its `bitlinear` names map
# to today's). The 20261128 sweep predates the baselines: its `vanilla` is today's `naive`.
H200_SWEEPS = {
    "1.3b": [("results/h200/train-memory/20261203-final-5013a5f/train-1.3b/measurements.csv", {}),
             ("results/h200/train-memory/20261128-1.3b-seq2048/measurements.csv", {"vanilla": "naive"})],
}


def h200_rows(size: str) -> pd.DataFrame:
    """The ok rows of the committed H200 sweeps of this size, renamed to today's implementations; a
    configuration measured twice keeps its newest row."""
    frames = []
    for path, rename in H200_SWEEPS.get(size, []):
        if Path(path).is_file():
            df = pd.read_csv(path)
            df = df[df["status"] == "ok"].assign(run=Path(path).relative_to("results/h200/train-memory").parts[0])
            frames.append(df.assign(bitlinear=df["bitlinear"].replace(rename)))
    if not frames:
        return pd.DataFrame()
    rows = pd.concat(frames, ignore_index=True)
    return rows.drop_duplicates(["arch", "bitlinear", "batch"], keep="first")

def _fast_and_full(label: str, args: list[str], full_batches: str, h200: pd.DataFrame) -> list[str]:
    """The lines of one fast sweep and its full trace at `full_batches`: wall and CPU times, the
    machine's load at the end of each, the worst fast/full disagreement and, given H200 rows, the
    worst error against them."""
    load = os.getloadavg()[0]
    fast_s, fast_cpu, fast_dir = _run(args)
    load_fast = os.getloadavg()[0]
    full_s, full_cpu, full_dir = _run([*args, "--batch", full_batches, "--estimate", "full"])
    load_full = os.getloadavg()[0]
    fast = pd.read_csv(fast_dir / "measurements.csv")
    full = pd.read_csv(full_dir / "measurements.csv")
    keys = ["arch", "bitlinear", "batch"]
    both = fast.merge(full, on=keys, suffixes=("_fast", "_full"))
    err = (both["peak_alloc_gib_fast"] / both["peak_alloc_gib_full"] - 1).abs().max() * 100
    lines = []
    if len(h200):
        m = fast.merge(h200, on=keys, suffixes=("_fast", "_h200"))
        rel = (m["peak_alloc_gib_fast"] / m["peak_alloc_gib_h200"] - 1) * 100
        worst = rel.abs().idxmax()
        impl = m.loc[worst, "bitlinear"] if isinstance(m.loc[worst, "bitlinear"], str) else ""
        lines.append(f"{label}: against {len(m)} H200 rows ({', '.join(sorted(set(m['run'])))}): worst "
                     f"{rel[worst]:+.2f}% ({m.loc[worst, 'arch']} {impl} b{m.loc[worst, 'batch']}, {m.loc[worst, 'run']})")
    lines.append(f"{label}: fast default sweep ({len(fast)} rows) {fast_s:.1f} s wall, {fast_cpu:.1f} s CPU "
                 f"(load {load:.2f} -> {load_fast:.2f}); full trace of batch {full_batches} ({len(full)} rows) "
                 f"{full_s:.1f} s wall, {full_cpu:.1f} s CPU (load -> {load_full:.2f}); worst |fast/full - 1| "
                 f"{err:.4f}% over {len(both)} rows")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1.3b,13b")
    ap.add_argument("--full-batches", default="1", help="batches the full trace is timed at")
    ap.add_argument("--fsdp", default="13b:8", help="SIZE:N of the per-rank FSDP2 rows ('' for none)")
    ap.add_argument("--out", default=None, help="also write the report here")
    a = ap.parse_args()
    lines = [f"host: {platform.node()} {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start "
             "(other jobs share the machine: the load is printed beside each run)",
             f"python {platform.python_version()}"]
    for size in a.sizes.split(","):
        lines += _fast_and_full(size, ["--size", size], a.full_batches, h200_rows(size))
    if a.fsdp:
        size, n = a.fsdp.split(":")
        lines += _fast_and_full(f"{size} FSDP2 per rank, world size {n}",
                                ["--size", size, "--shard", "fsdp", "--world-size", n], a.full_batches, pd.DataFrame())
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
