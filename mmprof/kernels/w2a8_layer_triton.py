"""The Triton kernel behind `w2a8_layer`: a whole MatMul-free layer's decode step for one token, in
one launch of one persistent program per SM.

The layer's four W2A8 products run as four phases, each on every program, split by grid barriers
(every program must have written its share of a phase's output before any reads it in the next):

1. attn_norm + the i, f, g BitLinears + the MLGRU step (state updated in place) -> g, gate;
2. the g_norm gate + o_proj + the residual -> x2;
3. mlp_norm + gate_proj (halves a, b) + silu(a) * b -> z;
4. down_proj + the residual -> the layer's output.

In a phase, each program:

- asks L2 for its share of the *next* phase's weights (one bulk prefetch per thread,
  `cp.async.bulk.prefetch.L2`), so weights stream from DRAM while this phase computes and while
  programs wait at the barrier; the fourth phase prefetches the next layer's first matrix;
- reads the row statistics the previous phase summed (`w2a8_gemv_triton.epilogue`'s next sums),
  quantises the whole input row to int8 once, four levels to a word, into its own slice of a
  scratch buffer (one per quantised part), with the sum of the levels;
- takes output blocks of BLOCK_N rows in turn (block b goes to program b mod programs), each over all
  of K: the 2-bit codes of a tile times the input words by `dp4a`, int32 sums, no atomics, then the
  epilogue shared with `w2a8_gemv` (which also adds the statistics of the row it writes for the next
  phase).

A grid barrier is an arrival counter: each program releases its count after a block-wide barrier
(its threads' writes are done), then its thread 0 spins on acquire loads of it until all have
arrived while the other threads wait at a block-wide barrier (one poller per SM, not one per thread). This needs
every program resident at once: one program per SM, at most 8 warps (255 registers per thread
still fit one per SM). The three counters clean up after themselves: program 0 zeroes each one once
every program is past it (the last one at the start of the next launch).

PHASE >= 0 runs that phase alone, without barriers: how Triton's interpreter (which runs programs one
after another, so no program could wait for another) and the tests run it, one launch per phase.
"""

import triton
import triton.language as tl

from mmprof.kernels.w2a8_gemv_triton import (EPI_GLU, EPI_MLGRU, EPI_RESIDUAL, add_next_sums, dot4, epilogue,
                                             next_sums_part, pack4, quant_scales, quantize, row_sums)  # fmt: skip


@triton.jit
def _prefetch_slice(W, nbytes, pid, programs, THREADS: tl.constexpr):
    """Ask L2 for this program's 1/programs share of the nbytes at W (a multiple of 16, 16-aligned)."""
    share = tl.cdiv(tl.cdiv(nbytes, programs), 16) * 16
    piece = tl.cdiv(tl.cdiv(share, THREADS), 16) * 16
    start = pid.to(tl.int64) * share + tl.arange(0, THREADS).to(tl.int64) * piece
    end = tl.minimum(pid.to(tl.int64) * share + share, nbytes)
    size = tl.maximum(tl.minimum(end - start, piece), 0).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [W.to(tl.int64) + start, size], dtype=tl.int32, is_pure=False, pack=1,
    )  # fmt: skip


@triton.jit
def _grid_barrier(BAR, programs):
    """Wait until every program has arrived here; what each wrote before is visible to all after."""
    tl.debug_barrier()  # this program's threads are done writing
    tl.atomic_add(BAR, 1, sem="release", scope="gpu")  # by one thread
    arrived = _poll(BAR, programs)
    while arrived < programs:  # thread 0 spins; the others wait for it at the block-wide barrier below
        arrived = _poll(BAR, programs)
    tl.debug_barrier()


@triton.jit
def _poll(BAR, programs):
    """Thread 0: an acquire load of the counter; every other thread: `programs` (done)."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .u32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; mov.u32 $0, $2; "
        "@p ld.acquire.gpu.global.b32 $0, [$1]; }",
        "=r,l,r", [BAR.to(tl.int64), programs], dtype=tl.int32, is_pure=False, pack=1,
    )  # fmt: skip


@triton.jit
def _quantize_row(XQ, x_ptr, a_ptr, b_ptr, K, KW4, mult, HAS_PRE: tl.constexpr, QBLOCK: tl.constexpr,
                  USE_PTX: tl.constexpr):  # fmt: skip
    """Levels of x*a*b*mult (see w2a8_gemv_triton.quantize), four to an int32 word (word j holds
    inputs 4j..4j+3), written to XQ[0:KW4]; returns their sum."""
    bb = tl.arange(0, 4)
    shifts = 8 * bb
    total = tl.zeros([QBLOCK], tl.int32)
    for j0 in range(0, KW4, QBLOCK):
        j = j0 + tl.arange(0, QBLOCK)
        offs = j[:, None] * 4 + bb[None, :]
        kmask = offs < K
        xa = tl.load(x_ptr + offs, mask=kmask, other=0.0)
        if HAS_PRE:
            xa = xa * tl.load(a_ptr + offs, mask=kmask, other=0.0)
        q = quantize(xa, b_ptr, offs, kmask, mult, USE_PTX)
        total += tl.sum(q, axis=1)
        tl.store(XQ + j, pack4(q, shifts), mask=j < KW4)
    return tl.sum(total)


@triton.jit
def _phase(pid, programs, X, A, B, W, WS, ST_IN, XQ, xq_part, OUT, RES, H, LB, GW, OUT2, ST_OUT, NA, NB,
           N, K, eps1, eps2, NT: tl.constexpr, NQ: tl.constexpr, HAS_PRE: tl.constexpr, HAS_ST_IN: tl.constexpr,
           EPILOGUE: tl.constexpr, HAS_LB: tl.constexpr, NQN: tl.constexpr, NEXT_A: tl.constexpr,
           BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, QBLOCK: tl.constexpr, STATS_BLOCK: tl.constexpr,
           STAGES: tl.constexpr, USE_PTX: tl.constexpr):  # fmt: skip
    """One W2A8 product of the layer for one input row x [K] (see the module docstring); NT parts of
    N rows stacked in W, quantised NQ ways (NQ = 1 with two parts: the GLU's shared quantisation)."""
    KW = tl.cdiv(K, 16)
    KW4 = 4 * KW
    if HAS_ST_IN:
        # from L2 (.cg): this SM's L1 may hold the line from an earlier phase, before the atomics
        ss1 = tl.load(ST_IN, cache_modifier=".cg")
        ss2 = tl.load(ST_IN + 1, cache_modifier=".cg")
        s0 = tl.load(ST_IN + 2, cache_modifier=".cg")
        s1 = tl.load(ST_IN + 3, cache_modifier=".cg")
        s2 = tl.load(ST_IN + 4, cache_modifier=".cg")
    else:
        ss1, ss2, s0, s1, s2 = row_sums(X, A, B, K, NQ, HAS_PRE, STATS_BLOCK)
    amax0, amax1, amax2, mult0, mult1, mult2 = quant_scales(ss1, ss2, s0, s1, s2, K, eps1, eps2, HAS_PRE)
    qs0 = _quantize_row(XQ, X, A, B, K, KW4, mult0, HAS_PRE, QBLOCK, USE_PTX)
    qs1 = qs0
    qs2 = qs0
    if NQ > 1:
        qs1 = _quantize_row(XQ + xq_part, X, A, B + K, K, KW4, mult1, HAS_PRE, QBLOCK, USE_PTX)
    if NQ > 2:
        qs2 = _quantize_row(XQ + 2 * xq_part, X, A, B + 2 * K, K, KW4, mult2, HAS_PRE, QBLOCK, USE_PTX)
    if NQ == 1:
        amax1 = amax0
    tl.debug_barrier()  # the words are written before any thread of the program reads them
    ws0 = tl.load(WS)
    ws1 = ws0
    ws2 = ws0
    if NQ > 1:
        ws1 = tl.load(WS + 1)
    if NQ > 2:
        ws2 = tl.load(WS + 2)
    XQ1 = XQ
    if NQ > 1:
        XQ1 = XQ + xq_part
    XQ2 = XQ + 2 * xq_part
    chunks = tl.cdiv(KW, BLOCK_KW)
    acc0 = tl.zeros([BLOCK_N, BLOCK_KW], tl.int32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_KW], tl.int32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_KW], tl.int32)
    ss1n = tl.zeros([], tl.float32)  # statistics of this program's share of the output: added once at the end
    ss2n = tl.zeros([], tl.float32)
    m0n = tl.zeros([], tl.float32)
    m1n = tl.zeros([], tl.float32)
    m2n = tl.zeros([], tl.float32)
    # one flat loop over (this program's blocks) x (chunks of K), so loads run ahead across blocks too
    for t in tl.range(0, tl.cdiv(tl.cdiv(N, BLOCK_N) - pid, programs) * chunks, num_stages=STAGES):
        blk = pid + (t // chunks) * programs
        chunk = t % chunks
        rn = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        wcol = chunk * BLOCK_KW + tl.arange(0, BLOCK_KW)
        cmask = wcol < KW
        w_off = rn[:, None] * KW + wcol[None, :]
        wmask = nmask[:, None] & cmask[None, :]
        w0 = tl.load(W + w_off, mask=wmask, other=0)
        if NT > 1:
            w1 = tl.load(W + N * KW + w_off, mask=wmask, other=0)
        if NT > 2:
            w2 = tl.load(W + 2 * N * KW + w_off, mask=wmask, other=0)
        for s in tl.static_range(4):
            x0 = tl.load(XQ + wcol * 4 + s, mask=cmask, other=0)
            acc0 = dot4(tl.broadcast_to(x0[None, :], (BLOCK_N, BLOCK_KW)), (w0 >> (2 * s)) & 0x03030303, acc0,
                        USE_PTX)  # fmt: skip
            if NT > 1:
                x1 = tl.load(XQ1 + wcol * 4 + s, mask=cmask, other=0)
                acc1 = dot4(tl.broadcast_to(x1[None, :], (BLOCK_N, BLOCK_KW)), (w1 >> (2 * s)) & 0x03030303,
                            acc1, USE_PTX)  # fmt: skip
            if NT > 2:
                x2 = tl.load(XQ2 + wcol * 4 + s, mask=cmask, other=0)
                acc2 = dot4(tl.broadcast_to(x2[None, :], (BLOCK_N, BLOCK_KW)), (w2 >> (2 * s)) & 0x03030303,
                            acc2, USE_PTX)  # fmt: skip
        if chunk == chunks - 1:  # the block's last chunk: finish its rows, start the next block from zero
            y0 = (tl.sum(acc0, axis=1) - qs0).to(tl.float32) * (amax0 / 127.0) * ws0
            y1 = y0
            y2 = y0
            if NT > 1:
                y1 = (tl.sum(acc1, axis=1) - qs1).to(tl.float32) * (amax1 / 127.0) * ws1
            if NT > 2:
                y2 = (tl.sum(acc2, axis=1) - qs2).to(tl.float32) * (amax2 / 127.0) * ws2
            v, a_next = epilogue(y0, y1, y2, rn, nmask, N, OUT, RES, H, LB, GW, OUT2, NA, NT, EPILOGUE, HAS_LB, NEXT_A)
            b1, b2, b3, b4, b5 = next_sums_part(v, a_next, NB, rn, nmask, N, NQN, NEXT_A != 0)
            ss1n += b1
            ss2n += b2
            m0n = tl.maximum(m0n, b3)
            m1n = tl.maximum(m1n, b4)
            m2n = tl.maximum(m2n, b5)
            acc0 = tl.zeros([BLOCK_N, BLOCK_KW], tl.int32)
            acc1 = tl.zeros([BLOCK_N, BLOCK_KW], tl.int32)
            acc2 = tl.zeros([BLOCK_N, BLOCK_KW], tl.int32)
    add_next_sums(ST_OUT, ss1n, ss2n, m0n, m1n, m2n, NQN, NEXT_A != 0)


@triton.jit
def w2a8_layer_kernel(
    X, XS, AN, B1, W1, WS1, H, LB, GN, G, GATE, ST, B2, W2, WS2, MN, X2, B3, W3, WS3, Z, B4, W4, WS4, OUT,
    NB, NA, NEXT_W, XQ, BAR, D, I, xq_stride, next_w_bytes, eps1, eps2,
    PHASE: tl.constexpr, HAS_XS: tl.constexpr, HAS_LB: tl.constexpr, NQN: tl.constexpr, NEXT_PRE: tl.constexpr,
    USE_PTX: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, THREADS: tl.constexpr,
    STATS_BLOCK: tl.constexpr, QBLOCK: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr,
    BLOCK_N3: tl.constexpr, BLOCK_N4: tl.constexpr, BLOCK_KW: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    DW = tl.cdiv(D, 16)
    IW = tl.cdiv(I, 16)
    if PREFETCH and PHASE < 0:  # the first matrix, unless the previous launch asked for it already
        _prefetch_slice(W1, 12 * D * DW, pid, programs, THREADS)
    if USE_PDL:  # launched beside the previous layer: wait for it, then let the next one start
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    xq = XQ + pid * xq_stride
    if PHASE < 0:
        if pid == 0:  # every program of the previous launch is past its last barrier
            tl.atomic_xchg(BAR + 2, 0, sem="relaxed")
    if PHASE < 0 or PHASE == 0:
        if PREFETCH:
            _prefetch_slice(W2, 4 * D * DW, pid, programs, THREADS)
        _phase(pid, programs, X, AN, B1, W1, WS1, XS, xq, xq_stride // 3, G, X, H, LB, GN, GATE, ST, NA, B2,
               D, D, eps1, eps2, NT=3, NQ=3, HAS_PRE=True, HAS_ST_IN=HAS_XS, EPILOGUE=EPI_MLGRU, HAS_LB=HAS_LB,
               NQN=1, NEXT_A=2, BLOCK_N=BLOCK_N1, BLOCK_KW=BLOCK_KW, QBLOCK=QBLOCK, STATS_BLOCK=STATS_BLOCK,
               STAGES=STAGES, USE_PTX=USE_PTX)  # fmt: skip
    if PHASE < 0:
        _grid_barrier(BAR, programs)
    if PHASE < 0 or PHASE == 1:
        if PREFETCH:
            _prefetch_slice(W3, 8 * I * DW, pid, programs, THREADS)
        _phase(pid, programs, G, GATE, B2, W2, WS2, ST, xq, 0, X2, X, H, LB, GN, GATE, ST + 5, MN, B3,
               D, D, eps1, eps2, NT=1, NQ=1, HAS_PRE=True, HAS_ST_IN=True, EPILOGUE=EPI_RESIDUAL, HAS_LB=False,
               NQN=1, NEXT_A=1, BLOCK_N=BLOCK_N2, BLOCK_KW=BLOCK_KW, QBLOCK=QBLOCK, STATS_BLOCK=STATS_BLOCK,
               STAGES=STAGES, USE_PTX=USE_PTX)  # fmt: skip
    if PHASE < 0:
        _grid_barrier(BAR + 1, programs)
        if pid == 0:
            tl.atomic_xchg(BAR, 0, sem="relaxed")
    if PHASE < 0 or PHASE == 2:
        if PREFETCH:
            _prefetch_slice(W4, 4 * D * IW, pid, programs, THREADS)
        _phase(pid, programs, X2, MN, B3, W3, WS3, ST + 5, xq, 0, Z, X, H, LB, GN, GATE, ST + 10, MN, B4,
               I, D, eps1, eps2, NT=2, NQ=1, HAS_PRE=True, HAS_ST_IN=True, EPILOGUE=EPI_GLU, HAS_LB=False,
               NQN=1, NEXT_A=0, BLOCK_N=BLOCK_N3, BLOCK_KW=BLOCK_KW, QBLOCK=QBLOCK, STATS_BLOCK=STATS_BLOCK,
               STAGES=STAGES, USE_PTX=USE_PTX)  # fmt: skip
    if PHASE < 0:
        _grid_barrier(BAR + 2, programs)
        if pid == 0:
            tl.atomic_xchg(BAR + 1, 0, sem="relaxed")
    if PHASE < 0 or PHASE == 3:
        if PREFETCH:
            _prefetch_slice(NEXT_W, next_w_bytes, pid, programs, THREADS)
        _phase(pid, programs, Z, MN, B4, W4, WS4, ST + 10, xq, 0, OUT, X2, H, LB, GN, GATE, ST + 15, NA, NB,
               D, I, eps1, eps2, NT=1, NQ=1, HAS_PRE=False, HAS_ST_IN=True, EPILOGUE=EPI_RESIDUAL, HAS_LB=False,
               NQN=NQN, NEXT_A=NEXT_PRE, BLOCK_N=BLOCK_N4, BLOCK_KW=BLOCK_KW, QBLOCK=QBLOCK,
               STATS_BLOCK=STATS_BLOCK, STAGES=STAGES, USE_PTX=USE_PTX)  # fmt: skip
