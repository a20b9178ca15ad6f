"""Triton kernel for few tokens (M <= 16, 16-bit activations): the mixed-bit layer as a GEMV.

Why a second kernel: at 1-16 tokens the layer is a stream of packed weights (22 MB for gate/up at
4 bits against 0.1-1 MB of activations), so the kernel must keep enough weight bytes in flight and
spend as few instructions per weight as it can. The grouped GEMM (triton_gemm.py) reached 15-21% of
the byte floor there (run 2, bench/kernels/results/run2_h200/results_nvidia_h200.md: "% byte floor" of
the avg4 A16 rows at M = 1): 161 registers, 18.75% occupancy (results/run2_h200/ncu.txt), one L2
round trip through the group table before the first weight load, and decoded tiles passed through
shared memory on their way to the tensor cores. What this kernel does instead:

* The group table travels in the launch's scalar arguments (rows, word offsets and K-blocks of each
  width, all known on the host), so a program finds its group and its first weight address without
  touching memory.
* Each program owns BN consecutive packed rows of ONE width and a contiguous range of their words
  (split-K); all widths, the dense 16-bit rows and the pruned channels are one launch.
* Weight words go from global memory straight into registers (a [BN, WB] int32 tile: 16-byte
  vectors along a row, 4 words per vector so a thread holds several rows and reuses each x value
  for them) and the next step's tile is loaded before the current one is used (register double
  buffering, PREFETCH). For one token the weight loops then have no shared-memory access and no
  barrier (checked on the sm_90 assembly by test/test_kernels_compile.py). STAGES > 1 instead lets
  Triton's software pipeliner keep STAGES - 1 steps of weight words in flight as asynchronous copies
  into shared memory: deeper than one step, and the bytes in flight hold no registers (run 3's ncu:
  the register-prefetch kernel was latency-bound, bench/kernels/results/run3/ncu.txt; NOTES "Run 3").
* Decoding is two integer operations per weight: the field is shifted to the top of a float's
  mantissa and masked and OR-ed with the exponent of 1.0 in one LOP3 (inline PTX; the compiler's
  own code takes two), which gives v = 1 + q / 2^b exactly. No integer-to-float conversion and no
  per-element zero-point subtraction: the kernel accumulates sum(v * x), takes sum(x) over its
  split once (splits cover whole K-blocks, i.e. one contiguous run of features) and recovers
  y = s * (2^b * sum(v x) - (2^b + zero) * sum(x)) once per row (exact algebra; the zero-point may
  be fractional). About 5 instructions per weight in the one-token loops (4-bit 4.9, 2-bit 4.7,
  8-bit 5.5, 3-bit 7.7), against 8-9 for the first version of this kernel.
* FMA path (USE_DOT=False): float32 products into a [BM, BN, WB] accumulator reduced once at the
  end, for 1-8 tokens (x is loaded straight into the product's layout). Tensor-core path
  (USE_DOT=True, BM=16): out^T[BN, BM] += V[BN, WB] @ X^T[WB, BM] with the decoded weights as the
  left operand (the operand wgmma can read from registers);
  bfloat16 v = 1 + q/2^b is exact for b <= 4 (8-bit codes decode to the integer q, exact too),
  float16 for every width.
* Split-K partial tiles meet in a float32 workspace; the last program of a tile to arrive adds
  the parts in split order (so the result does not depend on arrival order), adds the bias and
  writes each of its output channels once, for every token; the arrival counter returns to zero.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_gemm import finish_tile, split_k_range, store_tile  # split-K range, reduction and store: one protocol

@triton.jit
def _move(w, SRC: tl.constexpr, DST: tl.constexpr, WIDTH: tl.constexpr):
    """Bits [SRC, SRC+WIDTH) of the int32 words w at bits [DST, DST+WIDTH), everything else zero."""
    if DST >= SRC:
        v = w << (DST - SRC)
    else:
        v = w >> (SRC - DST)  # arithmetic shift: the copied sign bits are masked off below
    return v & (((1 << WIDTH) - 1) << DST)


@triton.jit
def _lop3(a, c, MASK: tl.constexpr):
    """(a & MASK) | c as one LOP3 with MASK as an immediate: the compiler's own code for the
    expression is two instructions (it keeps both constants as immediates), a sixth of the decode
    loop (offline sm_90 compile, offline_compile.compile_gemv; bench/kernels/NOTES.md "Run 3"; no recorded
    result file holds that SASS count). The float32 decode's masks only."""
    if MASK == 0x7F8000:
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x7F8000, $2, 0xEA;", "=r,r,r", [a, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    elif MASK == 0x780000:
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x780000, $2, 0xEA;", "=r,r,r", [a, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    elif MASK == 0x600000:
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x600000, $2, 0xEA;", "=r,r,r", [a, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    elif MASK == 0x400000:
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x400000, $2, 0xEA;", "=r,r,r", [a, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    elif MASK == 0x300000:
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x300000, $2, 0xEA;", "=r,r,r", [a, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        return (a & MASK) | c


@triton.jit
def _and_or(a, MASK: tl.constexpr, c, ASM: tl.constexpr):
    """(a & MASK) | c; ASM: through _lop3 (compiled code only: the interpreter runs no assembly)."""
    if ASM:
        return _lop3(a, c, MASK)
    else:
        return (a & MASK) | c


@triton.jit
def _shift(w, SRC: tl.constexpr, DST: tl.constexpr):
    if DST >= SRC:
        v = w << (DST - SRC)
    else:
        v = w >> (SRC - DST)
    return v


@triton.jit
def decode_field(w, wh, i: tl.constexpr, BITS: tl.constexpr, USE_DOT: tl.constexpr, X_FP16: tl.constexpr,
                 ASM: tl.constexpr):
    """Field i of the words (and of the 3-bit high plane wh) as v = 1 + q / 2^BITS, or as the integer
    q for 8-bit codes under bfloat16 tensor cores; float32 (FMA) or x's 16-bit type (tensor cores)."""
    LOW: tl.constexpr = 2 if BITS == 3 else BITS
    # mantissa bits and the bits of 1.0: float16 (10, 0x3C00), bfloat16 (7, 0x3F80), float32 (23)
    MANT: tl.constexpr = (10 if X_FP16 else 7) if USE_DOT else 23
    ONE: tl.constexpr = (0x3C00 if X_FP16 else 0x3F80) if USE_DOT else 0x3F800000
    POS: tl.constexpr = MANT - BITS
    if USE_DOT and (not X_FP16) and BITS == 8:
        # 1 + q/256 needs 8 mantissa bits, bfloat16 has 7: decode the integer q (exact in bfloat16)
        q = _move(w, i * 8, 0, 8)
        v = ((q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0).to(tl.bfloat16)
    else:
        one = tl.full(w.shape, ONE, tl.int32)
        if BITS == 3:
            # plain expressions: through _lop3 the 3-bit loop took 168 registers (80 without) for
            # no fewer instructions (offline sm_90 compile)
            one = (_shift(wh, i, POS + 2) & (1 << (POS + 2))) | one
            bits = (_shift(w, i * LOW, POS) & (((1 << LOW) - 1) << POS)) | one
        else:
            bits = _and_or(_shift(w, i * LOW, POS), ((1 << LOW) - 1) << POS, one, ASM)
        if not USE_DOT:
            v = bits.to(tl.float32, bitcast=True)
        elif X_FP16:
            v = bits.to(tl.int16).to(tl.float16, bitcast=True)
        else:
            v = bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
    return v


@triton.jit
def _x_sum(x_rows, m_mask, k_lo, k_hi, BM: tl.constexpr):
    """sum(x[m, k_lo:k_hi]) for each token, float32 [BM]."""
    XB: tl.constexpr = 256
    ck = tl.arange(0, XB)
    part = tl.zeros([BM, XB], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, XB):
        k = k0 + ck
        part += tl.load(x_rows[:, None] + k[None, :], mask=m_mask[:, None] & (k < k_hi)[None, :],
                        other=0.0).to(tl.float32)
    return tl.sum(part, axis=1)


@triton.jit
def _quant_rows(x_ptr, stride_xm, offs_m, m_mask, K, w_ptr, wh_ptr, woff, hoff, nkb, offs_n, n_mask, prow,
                scale_ptr, zero_ptr, pid_k, BITS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                WB: tl.constexpr, SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr, X_FP16: tl.constexpr,
                PREFETCH: tl.constexpr, ASM: tl.constexpr, EVEN_K: tl.constexpr, STAGES: tl.constexpr):
    """This split's part of y[:, rows] (no bias), float32 [BM, BN], for BN rows of one quantized width.

    Row r's words are contiguous (nkb * 32 of them); word g holds, in field i, the code of input
    feature (g // 32) * KB + i * 32 + g % 32 (KB = 32 * fields per word; see layout.py)."""
    E: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    KB: tl.constexpr = 32 * E
    # splits take whole K-blocks (32 words), so each covers one contiguous range of features
    SU: tl.constexpr = WB if WB > 32 else 32
    row_words = nkb * 32
    g_lo, g_hi = split_k_range(row_words, SU, pid_k, SPLIT_K)
    g_lo = tl.multiple_of(g_lo, SU)
    g_hi = tl.multiple_of(g_hi, 32)
    c = tl.max_contiguous(tl.arange(0, WB), 4)
    w_rows = w_ptr + woff + offs_n * row_words
    h_rows = wh_ptr + hoff + offs_n * row_words
    x_rows = x_ptr + offs_m * stride_xm
    # the row constants first: their round trip overlaps the weight stream instead of following it
    scale = tl.load(scale_ptr + prow, mask=n_mask, other=0.0)
    zero = tl.load(zero_ptr + prow, mask=n_mask, other=0.0)
    if USE_DOT:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    elif BM == 1:
        acc = tl.zeros([BN, WB], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN, WB], dtype=tl.float32)
    if PREFETCH:  # the first step's words; each step then loads the next step's before decoding
        wmask0 = n_mask[:, None] & (g_lo + c < g_hi)[None, :]
        w_next = tl.load(w_rows[:, None] + (g_lo + c)[None, :], mask=wmask0, other=0)
        if BITS == 3:
            wh_next = tl.load(h_rows[:, None] + (g_lo + c)[None, :], mask=wmask0, other=0).to(tl.int32)
        else:
            wh_next = w_next
    for g0 in tl.range(g_lo, g_hi, WB, num_stages=STAGES):
        g = tl.multiple_of(g0, WB) + c
        if PREFETCH:
            w = w_next
            wh = wh_next
            nmask = n_mask[:, None] & (g + WB < g_hi)[None, :]
            w_next = tl.load(w_rows[:, None] + (g + WB)[None, :], mask=nmask, other=0)
            if BITS == 3:
                wh_next = tl.load(h_rows[:, None] + (g + WB)[None, :], mask=nmask, other=0).to(tl.int32)
        else:
            wmask = n_mask[:, None] & (g < g_hi)[None, :]
            w = tl.load(w_rows[:, None] + g[None, :], mask=wmask, other=0)
            if BITS == 3:
                wh = tl.load(h_rows[:, None] + g[None, :], mask=wmask, other=0).to(tl.int32)
            else:
                wh = w
        # runs of 4 features start at multiples of 4: 8-byte vector loads of x
        kbase = tl.max_contiguous(tl.multiple_of((g // 32) * KB + g % 32, 4), 4)
        if WB > 32:
            kvalid = (g < g_hi) & (kbase < K)  # a step of 64 or 128 words may run past the split
        else:
            kvalid = kbase < K
        if USE_DOT:
            x_step = x_rows[None, :] + kbase[:, None]          # [WB, BM] pointers, field 0
        elif BM == 1:
            x_step = x_rows[:, None] + kbase[None, :]          # [1, WB]
        else:
            x_step = x_rows[:, None, None] + kbase[None, None, :]  # [BM, 1, WB]: the product's layout
        for i in tl.static_range(E):
            kmask = kvalid & (kbase + i * 32 < K)
            v = decode_field(w, wh, i, BITS, USE_DOT, X_FP16, ASM and not USE_DOT)
            if USE_DOT:
                xt = tl.load(x_step + i * 32, mask=kmask[:, None] & m_mask[None, :], other=0.0)
                acc = tl.dot(v, xt, acc)
            elif BM == 1 and EVEN_K and WB <= 32:
                # K is whole K-blocks and steps stay inside the split: every feature exists, and a
                # one-token program's token does too; no mask (no predicate, no zeroing)
                xf = tl.load(x_step + i * 32).to(tl.float32)
                acc += v * xf
            elif BM == 1:
                xf = tl.load(x_step + i * 32, mask=m_mask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
                acc += v * xf
            else:
                xf = tl.load(x_step + i * 32, mask=m_mask[:, None, None] & kmask[None, None, :],
                             other=0.0).to(tl.float32)
                acc += v[None, :, :] * xf
    if USE_DOT:
        dot = tl.trans(acc)                      # [BM, BN]
    elif BM == 1:
        dot = tl.sum(acc, axis=1)[None, :]
    else:
        dot = tl.sum(acc, axis=2)
    # sum(x) over this split's features, once, outside the weight loop
    xs = _x_sum(x_rows, m_mask, (g_lo // 32) * KB, tl.minimum((g_hi // 32) * KB, K), BM)
    # v = (q + OFF) / MUL, so sum(q x) = MUL * sum(v x) - OFF * sum(x)
    MUL: tl.constexpr = 1.0 if (USE_DOT and (not X_FP16) and BITS == 8) else float(1 << BITS)
    OFF: tl.constexpr = 0.0 if (USE_DOT and (not X_FP16) and BITS == 8) else float(1 << BITS)
    return (dot * MUL - (zero + OFF)[None, :] * xs[:, None]) * scale[None, :]


@triton.jit
def _dense_rows(x_ptr, stride_xm, offs_m, m_mask, K, w16_ptr, offs_n, n_mask, pid_k, BM: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr,
                X_FP16: tl.constexpr, STAGES: tl.constexpr):
    """This split's part of x @ W16[rows]^T, float32 [BM, BN], for BN dense bfloat16 rows."""
    k_lo, k_hi = split_k_range(K, BK, pid_k, SPLIT_K)
    ck = tl.arange(0, BK)
    if USE_DOT:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    elif BM == 1:
        acc = tl.zeros([BN, BK], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN, BK], dtype=tl.float32)
    for k0 in tl.range(k_lo, k_hi, BK, num_stages=STAGES):
        k = k0 + ck
        kmask = k < k_hi
        w = tl.load(w16_ptr + offs_n[:, None] * K + k[None, :], mask=n_mask[:, None] & kmask[None, :], other=0.0)
        if USE_DOT:
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + k[:, None], mask=kmask[:, None] & m_mask[None, :],
                         other=0.0)
            if X_FP16:
                w = w.to(tl.float32).to(tl.float16)
            acc = tl.dot(w, xt, acc)
        elif BM == 1:
            xf = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_mask[:, None] & kmask[None, :],
                         other=0.0).to(tl.float32)
            acc += w.to(tl.float32) * xf
        else:
            xf = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_mask[:, None] & kmask[None, :],
                         other=0.0).to(tl.float32)
            acc += w.to(tl.float32)[None, :, :] * xf[:, None, :]
    if USE_DOT:
        return tl.trans(acc)
    elif BM == 1:
        return tl.sum(acc, axis=1)[None, :]
    else:
        return tl.sum(acc, axis=2)


@triton.jit
def tile_group(tile, BN: tl.constexpr, r16, r8, r4, r3, r2, r0):
    """Which slot row block `tile` belongs to, from the group table alone (blocks of BN rows, slots in
    packed order, the pruned channels last): (slot, block index within the slot, rows of the slot,
    its first packed row)."""
    t16 = tl.cdiv(r16, BN)
    t8 = t16 + tl.cdiv(r8, BN)
    t4 = t8 + tl.cdiv(r4, BN)
    t3 = t4 + tl.cdiv(r3, BN)
    t2 = t3 + tl.cdiv(r2, BN)
    slot = tl.where(tile < t16, 0, tl.where(tile < t8, 1, tl.where(tile < t4, 2, tl.where(
        tile < t3, 3, tl.where(tile < t2, 4, 5)))))
    first = tl.where(slot == 0, 0, tl.where(slot == 1, t16, tl.where(slot == 2, t8, tl.where(
        slot == 3, t4, tl.where(slot == 4, t3, t2)))))
    rows = tl.where(slot == 0, r16, tl.where(slot == 1, r8, tl.where(slot == 2, r4, tl.where(
        slot == 3, r3, tl.where(slot == 4, r2, r0)))))
    start = ((slot > 0).to(tl.int32) * r16 + (slot > 1).to(tl.int32) * r8 + (slot > 2).to(tl.int32) * r4
             + (slot > 3).to(tl.int32) * r3 + (slot > 4).to(tl.int32) * r2)
    return slot, tile - first, rows, start


@triton.jit(do_not_specialize=["M", "has_bias", "r16", "r8", "r4", "r3", "r2", "r0", "o8", "o4", "o3", "o2",
                               "h3", "n8", "n4", "n3", "n2"])
def gemv_kernel(x_ptr, w_ptr, wh_ptr, w16_ptr, scale_ptr, zero_ptr, out_index_ptr, bias_ptr, y_ptr, ws_ptr,
                count_ptr, M, K, stride_xm, stride_ym, has_bias,
                r16, r8, r4, r3, r2, r0, o8, o4, o3, o2, h3, n8, n4, n3, n2,
                BM: tl.constexpr, BN: tl.constexpr, WB: tl.constexpr, BK16: tl.constexpr,
                SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr, X_FP16: tl.constexpr, PREFETCH: tl.constexpr,
                ASM: tl.constexpr, EVEN: tl.constexpr, STAGES: tl.constexpr):
    """y[:, out_index] = x @ W^T (+ bias) for every group of a mixed-bit layer, few tokens.

    The group table (scalars): r{b} rows of width b (r0: pruned channels), o{b} word offset of the
    b-bit group in units of 16 words, h3 offset of the 3-bit high plane in units of 32 half-words
    (the units carry the 64-byte alignment into the compiler's address analysis),
    n{b} K-blocks per row; EVEN: bit s set when K is a whole number of K-blocks of slot s's width.
    Grid: (sum over widths of cdiv(r{b}, BN)) * cdiv(M, BM) * SPLIT_K; the
    K split varies fastest, then the token tile.
    """
    pid = tl.program_id(0)
    pid_k = pid % SPLIT_K
    num_m = tl.cdiv(M, BM)
    pid_m = (pid // SPLIT_K) % num_m
    tile = pid // (SPLIT_K * num_m)
    # which width this row block belongs to: scalar arithmetic on the launch arguments
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_mask = offs_m < M
    slot, local, rows, start = tile_group(tile, BN, r16, r8, r4, r3, r2, r0)
    offs_n = local * BN + tl.arange(0, BN)
    n_mask = offs_n < rows
    prow = start + offs_n
    if slot == 5:  # pruned channels: the bias (or 0), written by the first split only
        out = tl.zeros([BM, BN], dtype=tl.float32)
    elif slot == 0:
        out = _dense_rows(x_ptr, stride_xm, offs_m, m_mask, K, w16_ptr, offs_n, n_mask, pid_k,
                          BM, BN, BK16, SPLIT_K, USE_DOT, X_FP16, STAGES)
    elif slot == 1:
        out = _quant_rows(x_ptr, stride_xm, offs_m, m_mask, K, w_ptr, wh_ptr, o8 * 16, 0, n8, offs_n, n_mask, prow,
                          scale_ptr, zero_ptr, pid_k, 8, BM, BN, WB, SPLIT_K, USE_DOT, X_FP16, PREFETCH, ASM,
                          (EVEN >> 1) & 1 == 1, STAGES)
    elif slot == 2:
        out = _quant_rows(x_ptr, stride_xm, offs_m, m_mask, K, w_ptr, wh_ptr, o4 * 16, 0, n4, offs_n, n_mask, prow,
                          scale_ptr, zero_ptr, pid_k, 4, BM, BN, WB, SPLIT_K, USE_DOT, X_FP16, PREFETCH, ASM,
                          (EVEN >> 2) & 1 == 1, STAGES)
    elif slot == 3:
        out = _quant_rows(x_ptr, stride_xm, offs_m, m_mask, K, w_ptr, wh_ptr, o3 * 16, h3 * 32, n3, offs_n, n_mask,
                          prow, scale_ptr, zero_ptr, pid_k, 3, BM, BN, WB, SPLIT_K, USE_DOT, X_FP16, PREFETCH, ASM,
                          (EVEN >> 3) & 1 == 1, STAGES)
    else:
        out = _quant_rows(x_ptr, stride_xm, offs_m, m_mask, K, w_ptr, wh_ptr, o2 * 16, 0, n2, offs_n, n_mask, prow,
                          scale_ptr, zero_ptr, pid_k, 2, BM, BN, WB, SPLIT_K, USE_DOT, X_FP16, PREFETCH, ASM,
                          (EVEN >> 4) & 1 == 1, STAGES)
    if slot == 5:
        if pid_k == 0:
            store_tile(out, offs_m, m_mask, prow, n_mask, out_index_ptr, bias_ptr, y_ptr, stride_ym, has_bias)
    else:
        finish_tile(out, offs_m, m_mask, prow, n_mask, out_index_ptr, bias_ptr, y_ptr, stride_ym, has_bias,
                    ws_ptr, count_ptr, tile * num_m + pid_m, pid_k, BM, BN, SPLIT_K)
