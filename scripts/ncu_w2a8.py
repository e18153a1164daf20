"""Hand one W2A8 GEMV launch per decode shape to Nsight Compute (run this under `ncu`).

Each case is set up by bench_w2a8.py's `gemv_setup` (its own weights, row statistics read from a
buffer), run until autotuning has picked a configuration, then launched `--launches` more times
between cudaProfilerStart and cudaProfilerStop, each on a fresh copy of the weights (streamed
from HBM, as in a decode step). Under

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \
        --section WarpStateStats python3 scripts/ncu_w2a8.py --cases 13b:ifg+mlgru,1.3b:o_proj+residual

only those launches are profiled, and the summary names the configuration chosen (the tuned table's, or with
--autotuned the autotuner's).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_w2a8 import gemv_cases, gemv_setup  # noqa: E402

from mmprof.kernels.w2a8_gemv import GemvOptions, chosen_configs  # noqa: E402


def one_case(size: str, wanted: str, launches: int, options: GemvOptions) -> None:
    name, parts, shared, epilogue, n, k = next(c for c in gemv_cases(size) if c[0] == wanted)
    _, _, packed, call = gemv_setup(1, parts, shared, epilogue, n, k, options)
    copies = [packed.clone() for _ in range(launches + 1)]
    call(copies[-1])  # autotune
    torch.cuda.synchronize()
    chosen = chosen_configs(options)[(n, k, parts, epilogue)]  # (BLOCK_N, BLOCK_KW, num_warps)
    print(f"{size} {name}: N {parts}x{n} K {k}; configuration {chosen}", flush=True)
    torch.cuda.cudart().cudaProfilerStart()
    for p in copies[:launches]:
        call(p)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="13b:ifg+mlgru,13b:gate_proj+glu,13b:down_proj+residual,1.3b:o_proj+residual")
    ap.add_argument("--launches", type=int, default=1)
    ap.add_argument("--autotuned", action="store_true", help="autotune every shape, not the tuned table")
    args = ap.parse_args()
    options = GemvOptions(tuned=not args.autotuned)
    with torch.inference_mode():
        for case in args.cases.split(","):
            size, name = case.split(":")
            one_case(size, name, args.launches, options)


if __name__ == "__main__":
    main()
