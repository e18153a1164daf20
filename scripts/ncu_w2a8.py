"""Hand one W2A8 GEMV launch per decode shape to Nsight Compute (run this under `ncu`).

Each case is set up as bench_w2a8.py sets it up (its own weights, row statistics read from a
buffer), run until autotuning has picked a configuration, then launched `--launches` more times
between cudaProfilerStart and cudaProfilerStop, each on a fresh copy of the weights (streamed
from HBM, as in a decode step). Under

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \
        --section WarpStateStats python3 scripts/ncu_w2a8.py --cases 13b:ifg+mlgru,1.3b:o_proj+residual

only those launches are profiled, and the summary names the configuration autotuning chose.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_w2a8 import gemv_cases  # noqa: E402

from mmprof.kernels import w2a8_gemv as gemv_mod  # noqa: E402
from mmprof.kernels.ternary_pack import pack_weight  # noqa: E402
from mmprof.kernels.w2a8_gemv import row_sums_ref, w2a8_gemv  # noqa: E402


def one_case(size: str, wanted: str, launches: int) -> None:
    name, parts, shared, epilogue, n, k = next(c for c in gemv_cases(size) if c[0] == wanted)
    nq = 1 if shared else parts
    packed, scale = pack_weight(torch.randn(parts * n, k, device="cuda") * 0.02)
    scales = scale.reshape(1).float().expand(nq).contiguous()
    copies = [packed.clone() for _ in range(launches + 1)]
    norms, pre = torch.ones(nq, k, device="cuda"), torch.ones(k, device="cuda")
    x = torch.randn(1, k, device="cuda")
    extra = dict(residual=torch.randn(1, n, device="cuda")) if epilogue == "residual" else {}
    if epilogue == "mlgru":
        extra = dict(state=torch.zeros(1, n, device="cuda"), lower_bound=torch.rand(n, device="cuda"),
                     gate_weight=pre.new_ones(n))  # fmt: skip
    sums = row_sums_ref(x, norms, pre)
    call = lambda p: w2a8_gemv(x, norms, p, scales, parts=parts, shared_quant=shared, pre_weight=pre,  # noqa: E731
                               epilogue=epilogue, sums=sums, **extra)  # fmt: skip
    call(copies[-1])  # autotune
    torch.cuda.synchronize()
    chosen = "; ".join(str(config) for config in gemv_mod._kernel.cache.values())
    print(f"{size} {name}: N {parts}x{n} K {k}; configuration {chosen}", flush=True)
    torch.cuda.cudart().cudaProfilerStart()
    for p in copies[:launches]:
        call(p)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    gemv_mod._kernel.cache.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="13b:ifg+mlgru,13b:gate_proj+glu,13b:down_proj+residual,1.3b:o_proj+residual")
    ap.add_argument("--launches", type=int, default=1)
    args = ap.parse_args()
    with torch.inference_mode():
        for case in args.cases.split(","):
            size, name = case.split(":")
            one_case(size, name, args.launches)


if __name__ == "__main__":
    main()
