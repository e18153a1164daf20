"""Decode-time BitLinear on packed ternary weights (W2A8): a few rows (batch 1-8) per call, with the
norms before the projection, the int8 activation quantisation and the op after it fused in.

For an input row x [K], an optional pre-norm weight a ([K], or [M, K] per row) and each quantised
part p's BitLinear norm weight b_p [K]:

    with a pre-norm:  r1 = 1/sqrt(sum x^2 / K + pre_eps),  u = x * a
                      rowmult = r1 / sqrt(r1^2 * sum u^2 / K + eps)   (RMSNorm, then BitLinear's)
    without:          u = x,  rowmult = 1/sqrt(sum x^2 / K + eps)     (BitLinear's RMSNorm only)
    amax_p = max(max|u * b_p| * rowmult, 1e-5)
    q_p    = round(u * b_p * (rowmult * 127 / amax_p)).clamp(-128, 127)      (int8)
    acc    = sum_k q_p[k] * t[n, k]                                         (int32, t in {-1, 0, 1})
    y      = acc * (amax_p / 127) * w_scale_p

which is the fake-quantised BitLinear of the training path up to float rounding. `parts` weight
matrices of N rows each are stacked in one packed tensor [parts * N, K/16]; each part is quantised
with its own norm weight and scale, or all with the first (`shared_quant`, for the two halves of one
matrix). Epilogues: "store" (y of every part), "residual" (residual + y), "mlgru" (parts i, f, g of
an MLGRU: the recurrent state is updated in place and g and gate_weight * silu(state) are returned,
the inputs of the next call's norm-gate prologue), "glu" (silu(y_a) * y_b).

Row statistics. The quantisation needs, per row, sum x^2, sum u^2 and max |u * b_p| (`row_sums_ref`).
By default each program computes them in a first pass over its input row. A launch whose output is
the next launch's input can instead add them up as it writes the row (`next_sums=(buffer [M, 5],
the next launch's norm_weights, its pre_weight, or "gate" after the "mlgru" epilogue)`, the buffer
zeroed beforehand), and the next launch reads them (`sums=buffer`) and skips that pass.

Each launch splits K over many programs; their int32 sums meet in a per-device workspace that every
launch leaves zeroed, so launches on one device must not run concurrently on two streams.

How a launch runs (the tuned table or pinned configurations, dependent launch, row finishing, early
reads) is a `GemvOptions` passed per call (`options=`, defaults as measured fastest); docs/kernels.md
describes the designs behind each.

`w2a8_gemv_int` is the integer core alone (int8 input, int32 output), bit-exact against its twin
(`w2a8_matmul_ref`, the small GEMM's, the same function).
Every function has a plain-PyTorch twin (`*_ref`), used off CUDA and by the tests.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from mmprof.kernels import w2a8_gemv_triton as tri
from mmprof.kernels._triton_util import autotune_configs, device_guard, interpreting, select_backend
from mmprof.kernels.ternary import NORM_EPS, SCALE_FLOOR
from mmprof.kernels.mlgru_scan import mlgru_gates
from mmprof.kernels.ternary_pack import packed_words
from mmprof.kernels.w2a8_gemm import w2a8_matmul_ref
from mmprof.kernels.w2a8_tuned import TUNED

EPILOGUES = {name: code.value for name, code in [("store", tri.EPI_STORE), ("residual", tri.EPI_RESIDUAL),
                                                 ("mlgru", tri.EPI_MLGRU), ("glu", tri.EPI_GLU)]}

_GPU_CONFIGS = [({"BLOCK_N": bn, "BLOCK_KW": kw}, warps) for bn, kw, warps in [
    (32, 32, 4), (64, 32, 4), (128, 32, 8), (64, 64, 8), (16, 128, 4), (32, 128, 8)]]  # fmt: skip
_INTERPRET_CONFIG = {"BLOCK_N": 4, "BLOCK_KW": 4}
_CONFIGS = autotune_configs(_GPU_CONFIGS, interpret=_INTERPRET_CONFIG)
STATS_BLOCK = 4096  # inputs per pass of the statistics loop: one or a few passes at the presets' widths
_EPILOGUE_NAMES = {code: name for name, code in EPILOGUES.items()} | {tri.EPI_INT.value: "int"}
_SMALLEST_BLOCK_N = min([config.kwargs["BLOCK_N"] for config in _CONFIGS]
                        + [pin[0] for table in TUNED.values() for pin in table.values()])  # fmt: skip


class MlgruResult(NamedTuple):
    """What the "mlgru" epilogue returns: the g projection and gate_weight * silu(new state)."""

    g: Tensor
    gate: Tensor


class QuantizedParts(NamedTuple):
    levels: Tensor  # [parts, M, K] int8
    amax: Tensor  # [parts, M] fp32


@dataclass(frozen=True)
class GemvOptions:
    """How `w2a8_gemv` launches; the defaults are the designs the packed decode step was measured
    fastest with on the H200 (results/h200/kernels/tune-packed-step/). Passed per call, so one
    caller's options change nobody else's launches.

    tuned: the GPU's table in `w2a8_tuned` where it has the shape (False: autotune every shape).
    pins: launch shapes (N, K, parts, epilogue name) -> (BLOCK_N, BLOCK_KW, num_warps) used before the
    table and the autotuner (a dict is accepted and kept as sorted pairs, so the options stay hashable).
    dependent_launch: programmatic dependent launch where the GPU has it (Hopper on); False: plain.
    row_finish: split-K rows finished by the program adding their last slice, where they fit in one
    64-bit word (see `_rows_finish`); False: every split-K launch counts arrivals per block of rows.
    early_reads: settled residuals and states read before waiting for the previous launch; False: after.
    """

    tuned: bool = True
    pins: tuple = ()
    dependent_launch: bool = True
    row_finish: bool = True
    early_reads: bool = True

    def __post_init__(self):
        pins = tuple(sorted(dict(self.pins).items()))
        for key, (_, block_kw, _) in pins:
            if block_kw % 4:  # a thread's four adjacent word columns are chained (see _times_codes)
                raise ValueError(f"{key}: BLOCK_KW must be a multiple of 4, got {block_kw}")
        object.__setattr__(self, "pins", pins)

    def config_for(self, shape: tuple, device: torch.device) -> tuple | None:
        """(BLOCK_N, BLOCK_KW, num_warps) pinned or tuned for a launch shape (N, K, parts, epilogue
        name) on `device`; None: autotuned."""
        pin = dict(self.pins).get(shape)
        if pin is None and self.tuned:
            pin = _tuned_for(device).get(shape)
        return pin

    @property
    def smallest_block_n(self) -> int:
        """The narrowest block any launch can get (what the arrival counts are sized for)."""
        return min([_SMALLEST_BLOCK_N, *(pin[0] for _, pin in self.pins)])


DEFAULT_OPTIONS = GemvOptions()


@functools.lru_cache(maxsize=None)
def _tuned_for(device: torch.device) -> dict:
    return TUNED.get(torch.cuda.get_device_name(device), {}) if device.type == "cuda" else {}


def _pinned(configs, nargs, *, gemv_options: GemvOptions, **kwargs):
    """The autotuner's pruning hook: the one configuration pinned or tuned for this launch shape."""
    shape = (nargs["N"], nargs["K"], kwargs["NT"], _EPILOGUE_NAMES[kwargs["EPILOGUE"]])
    pin = gemv_options.config_for(shape, nargs["X"].device)
    if pin is None or interpreting():
        return configs
    return [triton.Config({"BLOCK_N": pin[0], "BLOCK_KW": pin[1]}, num_warps=pin[2])]


def _tiles_exactly(args) -> bool:
    """The blocks cover the weights and the inputs with nothing left over (no masks needed)."""
    return args["N"] % args["BLOCK_N"] == 0 and args["KW"] % args["BLOCK_KW"] == 0 and args["K"] == 16 * args["KW"]


def _rows_finish(args, row_finish: bool) -> bool:
    """Split-K rows finished by the program adding their last slice, seen in the value a 64-bit atomic
    returns (arrival count and sums in one word): one part (32-bit sum), or two whose sums fit in 24
    bits (|sum| <= 128 K < 2^23). Else (or with row_finish off) a block's programs count arrivals."""
    fits = args["NT"] == 1 or (args["NT"] == 2 and 128 * args["K"] < 1 << 23)
    return row_finish and fits and args["KW"] > args["BLOCK_KW"]


def _kernel_for(options: GemvOptions):
    """The autotuned kernel for these options' table choices (one autotuner, and so one cache of
    choices, per distinct tuned / pins / row_finish; the compiled kernels are shared)."""
    return _autotuner(options.tuned, options.pins, options.row_finish)


@functools.lru_cache(maxsize=None)
def _autotuner(tuned: bool, pins: tuple, row_finish: bool):
    options = GemvOptions(tuned=tuned, pins=pins, row_finish=row_finish)
    return triton.autotune(
        configs=_CONFIGS, key=["N", "K", "NT", "EPILOGUE"],
        prune_configs_by={"early_config_prune": functools.partial(_pinned, gemv_options=options)},
        restore_value=["H", "ST_OUT"],  # benchmarking runs a launch many times: keep in-place state and sums
    )(triton.heuristics({"ONE_SPLIT": lambda args: args["KW"] <= args["BLOCK_KW"], "EVEN": _tiles_exactly,
                         "ROW_FINISH": lambda args: _rows_finish(args, row_finish)})(
        tri.w2a8_gemv_kernel))  # fmt: skip


_workspaces: dict[torch.device, Tensor] = {}


@functools.lru_cache(maxsize=None)
def _has_dependent_launch(device: torch.device) -> bool:  # asked at every launch: cached
    return torch.cuda.get_device_capability(device)[0] >= 9


def chosen_configs(options: GemvOptions = DEFAULT_OPTIONS) -> dict[tuple, tuple]:
    """What each launch shape (N, K, parts, epilogue name) has run with so far under these options:
    pinned, tuned or autotuned."""
    return {(*key[:3], _EPILOGUE_NAMES[key[3]]): (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_KW"], c.num_warps)
            for key, c in _kernel_for(options).cache.items()}  # fmt: skip


def _workspace(device: torch.device, ints: int) -> Tensor:
    """The device's zeroed int32 scratch for split-K sums and arrival counts (each launch leaves
    what it used zeroed). Grown outside CUDA-graph capture only: a step is run once before capture."""
    buf = _workspaces.get(device)
    if buf is None or buf.numel() < ints:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("w2a8_gemv: run each shape once before capturing it in a CUDA graph "
                               "(its split-K workspace is allocated on first use)")  # fmt: skip
        buf = torch.zeros(max(ints, 1 << 16), dtype=torch.int32, device=device)
        _workspaces[device] = buf
    return buf


def _check(x, packed, features, parts, quantised, norm_weights, w_scales):
    if x.dim() != 2 or x.shape[1] != features:
        raise ValueError(f"x must be [rows, {features}], got {tuple(x.shape)}")
    if packed.dtype != torch.int32 or packed.shape[1] != packed_words(features) or packed.shape[0] % parts:
        raise ValueError(f"packed must be int32 [{parts} * N, {packed_words(features)}], got {tuple(packed.shape)}")
    if norm_weights is not None and tuple(norm_weights.shape) != (quantised, features):
        raise ValueError(f"norm_weights must be [{quantised}, {features}], got {tuple(norm_weights.shape)}")
    if w_scales is not None and w_scales.numel() != quantised:
        raise ValueError(f"w_scales must hold {quantised} scales, got {w_scales.numel()}")
    return packed.shape[0] // parts


def w2a8_gemv(
    x: Tensor, norm_weights: Tensor, packed: Tensor, w_scales: Tensor, *, parts: int = 1, shared_quant: bool = False,
    pre_weight: Tensor | None = None, pre_eps: float = 1e-6, eps: float = NORM_EPS, epilogue: str = "store",
    residual: Tensor | None = None, state: Tensor | None = None, lower_bound: Tensor | None = None,
    gate_weight: Tensor | None = None, sums: Tensor | None = None, next_sums: tuple | None = None,
    settled: bool = False, backend: str = "auto", options: GemvOptions = DEFAULT_OPTIONS,
):  # fmt: skip
    """See the module docstring. x [M, K] (made for M = 1..8: each row's programs stream the weights
    again); fp32 results (an `MlgruResult` for "mlgru"). settled: the residual and state were written
    two or more launches before this one (or not by a kernel), so a dependent launch may read them
    before the previous launch has finished. options: how the kernel launches (`GemvOptions`)."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {', '.join(EPILOGUES)}, got {epilogue!r}")
    quantised = 1 if shared_quant else parts
    n = _check(x, packed, x.shape[1], parts, quantised, norm_weights, w_scales)
    need = {"residual": 1, "mlgru": 3, "glu": 2}.get(epilogue)
    if need is not None and parts != need:
        raise ValueError(f"epilogue {epilogue!r} needs parts={need}, got {parts}")
    if epilogue == "mlgru" and (state is None or gate_weight is None or shared_quant):
        raise ValueError("epilogue 'mlgru' needs state and gate_weight, and separately quantised parts")
    if epilogue == "glu" and not shared_quant:
        raise ValueError("epilogue 'glu' takes the two halves of one matrix: shared_quant=True")
    if epilogue == "residual" and residual is None:
        raise ValueError("epilogue 'residual' needs residual")
    if next_sums is not None and epilogue == "store":
        raise ValueError("next_sums needs an epilogue that writes one row: residual, mlgru or glu")
    args = dict(parts=parts, shared_quant=shared_quant, pre_weight=pre_weight, pre_eps=pre_eps, eps=eps,
                epilogue=epilogue, residual=residual, state=state, lower_bound=lower_bound, gate_weight=gate_weight,
                sums=sums, next_sums=next_sums)  # fmt: skip
    if select_backend(backend, x) == "torch":
        return w2a8_gemv_ref(x, norm_weights, packed, w_scales, **args)
    m = x.shape[0]
    out = torch.empty(m, parts * n if epilogue == "store" else n, device=x.device, dtype=torch.float32)
    gate_out = torch.empty(m, n, device=x.device, dtype=torch.float32) if epilogue == "mlgru" else out
    sums_out, next_norms, next_pre = next_sums if next_sums is not None else (out, out, None)
    next_kind = 0 if next_pre is None else 2 if isinstance(next_pre, str) else 1
    if next_kind == 2 and (next_pre != "gate" or epilogue != "mlgru"):
        raise ValueError("the next pre-norm weight may be 'gate' only after the 'mlgru' epilogue")
    _launch(
        x.contiguous(), packed, out, n, parts, options, epilogue=EPILOGUES[epilogue], shared=shared_quant,
        quantised=quantised, pre_weight=pre_weight.contiguous() if pre_weight is not None else None,
        norm_weights=norm_weights.contiguous(), w_scales=w_scales.float().contiguous(), residual=residual,
        state=state, lower_bound=lower_bound, gate_weight=gate_weight, gate_out=gate_out, sums_in=sums,
        sums_out=sums_out, next_pre=next_pre if next_kind == 1 else None, next_norms=next_norms,
        next_quantised=next_norms.shape[0] if next_sums is not None else 0, next_kind=next_kind,
        pre_eps=pre_eps, eps=eps, settled=settled,
    )  # fmt: skip
    if epilogue == "mlgru":
        return MlgruResult(out, gate_out)
    return out


def _launch(x, packed, out, n, parts, options: GemvOptions, *, epilogue, shared=True, quantised=1, pre_weight=None,
            norm_weights=None, w_scales=None, residual=None, state=None, lower_bound=None, gate_weight=None,
            gate_out=None, sums_in=None, sums_out=None, next_pre=None, next_norms=None, next_quantised=0,
            next_kind=0, pre_eps=0.0, eps=0.0, settled=False):  # fmt: skip
    """One launch; pointers that a configuration does not read are given `out` (never dereferenced)."""
    for t in (residual, state, sums_in, sums_out):
        if t is not None and not t.is_contiguous():
            raise ValueError("residual, state and sums buffers must be contiguous")
    k, m = x.shape[1], x.shape[0]
    pre_rows = pre_weight is not None and pre_weight.dim() == 2
    sums_ints = m * max(parts, 2) * n  # ACC: [M, parts, N] int32 or [M, N] int64 sums, then CNT: [M, N blocks]
    work = _workspace(x.device, sums_ints + m * triton.cdiv(n, options.smallest_block_n))
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(packed.shape[1], meta["BLOCK_KW"]), m)  # noqa: E731
    ptr = lambda t: out if t is None else t  # noqa: E731
    pdl = options.dependent_launch and x.is_cuda and _has_dependent_launch(x.device)
    launch = {"launch_pdl": True} if pdl else {}  # the interpreter takes no launch options
    with device_guard(x):
        _kernel_for(options)[grid](
            x, ptr(pre_weight), ptr(norm_weights), packed, ptr(w_scales), out, ptr(residual), ptr(state),
            ptr(lower_bound), ptr(gate_weight), ptr(gate_out), ptr(sums_in), ptr(sums_out), ptr(next_pre),
            ptr(next_norms), work, work[sums_ints:], work[: 2 * m * n].view(torch.int64),
            n, k, packed.shape[1], x.stride(0), pre_weight.stride(0) if pre_rows else 0, out.stride(0),
            float(pre_eps), float(eps),
            NT=parts, SHARED_QUANT=shared, HAS_PRE=pre_weight is not None, A_ROWS=pre_rows, NQ=quantised,
            EPILOGUE=epilogue, HAS_LB=lower_bound is not None, USE_PTX=not interpreting(),
            HAS_ST_IN=sums_in is not None, NQN=next_quantised, NEXT_A=next_kind,
            STATS_BLOCK=min(STATS_BLOCK, triton.next_power_of_2(k)), USE_PDL=pdl,
            EARLY_RES=settled and options.early_reads, **launch,
        )  # fmt: skip


def w2a8_gemv_int(
    q: Tensor, packed: Tensor, features: int, *, backend: str = "auto", options: GemvOptions = DEFAULT_OPTIONS
) -> Tensor:
    """int8 q [M, K] times the ternary matrix packed [N, K/16] -> int32 [M, N], exact."""
    if q.dtype != torch.int8:
        raise ValueError(f"q must be int8, got {q.dtype}")
    n = _check(q, packed, features, 1, 1, None, None)
    if select_backend(backend, q) == "torch":
        return w2a8_matmul_ref(q, packed, features)
    out = torch.empty(q.shape[0], n, device=q.device, dtype=torch.int32)
    _launch(q.contiguous(), packed, out, n, 1, options, epilogue=tri.EPI_INT.value)
    return out


# ---------------------------------------------------------------------------------------------
# Plain-PyTorch twins
# ---------------------------------------------------------------------------------------------


def row_sums_ref(x: Tensor, norm_weights: Tensor, pre_weight: Tensor | None = None) -> Tensor:
    """[M, 5] fp32: sum x^2, sum (x*a)^2 (0 without a pre-norm) and max |x*a*b_p| for p < 3 (0 past
    the last part): what the kernel's statistics pass computes, and what `next_sums` accumulates."""
    xf = x.float()
    u = xf * pre_weight.float() if pre_weight is not None else xf
    sums = xf.new_zeros(x.shape[0], 5)
    sums[:, 0] = (xf * xf).sum(-1)
    if pre_weight is not None:
        sums[:, 1] = (u * u).sum(-1)
    for p, b in enumerate(norm_weights.float()):
        sums[:, 2 + p] = (u * b).abs().amax(-1)
    return sums


def quantize_parts_ref(x, norm_weights, pre_weight=None, pre_eps=1e-6, eps=NORM_EPS, sums=None):
    """`QuantizedParts` (levels [parts, M, K] int8, amax [parts, M]) as the kernel quantises (sums:
    row_sums_ref's)."""
    xf = x.float()
    k = x.shape[1]
    sums = row_sums_ref(x, norm_weights, pre_weight) if sums is None else sums
    if pre_weight is not None:
        u = xf * pre_weight.float()
        r1 = 1.0 / torch.sqrt(sums[:, 0] / k + pre_eps)
        rowmult = r1 / torch.sqrt(r1 * r1 * sums[:, 1] / k + eps)
    else:
        u = xf
        rowmult = 1.0 / torch.sqrt(sums[:, 0] / k + eps)
    qs, amaxes = [], []
    for p, b in enumerate(norm_weights.float()):
        amax = (sums[:, 2 + p] * rowmult).clamp(min=SCALE_FLOOR)
        qs.append(((u * b) * (rowmult * (127.0 / amax))[:, None]).round().clamp(-128, 127).to(torch.int8))
        amaxes.append(amax)
    return QuantizedParts(torch.stack(qs), torch.stack(amaxes))


def _add_next_sums(next_sums, written, gate):
    buf, next_norms, next_pre = next_sums
    new = row_sums_ref(written, next_norms, gate if isinstance(next_pre, str) else next_pre)
    buf[:, :2] += new[:, :2]
    buf[:, 2:] = torch.maximum(buf[:, 2:], new[:, 2:])


def w2a8_gemv_ref(x, norm_weights, packed, w_scales, *, parts=1, shared_quant=False, pre_weight=None,
                  pre_eps=1e-6, eps=NORM_EPS, epilogue="store", residual=None, state=None, lower_bound=None,
                  gate_weight=None, sums=None, next_sums=None):  # fmt: skip
    k = x.shape[1]
    n = packed.shape[0] // parts
    levels, amax = quantize_parts_ref(x, norm_weights, pre_weight, pre_eps, eps, sums)
    scales = w_scales.float().reshape(-1)
    ys = []
    for p in range(parts):
        j = 0 if shared_quant else p
        acc = w2a8_matmul_ref(levels[j], packed[p * n : (p + 1) * n], k)
        ys.append(acc.float() * (amax[j] / 127.0)[:, None] * scales[j])
    if epilogue == "store":
        return torch.cat(ys, dim=1)
    gate = None
    if epilogue == "residual":
        out = written = residual.float() + ys[0]
    elif epilogue == "glu":
        out = written = torch.nn.functional.silu(ys[0]) * ys[1]
    else:
        forget, inp = mlgru_gates(ys[1], ys[0], lower_bound)
        state.copy_(forget * state + inp)
        written, gate = ys[2], gate_weight.float() * torch.nn.functional.silu(state)
        out = MlgruResult(written, gate)
    if next_sums is not None:
        _add_next_sums(next_sums, written, gate)
    return out
