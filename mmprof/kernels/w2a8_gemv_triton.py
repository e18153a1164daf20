"""The Triton kernel behind `w2a8_gemv`: a few rows of activations times packed ternary weights.

Grid: (output blocks of BLOCK_N rows, slices of 16*BLOCK_KW inputs, input rows m). Each program
loads its whole weight tile at once (one tile per program, so many loads are in flight), then:

1. statistics: sum x^2, sum (x*a)^2 (with a pre-norm) and, per quantised part, max |x*a*b| - read
   from ST_IN when the launch that wrote x summed them, else computed in a pass over the row; from
   them the row's RMSNorm factors and int8 scales (see `w2a8_gemv.py` for the math);
2. the product: its slice of the inputs is quantised to int8 in registers, once per part, and packed
   four to an int32 word; each weight word's 2-bit codes (t + 1 in {0, 1, 2}, four per byte) are
   masked where they sit, code s coming out times 4^s, and combined with the activation word of the
   same inputs by `dp4a` (a 4-way int8 dot product with int32 accumulation), chained through a
   thread's four adjacent word columns; the four chains are weighted 64, 16, 4, 1 once and the sum
   shifted back (exact), and the quantised inputs' sum is subtracted once per row. No weight is ever
   multiplied: the only products are the integer dot products on the codes;
3. split K: the slices' integer sums meet in the workspace, and whoever adds a row's last slice
   finishes that row. With one or two parts (ROW_FINISH), each program adds its sums and an arrival
   count with one 64-bit atomic per row and sees in the returned value whether it completed the row;
   if so it runs the row's epilogue and zeroes the word for the next launch. With three parts the
   sums go to ACC with atomics, each program counts itself in CNT per block of rows, and the one that
   arrives last reads the totals, zeroes ACC and its count, and runs the epilogue. The epilogue adds
   (NQN > 0) its rows' share of the statistics of the row it wrote, for the launch that reads it
   next, to ST_OUT with atomics. With one slice (ONE_SPLIT) the program runs the epilogue directly.

Dependent launch (USE_PDL, Hopper on): the weights depend on no earlier launch, so a launch may start
while the previous one is finishing (programmatic dependent launch). Each program loads its weight
tile and the epilogue's operands that no launch in flight writes (scales, norm weights; with
EARLY_RES also the residual and the state, which the caller says were written two or more launches
back), waits until the previous launch has completed and its writes are visible (griddepcontrol.wait),
and only then reads what that launch may have written: inputs, statistics, workspace. Right after
that wait it lets the next launch begin, so one launch's loads overlap the previous launch's
arithmetic and epilogue, and the program that runs the epilogue waits for no load but the sums.

Under Triton's interpreter (no inline PTX) `dp4a` is replaced by the same integer arithmetic spelt
out byte by byte, which gives the same int32 result, and cvt.rni by floor-based rounding half to even.

Epilogues (EPILOGUE): 0 raw int32 sums (input already int8), 1 store, 2 add a residual,
3 MLGRU step (parts i, f, g: gates, state update in place, the g_norm gate's inputs), 4 GLU
(parts a, b of one matrix: silu(a) * b).
"""

import triton
import triton.language as tl

from mmprof.kernels._triton_util import round_half_even

EPI_INT, EPI_STORE, EPI_RESIDUAL, EPI_MLGRU, EPI_GLU = (tl.constexpr(v) for v in range(5))  # read by the kernel


@triton.jit
def _dot4(xw, codes, acc, USE_PTX: tl.constexpr):
    """acc + the dot product of the 4 signed bytes of xw with the 4 unsigned bytes of codes."""
    if USE_PTX:
        out = tl.inline_asm_elementwise(
            "dp4a.s32.u32 $0, $1, $2, $3;", "=r,r,r,r", [xw, codes, acc],
            dtype=tl.int32, is_pure=True, pack=1,
        )  # fmt: skip
    else:
        out = acc
        for b in tl.static_range(4):
            out += ((xw << (24 - 8 * b)) >> 24) * ((codes >> (8 * b)) & 0xFF)
    return out


@triton.jit
def _quantize(xa, b_ptr, offs, mask, mult, USE_PTX: tl.constexpr):
    """int8 levels (as int32) of xa * b * mult, clamped to [-128, 127] and rounded half to even (the
    bounds are integers, so clamping first gives the same levels) by one cvt.rni on a GPU."""
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.minimum(tl.maximum(xa * b * mult, -128.0), 127.0)
    if USE_PTX:
        q = tl.inline_asm_elementwise("cvt.rni.s32.f32 $0, $1;", "=r,r", [v], dtype=tl.int32, is_pure=True, pack=1)
    else:
        q = round_half_even(v).to(tl.int32)
    return q


@triton.jit
def _quarters(t):
    """[R, C] -> four [R, C // 4]: columns 4j, 4j + 2, 4j + 1 and 4j + 3 of t (the same split for
    any tensor of t's shape). With four adjacent columns per thread nothing moves between threads."""
    h0, h1 = tl.split(tl.reshape(t, [t.shape[0], t.shape[1] // 4, 2, 2]))
    c0, c1 = tl.split(h0)
    c2, c3 = tl.split(h1)
    return c0, c1, c2, c3


@triton.jit
def _times_codes(q, w, ss, USE_PTX: tl.constexpr):
    """The int8 levels q [BLOCK_KW, 4, 4] of a slice's inputs (column c, word s, byte b: input
    16c + 4s + b) times its ternary weights w [BLOCK_N, BLOCK_KW] (codes t + 1, so the levels' sum is
    subtracted): [BLOCK_N] int32.

    Code s of every byte is masked in place (w & 3 << 2s, so it comes out times 4^s) and multiplied
    by its activation word with dp4a; the products of one s are chained through a thread's four
    adjacent columns, and the four chains are weighted 64, 16, 4, 1 once, so a weight word costs four
    masks and four dp4a and no shifts."""
    p = tl.sum((q & 0xFF) << (8 * ss)[None, None, :], axis=2)  # [BLOCK_KW, 4]: word s of column c
    w0, w1, w2, w3 = _quarters(w)
    acc = tl.zeros([w.shape[0], w.shape[1] // 4], tl.int32)
    for s in tl.static_range(4):
        xs = tl.broadcast_to(tl.sum(tl.where(ss[None, :] == s, p, 0), axis=1)[None, :], w.shape)
        x0, x1, x2, x3 = _quarters(xs)
        m = tl.full([], 0x03030303, tl.int32) << (2 * s)  # int32: 0xC0C0C0C0 as a literal would be unsigned
        a = _dot4(x0, w0 & m, tl.zeros_like(acc), USE_PTX)
        a = _dot4(x1, w1 & m, a, USE_PTX)
        a = _dot4(x2, w2 & m, a, USE_PTX)
        a = _dot4(x3, w3 & m, a, USE_PTX)
        acc = acc * 4 + a
    return (tl.sum(acc, axis=1) >> 6) - tl.sum(tl.sum(tl.sum(q, axis=2), axis=1))


@triton.jit
def _row_sums(x_ptr, a_ptr, b_ptr, K, NQ: tl.constexpr, HAS_PRE: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum x^2, sum (x*a)^2 and max |x*a*b_p| (p < 3) of one input row (the statistics pass)."""
    ss1 = tl.zeros([BLOCK_K], tl.float32)
    ss2 = tl.zeros([BLOCK_K], tl.float32)
    m0 = tl.zeros([BLOCK_K], tl.float32)
    m1 = tl.zeros([BLOCK_K], tl.float32)
    m2 = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        ss1 += x * x
        if HAS_PRE:
            x = x * tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            ss2 += x * x
        m0 = tl.maximum(m0, tl.abs(x * tl.load(b_ptr + offs, mask=mask, other=0.0)))
        if NQ > 1:
            m1 = tl.maximum(m1, tl.abs(x * tl.load(b_ptr + K + offs, mask=mask, other=0.0)))
        if NQ > 2:
            m2 = tl.maximum(m2, tl.abs(x * tl.load(b_ptr + 2 * K + offs, mask=mask, other=0.0)))
    return tl.sum(ss1), tl.sum(ss2), tl.max(m0), tl.max(m1), tl.max(m2)


@triton.jit
def _row_scales(st_row, x_row, a_row, b_ptr, K, eps1, eps2, NQ: tl.constexpr, HAS_PRE: tl.constexpr,
                HAS_ST_IN: tl.constexpr, STATS_BLOCK: tl.constexpr):  # fmt: skip
    """A row's quantisation per part: amax_p (its range, as the twin clamps it) and the factor
    mult_p = rowmult * 127 / amax_p that takes x * a * b_p to int8 levels, from the row's statistics:
    read from st_row where the launch that wrote x summed them (HAS_ST_IN), else a pass over x."""
    if HAS_ST_IN:  # the producer of x summed them
        ss1 = tl.load(st_row)
        ss2 = tl.load(st_row + 1)
        s0 = tl.load(st_row + 2)
        s1 = tl.load(st_row + 3)
        s2 = tl.load(st_row + 4)
    else:
        ss1, ss2, s0, s1, s2 = _row_sums(x_row, a_row, b_ptr, K, NQ, HAS_PRE, STATS_BLOCK)
    if HAS_PRE:
        r1 = 1.0 / tl.sqrt(ss1 / K + eps1)
        rowmult = r1 / tl.sqrt(r1 * r1 * ss2 / K + eps2)
    else:
        rowmult = 1.0 / tl.sqrt(ss1 / K + eps2)
    amax0 = tl.maximum(s0 * rowmult, 1e-5)
    amax1 = tl.maximum(s1 * rowmult, 1e-5)
    amax2 = tl.maximum(s2 * rowmult, 1e-5)
    mult0 = rowmult * (127.0 / amax0)
    mult1 = rowmult * (127.0 / amax1)
    mult2 = rowmult * (127.0 / amax2)
    return amax0, amax1, amax2, mult0, mult1, mult2


@triton.jit
def _next_sums(v, a, nb, nmask, st_ptr, NQN: tl.constexpr, NEXT_PRE: tl.constexpr):
    """Add this program's share of the next projection's row sums (see _row_sums) to st_ptr[0:5]:
    v is the slice of the next input this program wrote, a the next pre-norm weight's slice, nb
    [4, BLOCK_N] the next launch's norm weights' (rows past NQN unused). Relaxed atomics: only the
    next launch reads them, after this one has ended. (The default, acq_rel, puts a fence around
    each: on the H200, dropping them took the 1.3b step from 736 to 532-607 us.)"""
    v = tl.where(nmask, v, 0.0)
    tl.atomic_add(st_ptr, tl.sum(v * v), sem="relaxed")
    if NEXT_PRE:
        v = v * a
        tl.atomic_add(st_ptr + 1, tl.sum(v * v), sem="relaxed")
    p = tl.arange(0, 4)  # per quantised part of the next launch: max |v * a * b_p|
    tl.atomic_max(st_ptr + 2 + p, tl.max(tl.abs(v[None, :] * nb), axis=1), mask=p < NQN, sem="relaxed")


@triton.jit
def _add_one_part(ACC64, m, N, rn, i0, nmask):
    """Add a slice's sums and one arrival to the rows' 64-bit words (sum in the low 32 bits, count
    above) -> (the sums so far, the arrivals so far, the word as it now stands, the words' pointers)."""
    one = tl.full([], 1 << 32, tl.int64)
    val = i0.to(tl.int64) + one
    acc_row = ACC64 + m * N + rn
    tot = tl.atomic_add(acc_row, val, mask=nmask, sem="relaxed") + val
    i0 = ((tot << 32) >> 32).to(tl.int32)
    arrived = (tot - i0) >> 32
    return i0, arrived, tot, acc_row


@triton.jit
def _add_two_parts(ACC64, m, N, rn, i0, i1, nmask):
    """The same with two parts: two signed 24-bit sums in bits 0-23 and 24-47, the count above;
    each field is read back sign-extended and taken out before the next is read."""
    one = tl.full([], 1 << 48, tl.int64)
    val = i0.to(tl.int64) + (i1.to(tl.int64) << 24) + one
    acc_row = ACC64 + m * N + rn
    tot = tl.atomic_add(acc_row, val, mask=nmask, sem="relaxed") + val
    lo = (tot << 40) >> 40  # the low field, sign-extended
    i0 = lo.to(tl.int32)
    rest = (tot - lo) >> 24
    hi = (rest << 40) >> 40
    i1 = hi.to(tl.int32)
    arrived = (rest - hi) >> 24
    return i0, i1, arrived, tot, acc_row


@triton.jit
def w2a8_gemv_kernel(
    X, A, B, W, WS, OUT, RES, H, LB, GW, OUT2, ST_IN, ST_OUT, NA, NB, ACC, CNT, ACC64,
    N, K, KW, stride_x, stride_a, stride_out, eps1, eps2,
    NT: tl.constexpr, SHARED_QUANT: tl.constexpr, HAS_PRE: tl.constexpr, A_ROWS: tl.constexpr,
    NQ: tl.constexpr, EPILOGUE: tl.constexpr, HAS_LB: tl.constexpr, USE_PTX: tl.constexpr,
    HAS_ST_IN: tl.constexpr, NQN: tl.constexpr, NEXT_A: tl.constexpr, STATS_BLOCK: tl.constexpr,
    ONE_SPLIT: tl.constexpr, ROW_FINISH: tl.constexpr, EVEN: tl.constexpr, USE_PDL: tl.constexpr, EARLY_RES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    # the weight tile first: nothing it needs has to be waited for
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    wcol = pid_k * BLOCK_KW + tl.arange(0, BLOCK_KW)
    if EVEN:  # the blocks tile the matrix exactly: masks known true, so compiled away
        nmask = tl.full([BLOCK_N], 1, tl.int1)
        wmask = tl.full([BLOCK_N, BLOCK_KW], 1, tl.int1)
    else:
        nmask = rn < N
        wmask = nmask[:, None] & (wcol < KW)[None, :]
    w_off = rn[:, None] * KW + wcol[None, :]
    w0 = tl.load(W + w_off, mask=wmask, other=0)
    if NT > 1:
        w1 = tl.load(W + N * KW + w_off, mask=wmask, other=0)
    if NT > 2:
        w2 = tl.load(W + 2 * N * KW + w_off, mask=wmask, other=0)
    if EPILOGUE != EPI_INT:  # and what the epilogue reads that no launch in flight writes
        ws0 = tl.load(WS)
        if NQ > 1:
            ws1 = tl.load(WS + 1)
        if NQ > 2:
            ws2 = tl.load(WS + 2)
        if EPILOGUE == EPI_RESIDUAL and EARLY_RES:
            res = tl.load(RES + m * N + rn, mask=nmask, other=0.0, cache_modifier=".cg").to(tl.float32)
        if EPILOGUE == EPI_MLGRU:
            if HAS_LB:
                lb = tl.load(LB + rn, mask=nmask, other=0.0)
            if EARLY_RES:
                h_old = tl.load(H + m * N + rn, mask=nmask, other=0.0, cache_modifier=".cg")
            gw = tl.load(GW + rn, mask=nmask, other=0.0).to(tl.float32)
        if NQN > 0:
            nb = tl.load(NB + tl.arange(0, 4)[:, None] * N + rn[None, :],
                         mask=(tl.arange(0, 4) < NQN)[:, None] & nmask[None, :], other=0.0)  # fmt: skip
            if NEXT_A == 1:
                a_next = tl.load(NA + rn, mask=nmask, other=0.0).to(tl.float32)
    if USE_PDL:  # launched early, beside the previous launch: wait for it before reading what it wrote,
        tl.extra.cuda.gdc_wait()  # then let the next launch start loading its weights
        tl.extra.cuda.gdc_launch_dependents()

    x_row = X + m * stride_x
    a_row = A
    if A_ROWS:
        a_row = A + m * stride_a
    if EPILOGUE != EPI_INT:
        amax0, amax1, amax2, mult0, mult1, mult2 = _row_scales(
            ST_IN + m * 5, x_row, a_row, B, K, eps1, eps2, NQ, HAS_PRE, HAS_ST_IN, STATS_BLOCK)

    # this program's slice of the inputs, quantised once per part: [BLOCK_KW, 4 (s), 4 (byte)] levels,
    # packed into four words per word column (word s holding inputs 4s .. 4s+3)
    ss = tl.arange(0, 4)
    offs = wcol[:, None, None] * 16 + 4 * ss[None, :, None] + ss[None, None, :]
    if EVEN:
        kmask = tl.full([BLOCK_KW, 4, 4], 1, tl.int1)
    else:
        kmask = offs < K
    if EPILOGUE == EPI_INT:
        q0 = tl.load(x_row + offs, mask=kmask, other=0).to(tl.int32)
    else:
        xa = tl.load(x_row + offs, mask=kmask, other=0.0).to(tl.float32)
        if HAS_PRE:
            xa = xa * tl.load(a_row + offs, mask=kmask, other=0.0).to(tl.float32)
        q0 = _quantize(xa, B, offs, kmask, mult0, USE_PTX)
    i0 = _times_codes(q0, w0, ss, USE_PTX)
    if NT > 1:
        if SHARED_QUANT:
            i1 = _times_codes(q0, w1, ss, USE_PTX)
        else:
            i1 = _times_codes(_quantize(xa, B + K, offs, kmask, mult1, USE_PTX), w1, ss, USE_PTX)
    if NT > 2:
        i2 = _times_codes(_quantize(xa, B + 2 * K, offs, kmask, mult2, USE_PTX), w2, ss, USE_PTX)

    # split K: the slices' sums meet in the workspace; whoever adds a row's last one finishes that row
    is_last = True
    if ROW_FINISH:  # one returned 64-bit atomic per row: the parts' sums and an arrival count in one word
        if NT == 1:
            i0, arrived, tot, acc_row = _add_one_part(ACC64, m, N, rn, i0, nmask)
        else:
            i0, i1, arrived, tot, acc_row = _add_two_parts(ACC64, m, N, rn, i0, i1, nmask)
        nmask = nmask & (arrived == tl.num_programs(1))  # the rows this program finishes
        tl.store(acc_row, tl.zeros_like(tot), mask=nmask)  # zeroed for the next launch: all have added
        is_last = tl.max(nmask.to(tl.int32), axis=0) > 0
    elif not ONE_SPLIT:
        acc_row = ACC + m * NT * N
        tl.atomic_add(acc_row + rn, i0, mask=nmask, sem="relaxed")
        if NT > 1:
            tl.atomic_add(acc_row + N + rn, i1, mask=nmask, sem="relaxed")
        if NT > 2:
            tl.atomic_add(acc_row + 2 * N + rn, i2, mask=nmask, sem="relaxed")
        tl.debug_barrier()  # every thread's adds are issued before the count is released
        count = CNT + m * tl.num_programs(0) + pid_n
        is_last = tl.atomic_add(count, 1, sem="acq_rel") == tl.num_programs(1) - 1
    if is_last:
        if not ONE_SPLIT and not ROW_FINISH:  # read the totals and leave ACC and the count zeroed
            i0 = tl.atomic_xchg(acc_row + rn, tl.zeros_like(i0), mask=nmask, sem="relaxed")
            if NT > 1:
                i1 = tl.atomic_xchg(acc_row + N + rn, tl.zeros_like(i0), mask=nmask, sem="relaxed")
            if NT > 2:
                i2 = tl.atomic_xchg(acc_row + 2 * N + rn, tl.zeros_like(i0), mask=nmask, sem="relaxed")
            tl.atomic_xchg(count, 0, sem="relaxed")
        out_row = OUT + m * stride_out
        if EPILOGUE == EPI_INT:  # one part, input already int8
            tl.store(out_row + rn, i0, mask=nmask)
        else:
            y0 = i0.to(tl.float32) * (amax0 / 127.0) * ws0
            if NT > 1:
                if SHARED_QUANT:
                    y1 = i1.to(tl.float32) * (amax0 / 127.0) * ws0
                else:
                    y1 = i1.to(tl.float32) * (amax1 / 127.0) * ws1
            if NT > 2:
                y2 = i2.to(tl.float32) * (amax2 / 127.0) * ws2
            if EPILOGUE == EPI_STORE:
                tl.store(out_row + rn, y0, mask=nmask)
                if NT > 1:
                    tl.store(out_row + N + rn, y1, mask=nmask)
                if NT > 2:
                    tl.store(out_row + 2 * N + rn, y2, mask=nmask)
            elif EPILOGUE == EPI_RESIDUAL:
                if not EARLY_RES:
                    res = tl.load(RES + m * N + rn, mask=nmask, other=0.0).to(tl.float32)
                v = res + y0
                tl.store(out_row + rn, v, mask=nmask)
            elif EPILOGUE == EPI_MLGRU:
                f = tl.sigmoid(y1)
                if HAS_LB:
                    f = lb + (1.0 - lb) * f
                i = y0 * tl.sigmoid(y0) * (1.0 - f)
                if not EARLY_RES:
                    h_old = tl.load(H + m * N + rn, mask=nmask, other=0.0)
                h = f * h_old + i
                tl.store(H + m * N + rn, h, mask=nmask)
                tl.store(out_row + rn, y2, mask=nmask)
                gate = gw * h * tl.sigmoid(h)
                tl.store(OUT2 + m * N + rn, gate, mask=nmask)
                v = y2
            else:  # EPI_GLU
                v = y0 * tl.sigmoid(y0) * y1
                tl.store(out_row + rn, v, mask=nmask)
            if NQN > 0:  # sums of the row this launch wrote, for the launch that reads it next
                if NEXT_A == 2:
                    a_next = gate
                elif NEXT_A == 0:
                    a_next = v
                _next_sums(v, a_next, nb, nmask, ST_OUT + m * 5, NQN, NEXT_A != 0)
