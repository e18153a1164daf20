"""Build the W2A8 GEMV for sm_90 without a GPU and count its machine instructions.

Triton's compiler and the ptxas/cuobjdump it ships need no GPU, so a kernel change can be read
before any device time is spent: registers per thread (what bounds occupancy), barriers, and the
kernel's instructions per 16-weight word of a program's tile against the 8 of the dp4a core (4 IDP,
4 masks). The counts are static: the whole kernel, the epilogue that only a block's last
program runs included. The launch is one of a MatMul-free layer's (as bench_w2a8.py names them); the
integer arguments are marked divisible by 16, as Triton specialises them at the presets' shapes, and
the row statistics are read from the producer, as everywhere but layer 0 (--sums-pass: computed in
a pass over the row).

    python scripts/sass_w2a8.py --launch ifg+mlgru --block-n 32 --block-kw 32 --warps 4
"""

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_w2a8 import gemv_cases  # noqa: E402

from mmprof.kernels import w2a8_gemv_triton as tri  # noqa: E402
from mmprof.kernels.w2a8_gemv import EPILOGUES  # noqa: E402

LAUNCHES = {case[0]: case[1:4] for case in gemv_cases("1.3b")}  # name: (parts, shared quantisation, epilogue)
# the next launch's pre-norm weight, as a decode step passes it: the gate after the MLGRU step, a
# norm weight after a residual add (the next layer's or the head's), none after the GLU or the head
NEXT_PRE = {"mlgru": 2, "residual": 1, "glu": 0, "store": 0}
INT_ARGS = {"N", "K", "KW", "stride_x", "stride_a", "stride_out"}
INT_POINTERS = {"W", "ACC", "CNT"}


def compile_sm90(launch: str, block_n: int, block_kw: int, warps: int, one_split: bool, early: bool,
                 sums_in: bool = True) -> bytes:
    parts, shared, epilogue = LAUNCHES[launch]
    consts = dict(NT=parts, SHARED_QUANT=shared, HAS_PRE=True, A_ROWS=False, NQ=1 if shared else parts,
                  EPILOGUE=EPILOGUES[epilogue], HAS_LB=epilogue == "mlgru", USE_PTX=True, HAS_ST_IN=sums_in,
                  NQN=0 if epilogue == "store" else 1, NEXT_A=NEXT_PRE[epilogue], STATS_BLOCK=4096,
                  ONE_SPLIT=one_split, ROW_FINISH=parts <= 2 and not one_split, EVEN=True, USE_PDL=True, EARLY_RES=early, BLOCK_N=block_n, BLOCK_KW=block_kw)  # fmt: skip
    signature, attrs = {}, {}
    for i, name in enumerate(tri.w2a8_gemv_kernel.arg_names):
        if name in consts:
            signature[name] = "constexpr"
            continue
        if name.startswith("eps"):
            signature[name] = "fp32"
            continue
        signature[name] = ("i32" if name in INT_ARGS else "*i32" if name in INT_POINTERS else "*i64" if name == "ACC64"
                           else "*fp32")
        attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=tri.w2a8_gemv_kernel, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["cubin"]


def cuobjdump(*args: str) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return subprocess.run([str(tool), *args], check=True, capture_output=True, text=True).stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--launch", choices=sorted(LAUNCHES), default="ifg+mlgru")
    ap.add_argument("--block-n", type=int, default=32)
    ap.add_argument("--block-kw", type=int, default=32)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--one-split", action="store_true", help="the slice is the whole row (no atomics)")
    ap.add_argument("--late-reads", action="store_true", help="residual and state read after the wait")
    ap.add_argument("--sums-pass", action="store_true", help="the row statistics computed in a pass over the row")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "w2a8_gemv.cubin"
        cubin.write_bytes(compile_sm90(args.launch, args.block_n, args.block_kw, args.warps, args.one_split,
                                       not args.late_reads, not args.sums_pass))
        usage, sass = cuobjdump("-res-usage", str(cubin)), cuobjdump("-sass", str(cubin))
    ops = collections.Counter(m.group(1).split(".")[0] for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass))
    words = LAUNCHES[args.launch][0] * args.block_n * args.block_kw / (32 * args.warps)
    total = sum(ops.values())
    print(re.search(r"REG:\d+.*?SHARED:\d+", usage).group(0))
    print(f"{total} instructions (static) per thread for {words:g} weight words: {total / words:.1f} per word "
          f"(the dp4a core is 8), {ops['BAR']} barriers")
    print("  ".join(f"{name} {count}" for name, count in ops.most_common(16)))


if __name__ == "__main__":
    main()
