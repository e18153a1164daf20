"""Time the packed-weight inference kernels on a GPU at the 1.3b, 2.7b and 13b decode shapes.

For each of a MatMul-free layer's four fused W2A8 GEMV launches (i/f/g + MLGRU step, o_proj +
residual, gate_proj + GLU, down_proj + residual) and the lm_head, at batch 1 (and --batch), and for
the prefill path (`packed_bitlinear`: row quantisation + int8 small GEMM) at --prefill-rows rows, it
prints microseconds per call, GB/s and the fraction of the GPU's measured copy bandwidth. Beside
each GEMV shape the same product with bf16 weights through F.linear (cuBLAS) is timed: the
Transformer++ baseline's cost for a matrix of that shape.

Each GEMV reads its input's row statistics from a buffer, as in a decode step (where the launch that
wrote the input summed them). Bytes are counted analytically: packed weights + scales + norm
weights + inputs read once, outputs written once. Every call reads a different copy of the weights (enough copies to overflow the L2
cache), and 20 calls are replayed from one CUDA graph, so a figure is what a decode step sees:
weights streamed from HBM, no host launch overhead.

    python scripts/bench_w2a8.py --out results/h200/decode-power/bench-w2a8.csv
"""

import argparse
import csv
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mmprof.kernels.ternary_pack import pack_weight  # noqa: E402
from mmprof.kernels.w2a8_gemv import GemvOptions, row_sums_ref, w2a8_gemv  # noqa: E402
from mmprof.profiler import copy_bandwidth_gbps, time_fn  # noqa: E402
from mmprof.workloads.presets import get_config  # noqa: E402

CALLS_PER_GRAPH = 20
MIN_BYTES = 256 << 20  # weight copies per case: at least this many bytes, well past the 50 MB L2


def gemv_cases(size: str):
    """(name, parts, shared, epilogue, N, K) of one layer's launches and the head."""
    cfg = get_config(size)
    d, inter = cfg.hidden_size, cfg.intermediate_size
    return [("ifg+mlgru", 3, False, "mlgru", d, d), ("o_proj+residual", 1, False, "residual", d, d),
            ("gate_proj+glu", 2, True, "glu", inter, d), ("down_proj+residual", 1, False, "residual", d, inter),
            ("lm_head", 1, False, "store", cfg.vocab_size, d)]  # fmt: skip


def _copies(nbytes: int) -> int:
    return max(2, -(-MIN_BYTES // max(nbytes, 1)))


def _graph_time_us(calls) -> float:
    """Median time of one call of `calls` (a list of closures, cycled) replayed from a CUDA graph."""
    for c in calls[:2]:
        c()  # compile and autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls[:3]:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        for n in range(CALLS_PER_GRAPH):
            calls[n % len(calls)]()
    stats = time_fn(graph.replay, warmup=3, repeats=20, device="cuda")
    return stats.median_s / CALLS_PER_GRAPH * 1e6


def gemv_setup(batch, parts, shared, epilogue, n, k, options=GemvOptions()):
    """One launch's operands as a decode step has them (random weights packed per part, unit norms,
    row statistics summed beforehand): (w fp32, x, packed, a call taking a packed tensor, launched
    with `options`)."""
    nq = 1 if shared else parts
    w = torch.randn(parts * n, k, device="cuda") * 0.02
    packed, scale = pack_weight(w) if shared else (None, None)
    if not shared:
        pieces = [pack_weight(w[p * n : (p + 1) * n]) for p in range(parts)]
        packed, scale = torch.cat([p for p, _ in pieces]), torch.stack([s for _, s in pieces])
    scales = scale.reshape(-1).float()
    norms = torch.ones(nq, k, device="cuda")
    pre = torch.ones(k, device="cuda")
    x = torch.randn(batch, k, device="cuda")
    extra = dict(residual=torch.randn(batch, n, device="cuda")) if epilogue == "residual" else {}
    if epilogue == "mlgru":
        extra = dict(state=torch.zeros(batch, n, device="cuda"), lower_bound=torch.rand(n, device="cuda"),
                     gate_weight=pre.new_ones(n))  # fmt: skip
    sums = row_sums_ref(x, norms, pre)  # as in a decode step, the launch that wrote x summed them

    def call(p):
        return w2a8_gemv(x, norms, p, scales, parts=parts, shared_quant=shared, pre_weight=pre, epilogue=epilogue,
                         sums=sums, options=options, **extra)  # fmt: skip

    return w, x, packed, call


def bench_gemv(size, batch, name, parts, shared, epilogue, n, k, options=GemvOptions()):
    nq = 1 if shared else parts
    w, x, packed, call = gemv_setup(batch, parts, shared, epilogue, n, k, options)
    wbytes = packed.numel() * 4
    copies = [packed.clone() for _ in range(_copies(wbytes))]
    calls = [lambda p=p: call(p) for p in copies]
    us = _graph_time_us(calls)
    outs = {"store": parts, "residual": 1, "glu": 1, "mlgru": 2}[epilogue]
    nbytes = wbytes + 4 * (nq + 1) * k + 4 * batch * (k + (outs + (epilogue in ("residual", "mlgru"))) * n)
    del copies
    # the same matrix in bf16 through cuBLAS
    wb = [w.to(torch.bfloat16) for _ in range(_copies(w.numel() * 2))]
    xb = x.to(torch.bfloat16)
    us_bf16 = _graph_time_us([lambda m=m: F.linear(xb, m) for m in wb])
    bf16_bytes = w.numel() * 2 + 2 * batch * (k + parts * n)
    return [(f"w2a8_gemv {name}", us, nbytes), (f"bf16 F.linear {name}", us_bf16, bf16_bytes)]


def bench_prefill(size, rows, name, n, k):
    from mmprof.kernels.w2a8_gemm import packed_bitlinear

    w = torch.randn(n, k, device="cuda") * 0.02
    packed, scale = pack_weight(w)
    norm = torch.ones(k, device="cuda")
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    us = _graph_time_us([lambda: packed_bitlinear(x, norm, packed, scale, k)])
    return [(f"packed_bitlinear prefill {name}", us, packed.numel() * 4 + 2 * rows * (k + n))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1.3b,2.7b,13b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prefill-rows", type=int, default=256, help="0: skip the prefill path")
    ap.add_argument("--out", default=None, help="CSV file to write")
    ap.add_argument("--autotuned", action="store_true", help="autotune every shape, not the tuned table")
    args = ap.parse_args()
    copy_gbps = copy_bandwidth_gbps("cuda")
    rows = []
    with torch.inference_mode():
        for size in args.sizes.split(","):
            for name, parts, shared, epilogue, n, k in gemv_cases(size):
                shape = f"M{args.batch} K{k} N{parts}x{n}"
                for kernel, us, nbytes in bench_gemv(size, args.batch, name, parts, shared, epilogue, n, k,
                                                     GemvOptions(tuned=not args.autotuned)):
                    rows.append([kernel, size, shape, us, nbytes / us / 1e3])
                if name != "lm_head" and args.prefill_rows > 0:
                    pn = parts * n
                    for kernel, us, nbytes in bench_prefill(size, args.prefill_rows, name, pn, k):
                        rows.append([kernel, size, f"M{args.prefill_rows} K{k} N{pn}", us, nbytes / us / 1e3])
                torch.cuda.empty_cache()
    header = ["kernel", "size", "shape", "us_per_call", "gbps", "bandwidth_frac"]
    table = [r + [r[4] / copy_gbps] for r in rows]
    print(f"copy bandwidth {copy_gbps:.0f} GB/s on {torch.cuda.get_device_name()}")
    print(f"{header[0]:<38} {header[1]:>5} {header[2]:>22} {header[3]:>11} {header[4]:>8} {header[5]:>14}")
    for r in table:
        print(f"{r[0]:<38} {r[1]:>5} {r[2]:>22} {r[3]:>11.2f} {r[4]:>8.0f} {r[5]:>14.3f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            csv.writer(f).writerows([header + ["copy_gbps", "gpu"]] +
                                    [r + [copy_gbps, torch.cuda.get_device_name()] for r in table])  # fmt: skip


if __name__ == "__main__":
    main()
