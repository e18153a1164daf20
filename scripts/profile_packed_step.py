"""Where a packed MatMul-free decode step spends its time on a GPU: the step replayed from a CUDA
graph (as `decode-power` runs it), and each kernel inside that graph as the CUDA profiler sees it.

The model's buffers are random (valid 2-bit codes, unit norms): the kernels do the same work
whatever the weights. For each size it prints the step's time, the sum of its kernels' times (the
rest is the gaps between launches) and the kernels grouped by name, longest first; the W2A8 GEMV
launches by their place in a layer (layer 0's first launch apart: it computes its input's row
statistics itself). `--launch both` measures each size twice: GEMVs launched plainly, and with
programmatic dependent launch (each launch loads its weights while the previous one finishes; with
overlapping kernels the per-kernel sums exceed the step and the "gaps" go negative).

    python scripts/profile_packed_step.py --sizes 1.3b,13b --out step-profile.csv
"""

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mmprof.kernels.w2a8_gemv import GemvOptions  # noqa: E402
from mmprof.profiler import time_fn  # noqa: E402
from mmprof.workloads.decode import GraphDecoder  # noqa: E402
from mmprof.workloads.packed import PackedMMFreeLM  # noqa: E402
from mmprof.workloads.presets import get_config  # noqa: E402

REPLAYS = 10
LAUNCHES = ("ifg+mlgru", "o_proj+residual", "gate_proj+glu", "down_proj+residual")  # a layer's, in order


def random_packed_model(size: str) -> PackedMMFreeLM:
    model = PackedMMFreeLM(get_config(size), device="cuda")
    for buf in model.buffers():
        if buf.dtype == torch.int32:  # packed words: every 2-bit code 0 or 1 (weights -1 and 0)
            buf.copy_(torch.randint(-(2**31), 2**31 - 1, buf.shape, dtype=torch.int32, device="cuda") & 0x55555555)
    model.embeddings.weight.normal_(0, 0.02)
    return model


def graphed_decoder(model: PackedMMFreeLM, batch: int, device="cuda") -> GraphDecoder:
    """The step as `decode-power` replays it: a GraphDecoder captures it at its first prefill (its
    `graph` writes into the decoder's buffers: keep the decoder while replaying)."""
    dec = GraphDecoder(model.static_decoder(batch, 2), use_graph=True)
    dec.prefill(torch.zeros(batch, 1, dtype=torch.long, device=device))
    return dec


def profile_step(size: str, batch: int, options: GemvOptions = GemvOptions()):
    model = random_packed_model(size)
    model.gemv_options = options
    dec = graphed_decoder(model, batch)
    graph = dec.graph
    step_us = time_fn(graph.replay, warmup=5, repeats=50, device="cuda").median_s * 1e6
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPLAYS):
            graph.replay()
        torch.cuda.synchronize()
    per_name = defaultdict(lambda: [0, 0.0])
    events = sorted((ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA
                     and ev.device_time_total > 0), key=lambda ev: ev.time_range.start)  # fmt: skip
    gemvs_per_step = 4 * model.config.num_layers + 1
    gemv = 0
    for ev in events:
        name = ev.name
        if name.startswith("w2a8_gemv"):  # the step's launches in order: 4 per layer, then the head
            n = gemv % gemvs_per_step
            name = f"w2a8_gemv {'lm_head' if n == gemvs_per_step - 1 else LAUNCHES[n % 4]}"
            name += " (layer 0)" if n == 0 else ""
            gemv += 1
        per_name[name][0] += 1
        per_name[name][1] += ev.device_time_total
    kernels = sorted(((name, calls / REPLAYS, total / REPLAYS) for name, (calls, total) in per_name.items()),
                     key=lambda r: -r[2])  # fmt: skip
    del graph, dec, model
    torch.cuda.empty_cache()
    return step_us, kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1.3b,13b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--launch", choices=["plain", "dependent", "both"], default="dependent",
                    help="how the GEMVs are launched: plainly or with programmatic dependent launch")
    ap.add_argument("--out", default=None, help="CSV file to write")
    args = ap.parse_args()
    rows = []
    modes = ["plain", "dependent"] if args.launch == "both" else [args.launch]
    with torch.inference_mode():
        for size, mode in ((size, mode) for size in args.sizes.split(",") for mode in modes):
            step_us, kernels = profile_step(size, args.batch, GemvOptions(dependent_launch=mode == "dependent"))
            busy = sum(us for _, _, us in kernels)
            launches = sum(calls for _, calls, _ in kernels)
            print(f"{size} ({mode} launches): step {step_us:.1f} us ({1e6 / step_us:.0f} steps/s), kernels {busy:.1f} us in "
                  f"{launches:.0f} launches, gaps {step_us - busy:.1f} us on {torch.cuda.get_device_name()}")
            for name, calls, us in kernels:
                print(f"  {us:9.1f} us {calls:6.1f} calls {us / calls:8.2f} us/call  {name[:90]}")
                rows.append([size, args.batch, mode, step_us, name, calls, us])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            csv.writer(f).writerows([["size", "batch", "launch", "step_us", "kernel", "calls_per_step", "kernel_us_per_step"]]
                                    + rows)  # fmt: skip


if __name__ == "__main__":
    main()
