"""Launch configurations of the packed decode step chosen inside its CUDA graph, as decoding runs it.

The autotuner times each W2A8 GEMV launch shape alone, with plain launches; in the step, launches
overlap (programmatic dependent launch) and share the GPU's caches, and its picks vary from call to
call. Here each launch shape of the step in turn gets every candidate (BLOCK_N, BLOCK_KW, warps)
pinned (`GemvOptions(pins=...)`) while the others keep their current choice, the step is captured
and replayed, and the fastest candidate is kept: one pass of coordinate descent from the GPU's
table in `mmprof/kernels/w2a8_tuned.py` (the autotuner's picks for shapes it lacks, or with
--autotuned for all). The model's buffers are random (the kernels do the same work whatever the
weights). Prints every trial, then the kept configurations as a Python dict.

    python scripts/tune_packed_step.py --sizes 1.3b,13b --out tune.csv
"""

import argparse
import csv
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mmprof.kernels.w2a8_gemv import GemvOptions, chosen_configs  # noqa: E402
from mmprof.profiler import time_fn  # noqa: E402
from profile_packed_step import graphed_decoder, random_packed_model  # noqa: E402

CANDIDATES = [(32, 32, 4), (64, 32, 4), (16, 128, 4), (32, 128, 8), (128, 16, 4), (128, 32, 4), (64, 64, 4),
              (32, 128, 4), (64, 128, 8), (256, 32, 8), (256, 16, 4), (128, 16, 2), (64, 32, 2), (256, 32, 4)]  # fmt: skip


SWITCHES = ("early_reads", "row_finish")  # GemvOptions fields of the kernel's optional designs, on by default


def step_us(model, options: GemvOptions) -> float:
    model.gemv_options = options
    dec = graphed_decoder(model, 1)
    us = time_fn(dec.graph.replay, warmup=5, repeats=40, device="cuda").median_s * 1e6
    del dec
    return us


def tune(size: str, rows: list, candidates: list, tuned: bool) -> dict:
    model = random_packed_model(size)
    options = GemvOptions(tuned=tuned)
    start_us = step_us(model, options)
    pins = dict(chosen_configs(options))
    start = "tuned table" if tuned else "autotuned"
    print(f"{size}: step {start_us:.1f} us with the {start} configurations {pins}", flush=True)
    rows.append([size, start, "", "", start_us])
    for key in list(pins):
        label = "N{} K{} parts{} {}".format(*key)
        trials = {}
        for cand in candidates:
            trials[cand] = step_us(model, GemvOptions(tuned=tuned, pins={**pins, key: cand}))
            rows.append([size, label, "x".join(map(str, cand)), "", trials[cand]])
        pins[key] = min(trials, key=trials.get)
        print(f"  {label}: " + ", ".join(f"{'x'.join(map(str, c))} {us:.1f}" for c, us in trials.items())
              + f"  -> {pins[key]}", flush=True)  # fmt: skip
    kept = GemvOptions(tuned=tuned, pins=pins)
    us = step_us(model, kept)
    rows.append([size, "kept", "", "", us])
    print(f"{size}: kept configurations: step {us:.1f} us", flush=True)
    for switch in SWITCHES:  # each of the kernel's optional designs turned off in turn, at the kept configurations
        us = step_us(model, dataclasses.replace(kept, **{switch: False}))
        rows.append([size, "kept", "", f"{switch}=False", us])
        print(f"{size}: kept configurations, {switch} off: step {us:.1f} us", flush=True)
    print(f"{size} pins = {pins!r}", flush=True)
    del model
    torch.cuda.empty_cache()
    return pins


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1.3b,13b")
    ap.add_argument("--out", default=None, help="CSV file to write")
    ap.add_argument("--candidates", default=None, help="BLOCK_NxBLOCK_KWxWARPS,... to try (default: a built-in list)")
    ap.add_argument("--autotuned", action="store_true", help="start from the autotuner's picks, not the tuned table")
    args = ap.parse_args()
    candidates = [tuple(int(v) for v in c.split("x")) for c in args.candidates.split(",")] if args.candidates else CANDIDATES
    rows = []
    print(f"on {torch.cuda.get_device_name()}", flush=True)
    with torch.inference_mode():
        for size in args.sizes.split(","):
            tune(size, rows, candidates, tuned=not args.autotuned)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            csv.writer(f).writerows([["size", "launch", "config", "variant", "step_us"]] + rows)


if __name__ == "__main__":
    main()
