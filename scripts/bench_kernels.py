"""Time the training kernels (MLGRU recurrence, norm-gate, chunked cross-entropy, BitLinear) on a GPU.

Each kernel runs forward and forward+backward at the 1.3b training shapes (16 x 2048 tokens,
hidden 2048, vocab 32000, bf16) beside its eager PyTorch equivalent, timed with
triton.testing.do_bench (median). Bytes moved are counted analytically (each input read once,
each output written once, no intermediates), so GB/s is a lower bound on the traffic really
generated; the fraction is of --peak-gbps (default: the H200's measured copy rate). The
cross-entropy is matmul-bound, so its TFLOP/s (model FLOPs: 2*N*H*V forward, 3x that with backward)
matters more than its GB/s.

    python scripts/bench_kernels.py --out results/h200/kernels.csv
"""

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

H200_COPY_GBPS = 4300.0  # measured device-to-device copy rate on an H200 (shared/TARGETS.md)
H200_BF16_TFLOPS = 790.0  # dense bf16 ceiling (DESIGN.md)


@dataclass
class Case:
    """One kernel at one shape: how to run it fast and eager, and what it must move and compute."""

    kernel: str
    shape: str
    fast: Callable  # () -> output tensors
    eager: Callable
    leaves: list  # tensors whose .grad backward fills
    bytes_fwd: int
    bytes_bwd: int
    flops_fwd: int = 0
    flops_bwd: int = 0


def _size(dtype):
    return torch.empty((), dtype=dtype).element_size()


def mlgru_case(batch, seq, hidden, dtype, device="cuda"):
    from mmprof.kernels.mlgru import mlgru, mlgru_ref

    f_pre = torch.randn(batch, seq, hidden, device=device, dtype=dtype, requires_grad=True)
    i_pre = torch.randn(batch, seq, hidden, device=device, dtype=dtype, requires_grad=True)
    lb = torch.rand(hidden, device=device, requires_grad=True)
    big, small = batch * seq * hidden * _size(dtype), batch * hidden * 4
    return Case(
        kernel="mlgru",
        shape=f"B{batch} T{seq} D{hidden}",
        fast=lambda: mlgru(f_pre, i_pre, lb),
        eager=lambda: mlgru_ref(f_pre, i_pre, lb),
        leaves=[f_pre, i_pre, lb],
        # forward reads f_pre, i_pre, lb, writes h, final state; backward reads f_pre, i_pre, h,
        # dh, lb, d final, writes df_pre, di_pre, per-row dlb, d state
        bytes_fwd=3 * big + hidden * 4 + small,
        bytes_bwd=6 * big + hidden * 4 + 3 * small,
    )


def norm_gate_case(tokens, hidden, dtype, device="cuda"):
    from mmprof.kernels.norm_gate import rms_norm_silu_gate, rms_norm_silu_gate_ref

    g = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    c = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    weight = torch.rand(hidden, device=device, requires_grad=True)
    big = tokens * hidden * _size(dtype)
    return Case(
        kernel="norm_gate",
        shape=f"N{tokens} D{hidden}",
        fast=lambda: rms_norm_silu_gate(g, c, weight),
        eager=lambda: rms_norm_silu_gate_ref(g, c, weight),
        leaves=[g, c, weight],
        # forward reads g, c, w, writes out, rstd; backward reads g, c, dout, rstd, w, writes dg, dc, dw
        bytes_fwd=3 * big + hidden * 4 + tokens * 4,
        bytes_bwd=5 * big + 2 * hidden * 4 + tokens * 4,
    )


def cross_entropy_case(tokens, hidden, vocab, chunk_tokens, dtype, device="cuda"):
    from mmprof.kernels.cross_entropy import linear_cross_entropy

    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, hidden, device=device) / hidden**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=device)
    x_bytes, w_bytes = tokens * hidden * _size(dtype), vocab * hidden * _size(dtype)
    flops = 2 * tokens * hidden * vocab
    return Case(
        kernel="linear_cross_entropy",
        shape=f"N{tokens} H{hidden} V{vocab} chunk{chunk_tokens}",
        fast=lambda: linear_cross_entropy(x, weight, labels, chunk_tokens=chunk_tokens),
        # what autocast training does without it: half-precision logits, then fp32 cross-entropy
        eager=lambda: F.cross_entropy(F.linear(x, weight).float(), labels),
        leaves=[x, weight],
        # forward reads x, W, labels, writes lse, loss; backward reads x, W, labels, lse, writes dx, dW
        bytes_fwd=x_bytes + w_bytes + tokens * 8 + tokens * 4 + 4,
        bytes_bwd=2 * (x_bytes + w_bytes) + tokens * 8 + tokens * 4,
        flops_fwd=flops,
        flops_bwd=2 * flops,
    )


def bitlinear_case(tokens, in_features, out_features, dtype, device="cuda"):
    """The fused BitLinear op (RMSNorm + int8 activations + ternary weights + matmul) vs the naive (all plain PyTorch) one."""
    from mmprof.kernels.bitlinear import bitlinear

    x = torch.randn(tokens, in_features, device=device, dtype=dtype, requires_grad=True)
    norm_w = torch.rand(in_features, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(out_features, in_features, device=device) / in_features**0.5).to(dtype).requires_grad_()
    esize = _size(dtype)
    x_bytes, w_bytes, y_bytes = tokens * in_features * esize, out_features * in_features * esize, \
        tokens * out_features * esize
    flops = 2 * tokens * in_features * out_features
    return Case(
        kernel="bitlinear",
        shape=f"N{tokens} K{in_features} N_out{out_features}",
        fast=lambda: bitlinear(x, norm_w, weight, "fused"),
        eager=lambda: bitlinear(x, norm_w, weight, "naive"),
        leaves=[x, norm_w, weight],
        # forward reads x, w, writes y; backward reads x, w, dy, writes dx, dw (stats are negligible)
        bytes_fwd=x_bytes + w_bytes + y_bytes,
        bytes_bwd=2 * x_bytes + 2 * w_bytes + y_bytes,
        flops_fwd=flops,
        flops_bwd=2 * flops,
    )


def _outputs(result):
    return [result] if isinstance(result, torch.Tensor) else [t for t in result if t.requires_grad]


def time_ms(fn: Callable, leaves: list, backward: bool) -> float:
    """Median milliseconds of fn (and, if backward, of fn followed by backward with fixed upstream grads)."""
    from triton.testing import do_bench

    if not backward:

        def run():
            with torch.no_grad():
                fn()

        return do_bench(run, return_mode="median")
    grads = [torch.randn_like(t) for t in _outputs(fn())]

    def run():
        torch.autograd.backward(_outputs(fn()), grads)

    return do_bench(run, grad_to_none=leaves, return_mode="median")


def measure(case: Case, peak_gbps: float, peak_tflops: float) -> list[dict]:
    rows = []
    for mode, backward in (("fwd", False), ("fwd+bwd", True)):
        fast_ms = time_ms(case.fast, case.leaves, backward)
        eager_ms = time_ms(case.eager, case.leaves, backward)
        moved = case.bytes_fwd + (case.bytes_bwd if backward else 0)
        flops = case.flops_fwd + (case.flops_bwd if backward else 0)
        gbps = moved / fast_ms / 1e6
        tflops = flops / fast_ms / 1e9
        rows.append(
            {
                "kernel": case.kernel,
                "shape": case.shape,
                "mode": mode,
                "time_ms": round(fast_ms, 4),
                "eager_time_ms": round(eager_ms, 4),
                "speedup_vs_eager": round(eager_ms / fast_ms, 2),
                "bytes_moved": moved,
                "gbps": round(gbps, 1),
                "frac_peak_gbps": round(gbps / peak_gbps, 3),
                "tflops": round(tflops, 1) if flops else "",
                "frac_peak_tflops": round(tflops / peak_tflops, 3) if flops else "",
            }
        )
    return rows


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in rows[0]:
        table.add_column(column, justify="left" if column in ("kernel", "shape", "mode") else "right")
    for row in rows:
        table.add_row(*(str(value) for value in row.values()))
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # piped to a file: do not wrap the columns at 80
    console.print(table)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk-tokens", type=int, default=4096)
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--peak-gbps", type=float, default=H200_COPY_GBPS, help="memory bandwidth ceiling, GB/s")
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS, help="matmul ceiling, TFLOP/s")
    parser.add_argument("--out", type=Path, default=Path("bench_kernels.csv"), help="CSV to write")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU, and torch sees none", file=sys.stderr)
        return 2
    from mmprof.workloads import glu_intermediate_size

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    tokens = args.batch * args.seq
    builders = [
        lambda: mlgru_case(args.batch, args.seq, args.hidden, dtype),
        lambda: norm_gate_case(tokens, args.hidden, dtype),
        lambda: cross_entropy_case(tokens, args.hidden, args.vocab, args.chunk_tokens, dtype),
        # the 1.3b GLU projections: gate_proj (d -> 2I) and down_proj (I -> d)
        lambda: bitlinear_case(tokens, args.hidden, 2 * glu_intermediate_size(args.hidden), dtype),
        lambda: bitlinear_case(tokens, glu_intermediate_size(args.hidden), args.hidden, dtype),
    ]
    rows = []
    for build in builders:
        case = build()
        rows += measure(case, args.peak_gbps, args.peak_tflops)
        del case
        torch.cuda.empty_cache()
    print_table(rows, f"{torch.cuda.get_device_name()}, {args.dtype}; eager = plain PyTorch equivalent")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
