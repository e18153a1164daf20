"""One MatMul-free layer's decode step on packed ternary weights: `w2a8_layer`.

The layer is four W2A8 products with their norms and epilogues (see `w2a8_gemv`):

    g, gate = ifg(x)       attn_norm, BitLinears i/f/g, MLGRU step (state updated in place)
    x2 = x + o(g, gate)    the g_norm gate's RMSNorm, o_proj, residual
    z = gate_proj(x2)      mlp_norm, silu(a) * b
    out = x2 + down(z)     down_proj, residual

`w2a8_layer_launches` runs them as four `w2a8_gemv` launches (any batch, any backend; with the torch
backend, the plain-PyTorch twin). For one row on a GPU, `w2a8_layer` runs the whole layer in one
launch of persistent programs separated by grid barriers (`w2a8_layer_triton`), which saves three
launches' latency per layer and streams the next matrix into L2 while the current one is used.
Both add the statistics of their output row into `sums[3]` for the launch that reads it next
(`reader`: its norm weights and pre-norm weight), and read x's from `x_sums` when given.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from mmprof.kernels import w2a8_layer_triton as tri
from mmprof.kernels._triton_util import autotune_configs, device_guard, interpreting, select_backend
from mmprof.kernels.bitlinear import NORM_EPS
from mmprof.kernels import w2a8_gemv as gemv
from mmprof.kernels.w2a8_gemv import STATS_BLOCK, has_dependent_launch, w2a8_gemv

FUSED = True  # at batch 1 on a GPU, w2a8_layer's kernel; False: four w2a8_gemv launches per layer
ONE_LAUNCH = True  # the kernel's four phases in one launch with grid barriers; False: a launch per phase
PREFETCH = True  # each phase asks L2 for the next phase's weights


class Projection(NamedTuple):
    norm: Tensor  # [quantised parts, in] fp32 BitLinear norm weights
    packed: Tensor  # [parts * out, in / 16] int32 codes
    w_scale: Tensor  # [quantised parts] fp32


class LayerWeights(NamedTuple):
    attn_norm: Tensor
    g_norm: Tensor
    mlp_norm: Tensor
    ifg: Projection  # i, f, g: three parts of d rows, each quantised with its own norm
    o: Projection
    gate: Projection  # halves a and b of one BitLinear (one norm, one scale)
    down: Projection
    lower_bound: Tensor | None
    eps: float  # of the pre-norms (attn_norm, g_norm, mlp_norm)


def w2a8_layer_launches(x: Tensor, lw: LayerWeights, state: Tensor, sums: Tensor, x_sums: Tensor | None,
                        reader: tuple, backend: str = "auto") -> Tensor:  # fmt: skip
    """The layer as four `w2a8_gemv` launches. sums [4, M, 5] zeroed; returns the output [M, d]."""
    ifg, o, gate, down = lw.ifg, lw.o, lw.gate, lw.down
    g, gate_in = w2a8_gemv(x, ifg.norm, ifg.packed, ifg.w_scale, parts=3, pre_weight=lw.attn_norm, pre_eps=lw.eps,
                           epilogue="mlgru", state=state, lower_bound=lw.lower_bound, gate_weight=lw.g_norm,
                           sums=x_sums, next_sums=(sums[0], o.norm, "gate"), backend=backend)  # fmt: skip
    x2 = w2a8_gemv(g, o.norm, o.packed, o.w_scale, pre_weight=gate_in, pre_eps=lw.eps, epilogue="residual",
                   residual=x, sums=sums[0], next_sums=(sums[1], gate.norm, lw.mlp_norm), backend=backend)  # fmt: skip
    z = w2a8_gemv(x2, gate.norm, gate.packed, gate.w_scale, parts=2, shared_quant=True, pre_weight=lw.mlp_norm,
                  pre_eps=lw.eps, epilogue="glu", sums=sums[1], next_sums=(sums[2], down.norm, None),
                  backend=backend)  # fmt: skip
    return w2a8_gemv(z, down.norm, down.packed, down.w_scale, epilogue="residual", residual=x2, sums=sums[2],
                     next_sums=(sums[3], *reader), backend=backend)  # fmt: skip


_GPU_CONFIGS = [({"BLOCK_N1": n1, "BLOCK_N2": n2, "BLOCK_N3": n3, "BLOCK_N4": n4, "BLOCK_KW": kw, "STAGES": stages,
                  "THREADS": 32 * w}, w)
                for n1, n2, n3, n4, kw, w, stages in [(8, 8, 8, 8, 64, 4, 3), (8, 8, 8, 8, 128, 8, 3),
                                                      (16, 8, 16, 8, 64, 8, 4), (8, 8, 8, 8, 64, 8, 4),
                                                      (16, 16, 16, 16, 32, 4, 4)]]  # fmt: skip
_INTERPRET_CONFIG = {"BLOCK_N1": 4, "BLOCK_N2": 4, "BLOCK_N3": 4, "BLOCK_N4": 4, "BLOCK_KW": 2, "STAGES": 1,
                     "THREADS": 4}
_kernel = triton.autotune(
    configs=autotune_configs(_GPU_CONFIGS, interpret=_INTERPRET_CONFIG),
    key=["D", "I", "HAS_XS", "NQN"],
    restore_value=["H", "ST"],  # benchmarking runs the layer many times: keep the state and the sums
)(tri.w2a8_layer_kernel)
_barriers: dict[torch.device, Tensor] = {}
INTERPRET_PROGRAMS = 3  # programs under the interpreter: more than one, so blocks are shared out


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _barrier_counters(device: torch.device) -> Tensor:
    """The device's three grid-barrier counters: zero, and left zero by every launch."""
    buf = _barriers.get(device)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("w2a8_layer: run once before capturing it in a CUDA graph")
        buf = _barriers[device] = torch.zeros(3, dtype=torch.int32, device=device)
    return buf


def _aligned(*tensors: Tensor) -> bool:
    return all(t.data_ptr() % 16 == 0 and (t.numel() * t.element_size()) % 16 == 0 for t in tensors)


def w2a8_layer(x: Tensor, lw: LayerWeights, state: Tensor, sums: Tensor, x_sums: Tensor | None, reader: tuple,
               next_weights: Tensor | None = None, backend: str = "auto") -> Tensor:  # fmt: skip
    """The layer's decode step: x [M, d] fp32 -> out [M, d]; state [M, d] fp32 updated in place; sums
    [4, M, 5] zeroed buffers, sums[3] receiving out's statistics for `reader` = (its norm weights
    [parts, d], its pre-norm weight [d] or None). next_weights: the packed matrix read after this
    layer, asked into L2 during its last phase. One launch at M = 1 with Triton; else four."""
    if x.dim() != 2 or x.shape[1] != lw.attn_norm.numel():
        raise ValueError(f"x must be [rows, {lw.attn_norm.numel()}], got {tuple(x.shape)}")
    if select_backend(backend, x) == "torch" or x.shape[0] != 1 or not FUSED:
        return w2a8_layer_launches(x, lw, state, sums, x_sums, reader, backend)
    d, inter = x.shape[1], lw.down.norm.shape[1]
    xc = x.contiguous()
    g, gate, x2, out = (torch.empty_like(xc, dtype=torch.float32) for _ in range(4))
    z = torch.empty(1, inter, device=x.device, dtype=torch.float32)
    part = 4 * triton.cdiv(max(d, inter), 16)  # quantised words of one part of the widest input
    gpu = not interpreting()
    programs = _sm_count(x.device) if gpu else INTERPRET_PROGRAMS
    xq = torch.empty(programs * 3 * part, dtype=torch.int32, device=x.device)
    reader_norm, reader_pre = reader
    nxt = next_weights if next_weights is not None else lw.ifg.packed
    lb = lw.lower_bound
    pdl = gpu and gemv.DEPENDENT_LAUNCH and has_dependent_launch(x.device)
    args = (xc, x_sums if x_sums is not None else sums, lw.attn_norm, lw.ifg.norm, lw.ifg.packed, lw.ifg.w_scale,
            state, lb if lb is not None else lw.attn_norm, lw.g_norm, g, gate, sums, lw.o.norm, lw.o.packed,
            lw.o.w_scale, lw.mlp_norm, x2, lw.gate.norm, lw.gate.packed, lw.gate.w_scale, z, lw.down.norm,
            lw.down.packed, lw.down.w_scale, out, reader_norm, reader_pre if reader_pre is not None else reader_norm,
            nxt, xq, _barrier_counters(x.device), d, inter, 3 * part, nxt.numel() * 4, float(lw.eps), float(NORM_EPS))  # fmt: skip
    flags = dict(HAS_XS=x_sums is not None, HAS_LB=lb is not None, NQN=reader_norm.shape[0],
                 NEXT_PRE=int(reader_pre is not None), USE_PTX=gpu, USE_PDL=pdl,
                 PREFETCH=gpu and PREFETCH and _aligned(lw.ifg.packed, lw.o.packed, lw.gate.packed, lw.down.packed, nxt),
                 STATS_BLOCK=min(STATS_BLOCK, triton.next_power_of_2(d)), QBLOCK=256 if gpu else 8)  # fmt: skip
    with device_guard(x):
        if gpu and ONE_LAUNCH:
            _kernel[(programs,)](*args, PHASE=-1, **flags, **({"launch_pdl": True} if pdl else {}))
        else:  # the interpreter runs programs one after another: a launch per phase stands in for barriers
            for phase in range(4):
                _kernel[(programs,)](*args, PHASE=phase, **flags)
    return out
