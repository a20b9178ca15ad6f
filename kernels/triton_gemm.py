"""Triton kernels: the grouped mixed-bit GEMM (one launch per layer) and per-token int8 activations.

One program computes a BM x BN tile of the output: BM tokens times BN packed rows of ONE group
(rows of one width). The grid enumerates the tiles of every group (16, 8, 4, 3, 2 bits, then the
pruned channels) in one launch; a program finds its group from the per-slot row counts, branches to
the code of that width (all widths are compiled into the one kernel) and scatters its columns to
the original output channels through out_index.

Decoding (kernel layout of layout.py): the program loads a [BN, WB] tile of 32-bit words; for
field i the words shifted right by i*b hold the codes of 32 consecutive input features, so each
field is one matrix product with a contiguous slice of x and no register shuffle.

* A16, tensor cores (USE_DOT): a code q becomes a 16-bit float by OR-ing it into the mantissa of
  a power of two (bf16 0x4300 = 128 + q for q < 128, fp16 0x6400 = 1024 + q, fp32 0x4B000000 =
  2^23 + q for 8-bit codes under bf16), so no integer-to-float conversion unit is involved. With
  integer zero-points, q - zero is exact in bf16/fp16 and is subtracted right there; otherwise the
  offset and zero are folded into the epilogue as zero * sum(x).
* A16, one token (not USE_DOT): FMA over a [BN, WB] accumulator, reduced once at the end.
* A8: int8 x int8 -> int32 tensor-core products (8-bit codes shifted to q - 128), then
  y = s_x * s_w * (acc - zero * sum(x_codes)) with the code sums from the activation kernel.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import layout

# The `meta` table's layout (layout.SlotMeta: field f of slot s at meta[s * META_FIELDS + f]) as
# compile-time constants: a @triton.jit function reads a module global only if it is a tl.constexpr.
NUM_SLOTS = tl.constexpr(len(layout.SLOT_BITS))
META_FIELDS = tl.constexpr(layout.META_FIELDS)
META_ROWS = tl.constexpr(layout.META_ROWS)
META_START = tl.constexpr(layout.META_START)
META_WORD_OFFSET = tl.constexpr(layout.META_WORD_OFFSET)
META_HIGH_OFFSET = tl.constexpr(layout.META_HIGH_OFFSET)
META_K_BLOCKS = tl.constexpr(layout.META_K_BLOCKS)

_FP32_MAGIC = 0x4B000000  # 2^23 as float32 bits: OR-ing q < 2^23 into the mantissa gives 2^23 + q
_FP32_MAGIC_VALUE = 8388608.0
_BF16_MAGIC = 0x4300      # 128 as bfloat16 bits (7 mantissa bits: exact for q < 128)
_BF16_MAGIC_VALUE = 128.0
_FP16_MAGIC = 0x6400      # 1024 as float16 bits (10 mantissa bits: exact for q < 1024)
_FP16_MAGIC_VALUE = 1024.0
_ROUND_MAGIC = 12582912.0  # 1.5 * 2^23: (v + M) - M rounds |v| < 2^22 to nearest, ties to even


@triton.jit
def _decode16(q, zc, BITS: tl.constexpr, ZERO_FOLD: tl.constexpr, X_FP16: tl.constexpr,
              DECODE_F32: tl.constexpr):
    """Codes int32 [BN, WB] -> weights in x's 16-bit type: q - zero, or q + offset when folding.

    bfloat16 codes of 8 bits (and all widths with DECODE_F32) go through the float32 trick and one
    conversion; narrower ones stay in bfloat16 arithmetic."""
    if X_FP16:
        v = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        if not ZERO_FOLD:
            v = v - zc[:, None].to(tl.float16)
    elif BITS == 8 or DECODE_F32:
        f = (q | 0x4B000000).to(tl.float32, bitcast=True)
        if ZERO_FOLD:
            f = f - 8388608.0
        else:
            f = f - zc[:, None]
        v = f.to(tl.bfloat16)
    else:
        v = (q | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
        if not ZERO_FOLD:
            v = v - zc[:, None].to(tl.bfloat16)
    return v


@triton.jit
def store_tile(out, offs_m, m_mask, prow, n_mask, out_index_ptr, bias_ptr, y_ptr, stride_ym, has_bias):
    """Add the bias (has_bias: run-time flag) and scatter a [BM, BN] float32 tile to its channels."""
    cols = tl.load(out_index_ptr + prow, mask=n_mask, other=0)
    bias = tl.load(bias_ptr + cols, mask=n_mask & (has_bias != 0), other=0.0)
    out = out + bias[None, :]
    ptrs = y_ptr + offs_m[:, None] * stride_ym + cols[None, :]
    tl.store(ptrs, out.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _dense_tile(x_ptr, stride_xm, offs_m, m_mask, K, k_lo, k_hi, w16_ptr, offs_n, n_mask,
                A8: tl.constexpr, USE_DOT: tl.constexpr, X_FP16: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """x [BM, k_lo:k_hi] @ W16[offs_n, k_lo:k_hi]^T in float32 (x: the 16-bit input, or int8 codes
    under A8)."""
    ck = tl.arange(0, BK)
    if USE_DOT:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    else:
        acc2 = tl.zeros([BN, BK], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        k = k0 + ck
        kmask = k < k_hi
        w = tl.load(w16_ptr + offs_n[:, None] * K + k[None, :], mask=n_mask[:, None] & kmask[None, :], other=0.0)
        xi = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_mask[:, None] & kmask[None, :],
                     other=0)
        if USE_DOT:
            if A8:
                xi = xi.to(tl.float32).to(tl.bfloat16)  # int8 codes are exact in bf16
            elif X_FP16:
                w = w.to(tl.float16)
            acc = tl.dot(xi, tl.trans(w), acc)
        else:
            acc2 += w.to(tl.float32) * xi.to(tl.float32)
    if not USE_DOT:
        acc = tl.sum(acc2, axis=1)[None, :]
    return acc


@triton.jit
def _quant_tile(x_ptr, stride_xm, offs_m, m_mask, K, w_ptr, wh_ptr, woff, hoff, nkb, kb_lo, kb_hi, offs_n,
                n_mask, zc, BITS: tl.constexpr, A8: tl.constexpr, USE_DOT: tl.constexpr, ZERO_FOLD: tl.constexpr,
                X_FP16: tl.constexpr, DECODE_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                WB: tl.constexpr):
    """Products of x with BN quantized rows of one width over K-blocks kb_lo..kb_hi.

    Returns (acc [BM, BN], xs [BM]): acc is float32 (A16) or int32 (A8); xs is sum(x) over the
    blocks when the epilogue must fold the zero-point (A16 with ZERO_FOLD, and the one-token path).
    """
    E: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    LOW: tl.constexpr = 2 if BITS == 3 else BITS
    LOW_MASK: tl.constexpr = (1 << LOW) - 1
    KB: tl.constexpr = 32 * E
    BLOCKS: tl.constexpr = WB // 32
    c = tl.arange(0, WB)
    kb_local = c // 32
    j = c % 32
    row_words = nkb * 32
    w_rows = w_ptr + woff + offs_n * row_words
    h_rows = wh_ptr + hoff + offs_n * row_words
    if USE_DOT:
        if A8:
            acc = tl.zeros([BM, BN], dtype=tl.int32)
        else:
            acc = tl.zeros([BM, BN], dtype=tl.float32)
        xs2 = tl.zeros([BM, WB], dtype=tl.float32)
    else:
        acc2 = tl.zeros([BN, WB], dtype=tl.float32)
        xs2 = tl.zeros([BM, WB], dtype=tl.float32)
    for kb0 in range(kb_lo, kb_hi, BLOCKS):
        kb = kb0 + kb_local
        wmask = n_mask[:, None] & (kb < kb_hi)[None, :]
        w = tl.load(w_rows[:, None] + (kb0 * 32 + c)[None, :], mask=wmask, other=0)
        if BITS == 3:
            wh = tl.load(h_rows[:, None] + (kb0 * 32 + c)[None, :], mask=wmask, other=0).to(tl.int32)
        kbase = kb * KB + j
        # every field's slice of x is loaded before the first product: one memory round trip per
        # step instead of one per field (a product's shared-memory barrier stops later loads)
        xt = ()
        for i in tl.static_range(E):
            k = kbase + i * 32
            xmask = m_mask[:, None] & ((k < K) & (kb < kb_hi))[None, :]
            xt = xt + (tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=xmask, other=0),)
        for i in tl.static_range(E):
            q = (w >> (i * LOW)) & LOW_MASK
            if BITS == 3:
                q = q | (((wh >> i) & 1) << 2)
            xi = xt[i]
            if USE_DOT:
                if A8:
                    if BITS == 8:
                        q = q - 128
                    acc = tl.dot(xi, tl.trans(q.to(tl.int8)), acc, out_dtype=tl.int32)
                else:
                    acc = tl.dot(xi, tl.trans(_decode16(q, zc, BITS, ZERO_FOLD, X_FP16, DECODE_F32)), acc)
                    if ZERO_FOLD:
                        xs2 += xi.to(tl.float32)
            else:
                qf = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                xf = xi.to(tl.float32)
                acc2 += qf * xf
                xs2 += xf
    if not USE_DOT:
        acc = tl.sum(acc2, axis=1)[None, :]
    xs = tl.sum(xs2, axis=1)
    return acc, xs


@triton.jit
def _quant_tile_joined(x_ptr, stride_xm, offs_m, m_mask, K, w_ptr, wh_ptr, woff, hoff, nkb, g_lo, g_hi, offs_n,
                       n_mask, zc,
                       BITS: tl.constexpr, A8: tl.constexpr, ZERO_FOLD: tl.constexpr, X_FP16: tl.constexpr,
                       DECODE_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, KSTEP: tl.constexpr):
    """Like _quant_tile, but each loop step decodes KSTEP features of every row into ONE [BN, KSTEP]
    tile (all fields of KSTEP / E words) and makes one tensor-core product of it.

    For large tiles: the weights must pass through shared memory for wgmma anyway, and one product
    per step lets Triton overlap it with the next step's decoding.
    """
    E: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    LOW: tl.constexpr = 2 if BITS == 3 else BITS
    LOW_MASK: tl.constexpr = (1 << LOW) - 1
    KB: tl.constexpr = 32 * E
    WB: tl.constexpr = KSTEP // E
    row_words = nkb * 32
    c = tl.arange(0, WB)
    fields = tl.arange(0, E)
    # column t of the decoded tile is field t // WB of word t % WB of the step
    t = tl.arange(0, KSTEP)
    t_field = t // WB
    t_word = t % WB
    w_rows = w_ptr + woff + offs_n * row_words
    h_rows = wh_ptr + hoff + offs_n * row_words
    if A8:
        acc = tl.zeros([BM, BN], dtype=tl.int32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    xs2 = tl.zeros([BM, KSTEP], dtype=tl.float32)
    for g0 in range(g_lo, g_hi, WB):
        wmask = n_mask[:, None] & (g0 + c < g_hi)[None, :]
        w = tl.load(w_rows[:, None] + (g0 + c)[None, :], mask=wmask, other=0)
        q3 = (w[:, None, :] >> (fields * LOW)[None, :, None]) & LOW_MASK
        if BITS == 3:
            wh = tl.load(h_rows[:, None] + (g0 + c)[None, :], mask=wmask, other=0).to(tl.int32)
            q3 = q3 | (((wh[:, None, :] >> fields[None, :, None]) & 1) << 2)
        q = tl.reshape(q3, [BN, KSTEP])
        g = g0 + t_word
        k = (g // 32) * KB + t_field * 32 + g % 32
        k = tl.max_contiguous(tl.multiple_of(k, WB), WB)
        xmask = m_mask[:, None] & ((k < K) & (g < g_hi))[None, :]
        xi = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=xmask, other=0)
        if A8:
            if BITS == 8:
                q = q - 128
            acc = tl.dot(xi, tl.trans(q.to(tl.int8)), acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(xi, tl.trans(_decode16(q, zc, BITS, ZERO_FOLD, X_FP16, DECODE_F32)), acc)
            if ZERO_FOLD:
                xs2 += xi.to(tl.float32)
    xs = tl.sum(xs2, axis=1)
    return acc, xs


@triton.jit
def split_k_range(total, step, pid_k, SPLIT_K: tl.constexpr):
    """[lo, hi) of `total` units (in multiples of `step`) handled by split pid_k of SPLIT_K."""
    chunk = tl.cdiv(tl.cdiv(total, step), SPLIT_K) * step
    lo = pid_k * chunk
    hi = tl.minimum(total, lo + chunk)
    return lo, hi


@triton.jit
def _quant_group(x_ptr, stride_xm, offs_m, m_mask, K, w_ptr, wh_ptr, woff, hoff, nkb, offs_n, n_mask, prow,
                 xscale_ptr, xsum_ptr, scale_ptr, zero_ptr, pid_k,
                 BITS: tl.constexpr, A8: tl.constexpr, USE_DOT: tl.constexpr, ZERO_FOLD: tl.constexpr,
                 X_FP16: tl.constexpr, DECODE_F32: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, WB: tl.constexpr, KSTEP: tl.constexpr,
                 SPLIT_K: tl.constexpr):
    """This split's share of y[:, rows] (before the bias) for BN rows of one quantized width."""
    scale = tl.load(scale_ptr + prow, mask=n_mask, other=0.0)
    zero = tl.load(zero_ptr + prow, mask=n_mask, other=0.0)
    # zc: what the decoded codes carry besides q (offset of the float trick, zero-point when folded)
    if A8:
        if BITS == 8:
            zc = zero - 128.0
        else:
            zc = zero
    elif not USE_DOT:
        zc = zero
    elif X_FP16:
        zc = zero + 1024.0
    elif BITS == 8 or DECODE_F32:
        if ZERO_FOLD:
            zc = zero
        else:
            zc = zero + 8388608.0
    else:
        zc = zero + 128.0
    if KSTEP > 0:
        E: tl.constexpr = 16 if BITS == 3 else 32 // BITS
        g_lo, g_hi = split_k_range(nkb * 32, KSTEP // E, pid_k, SPLIT_K)
        acc, xs = _quant_tile_joined(x_ptr, stride_xm, offs_m, m_mask, K, w_ptr, wh_ptr, woff, hoff, nkb, g_lo, g_hi,
                                     offs_n, n_mask, zc, BITS, A8, ZERO_FOLD, X_FP16, DECODE_F32, BM, BN, KSTEP)
    else:
        kb_lo, kb_hi = split_k_range(nkb, WB // 32, pid_k, SPLIT_K)
        acc, xs = _quant_tile(x_ptr, stride_xm, offs_m, m_mask, K, w_ptr, wh_ptr, woff, hoff, nkb, kb_lo, kb_hi,
                              offs_n, n_mask, zc, BITS, A8, USE_DOT, ZERO_FOLD, X_FP16, DECODE_F32, BM, BN, WB)
    if A8:
        xsum = tl.load(xsum_ptr + offs_m, mask=m_mask, other=0).to(tl.float32)
        xscale = tl.load(xscale_ptr + offs_m, mask=m_mask, other=0.0)
        xsum = tl.where(pid_k == 0, xsum, 0.0)  # the zero-point term belongs to one split only
        out = (acc.to(tl.float32) - zc[None, :] * xsum[:, None]) * xscale[:, None] * scale[None, :]
    elif USE_DOT and not ZERO_FOLD:
        out = acc * scale[None, :]
    else:
        out = (acc - zc[None, :] * xs[:, None]) * scale[None, :]
    return out


@triton.jit
def finish_tile(out, offs_m, m_mask, prow, n_mask, out_index_ptr, bias_ptr, y_ptr, stride_ym, has_bias,
                ws_ptr, count_ptr, counter, pid_k, BM: tl.constexpr, BN: tl.constexpr, SPLIT_K: tl.constexpr):
    """Store the tile; with split-K, park this split's part and let the last split of the tile add
    them up and store (the counter returns to 0 for the next launch)."""
    if SPLIT_K == 1:
        store_tile(out, offs_m, m_mask, prow, n_mask, out_index_ptr, bias_ptr, y_ptr, stride_ym, has_bias)
    else:
        r = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
        base = ws_ptr + counter * (SPLIT_K * BM * BN)
        tl.store(base + pid_k * (BM * BN) + r, out)
        tl.debug_barrier()  # every thread's part is written before one thread signals
        arrived = tl.atomic_add(count_ptr + counter, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros([BM, BN], dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(base + s * (BM * BN) + r, cache_modifier=".cg")
            store_tile(total, offs_m, m_mask, prow, n_mask, out_index_ptr, bias_ptr, y_ptr, stride_ym, has_bias)
            tl.store(count_ptr + counter, 0)


@triton.jit(do_not_specialize=["M", "has_bias"])
def mixed_gemm_kernel(x_ptr, xscale_ptr, xsum_ptr, w_ptr, wh_ptr, w16_ptr, scale_ptr, zero_ptr,
                      out_index_ptr, meta_ptr, bias_ptr, y_ptr, ws_ptr, count_ptr, M, K, stride_xm, stride_ym,
                      has_bias, A8: tl.constexpr, ZERO_FOLD: tl.constexpr, X_FP16: tl.constexpr,
                      USE_DOT: tl.constexpr, DECODE_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      WB: tl.constexpr, KSTEP: tl.constexpr, BK16: tl.constexpr, SPLIT_K: tl.constexpr):
    """y[:, out_index] = x @ W^T (+ bias) for every group of a mixed-bit layer; pruned channels get the bias.

    Grid: (sum over slots of cdiv(rows, BN)) * cdiv(M, BM) * SPLIT_K programs; the K split varies
    fastest, then the token tile, so the programs that read one weight tile run together.
    """
    pid = tl.program_id(0)
    pid_k = pid % SPLIT_K
    num_m = tl.cdiv(M, BM)
    pid_m = (pid // SPLIT_K) % num_m
    tile = pid // (SPLIT_K * num_m)
    slot = 0
    local = 0
    first = 0
    for s in tl.static_range(NUM_SLOTS):
        rows_s = tl.load(meta_ptr + s * META_FIELDS + META_ROWS)
        count = tl.cdiv(rows_s, BN)
        hit = (tile >= first) & (tile < first + count)
        slot = tl.where(hit, s, slot)
        local = tl.where(hit, tile - first, local)
        first += count
    slot_meta = meta_ptr + slot * META_FIELDS
    rows = tl.load(slot_meta + META_ROWS)
    start = tl.load(slot_meta + META_START)
    woff = tl.load(slot_meta + META_WORD_OFFSET)
    hoff = tl.load(slot_meta + META_HIGH_OFFSET)
    nkb = tl.load(slot_meta + META_K_BLOCKS)
    offs_n = local * BN + tl.arange(0, BN)
    n_mask = offs_n < rows
    prow = start + offs_n
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_mask = offs_m < M
    counter = tile * num_m + pid_m
    if slot == 0:
        k_lo, k_hi = split_k_range(K, BK16, pid_k, SPLIT_K)
        out = _dense_tile(x_ptr, stride_xm, offs_m, m_mask, K, k_lo, k_hi, w16_ptr, offs_n, n_mask,
                          A8, USE_DOT, X_FP16, BM, BN, BK16)
        if A8:
            out = out * tl.load(xscale_ptr + offs_m, mask=m_mask, other=0.0)[:, None]
    elif slot == 1:
        out = _quant_group(x_ptr, stride_xm, offs_m, m_mask, K, w_ptr, wh_ptr, woff, hoff, nkb, offs_n, n_mask,
                           prow, xscale_ptr, xsum_ptr, scale_ptr, zero_ptr, pid_k,
                           8, A8, USE_DOT, ZERO_FOLD, X_FP16, DECODE_F32, BM, BN, WB, KSTEP, SPLIT_K)
    elif slot == 2:
        out = _quant_group(x_ptr, stride_xm, offs_m, m_mask, K, w_ptr, wh_ptr, woff, hoff, nkb, offs_n, n_mask,
                           prow, xscale_ptr, xsum_ptr, scale_ptr, zero_ptr, pid_k,
                           4, A8, USE_DOT, ZERO_FOLD, X_FP16, DECODE_F32, BM, BN, WB, KSTEP, SPLIT_K)
    elif slot == 3:
        out = _quant_group(x_ptr, stride_xm, offs_m, m_mask, K, w_ptr, wh_ptr, woff, hoff, nkb, offs_n, n_mask,
                           prow, xscale_ptr, xsum_ptr, scale_ptr, zero_ptr, pid_k,
                           3, A8, USE_DOT, ZERO_FOLD, X_FP16, DECODE_F32, BM, BN, WB, KSTEP, SPLIT_K)
    elif slot == 4:
        out = _quant_group(x_ptr, stride_xm, offs_m, m_mask, K, w_ptr, wh_ptr, woff, hoff, nkb, offs_n, n_mask,
                           prow, xscale_ptr, xsum_ptr, scale_ptr, zero_ptr, pid_k,
                           2, A8, USE_DOT, ZERO_FOLD, X_FP16, DECODE_F32, BM, BN, WB, KSTEP, SPLIT_K)
    else:
        out = tl.zeros([BM, BN], dtype=tl.float32)
    finish_tile(out, offs_m, m_mask, prow, n_mask, out_index_ptr, bias_ptr, y_ptr, stride_ym, has_bias,
                ws_ptr, count_ptr, counter, pid_k, BM, BN, SPLIT_K)


@triton.jit
def act_quant_kernel(x_ptr, xq_ptr, xscale_ptr, xsum_ptr, K, stride_xm, BLOCK: tl.constexpr):
    """Row m of x -> int8 codes, scale = max|x| / 127 (>= 1e-12), and the sum of the codes."""
    m = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    row = x_ptr + m * stride_xm
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        v = tl.load(row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), 127.0), 1e-12)
    total = tl.zeros([BLOCK], dtype=tl.int32)
    for k0 in range(0, K, BLOCK):
        kmask = k0 + offs < K
        v = tl.load(row + k0 + offs, mask=kmask, other=0.0).to(tl.float32)
        r = tl.math.div_rn(v, scale)
        r = (r + 12582912.0) - 12582912.0
        r = tl.minimum(tl.maximum(r, -127.0), 127.0)
        codes = r.to(tl.int32)
        tl.store(xq_ptr + m * K + k0 + offs, codes.to(tl.int8), mask=kmask)
        total += codes
    tl.store(xscale_ptr + m, scale)
    tl.store(xsum_ptr + m, tl.sum(total, axis=0))
