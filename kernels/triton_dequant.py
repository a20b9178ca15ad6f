"""Triton kernel for many tokens: decode a mixed-bit layer to a dense 16-bit weight, for cuBLAS.

Why: at ~590 tokens (an OpenVLA-OFT forward) the layer is compute-bound, and the grouped GEMM
(triton_gemm.py) decodes every weight tile once per token tile while running at 1-2% of the
tensor cores' rate (run 2: decoder 92 ms against 17.4 ms in bf16, bench/kernels/results/run2_h200/
results_nvidia_h200.md, "Whole decoder", avg4 tuned, 590 tokens, 16-bit activations). Decoding
the whole layer once into a dense bfloat16/float16 [N, K] matrix and handing it to cuBLAS costs one
memory-bound pass (read the packed words, write 2 bytes per weight: ~40 us for 11008 x 4096 at
H200 bandwidth) plus the bf16 GEMM itself. The dense matrix is transient: it lives for one layer
call, so the weights held between calls stay packed. Measured on the H200: 685 us for that layer
while every weight was a 2-byte store (bench/kernels/results/dequant/results_nvidia_h200.md, gate/up
"decode only avg4"), 34 us (68% of the byte floor) once the stores were 16-byte vectors; the decoder
at 590 tokens then ran at 0.83x bf16 (run 10: bench/kernels/results/dequant2/results_nvidia_h200.md,
the same row and "Whole decoder"), so this is the default from ops.DEQUANT_MIN_TOKENS tokens on.

One launch covers every width: program (tile, chunk) decodes BN packed rows of one width over KC
input features and writes them to the rows of their output channels (out_index), so the matrix is
in the layer's own channel order and pruned channels are zero rows. Codes come out exactly:
v = 1 + q / 2^b from the small-M kernel's decode, q = v * 2^b - 2^b, w = (q - zero) * scale in
float32, rounded once to the output dtype (the same numbers as dequantize_kernel_weights).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_gemv import decode_field, tile_group  # the same decode and group table as the small-M kernel


@triton.jit
def _dequant_rows(w_ptr, wh_ptr, woff, hoff, nkb, offs_n, n_mask, prow, out_row, scale_ptr, zero_ptr, W_ptr, K,
                  stride_w, chunk, BITS: tl.constexpr, BN: tl.constexpr, KC: tl.constexpr, CODES: tl.constexpr):
    E: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    KB: tl.constexpr = 32 * E
    WC: tl.constexpr = KC // E  # words of a row that hold this chunk's KC features
    row_words = nkb * 32
    # runs of 8 words: 32-byte loads, and 8 consecutive features per thread for each field, so the
    # stores are 16-byte vectors (without the hints below, one 2-byte store per weight: the first
    # H200 run's 685 us for gate/up)
    g = chunk * WC + tl.max_contiguous(tl.multiple_of(tl.arange(0, WC), 8), 8)
    wmask = n_mask[:, None] & (g < row_words)[None, :]
    w = tl.load(w_ptr + woff + offs_n[:, None] * row_words + g[None, :], mask=wmask, other=0)
    if BITS == 3:
        wh = tl.load(wh_ptr + hoff + offs_n[:, None] * row_words + g[None, :], mask=wmask, other=0).to(tl.int32)
    else:
        wh = w
    scale = tl.load(scale_ptr + prow, mask=n_mask, other=0.0)
    zero = tl.load(zero_ptr + prow, mask=n_mask, other=0.0)
    kbase = tl.max_contiguous(tl.multiple_of((g // 32) * KB + g % 32, 8), 8)
    dst = W_ptr + out_row[:, None].to(tl.int64) * stride_w
    for i in tl.static_range(E):
        v = decode_field(w, wh, i, BITS, False, False, False)
        q = v * float(1 << BITS) - float(1 << BITS)  # exact: v = 1 + q / 2^b
        if CODES:  # int8 codes for an integer GEMM: q, or q - 128 for 8-bit rows (the A8 epilogue adds it back)
            val = q - 128.0 if BITS == 8 else q
        else:
            val = (q - zero[:, None]) * scale[:, None]
        k = tl.max_contiguous(tl.multiple_of(kbase + i * 32, 8), 8)
        tl.store(dst + k[None, :], val.to(W_ptr.dtype.element_ty), mask=n_mask[:, None] & (k < K)[None, :])


@triton.jit(do_not_specialize=["r16", "r8", "r4", "r3", "r2", "r0", "o8", "o4", "o3", "o2", "h3", "n8", "n4",
                               "n3", "n2"])
def dequant_kernel(w_ptr, wh_ptr, w16_ptr, scale_ptr, zero_ptr, out_index_ptr, W_ptr, K, stride_w,
                   r16, r8, r4, r3, r2, r0, o8, o4, o3, o2, h3, n8, n4, n3, n2,
                   BN: tl.constexpr, KC: tl.constexpr, CODES: tl.constexpr = False):
    """W[out_index[row]] = decoded row, for every packed row and pruned channel of the layer.

    CODES: W is int8 and takes the rows' integer codes (q, q - 128 at 8 bits) instead of their
    weights, with zeros for dense rows (the 8-bit-activation path multiplies those in bf16 apart).

    Group table as in triton_gemv.gemv_kernel. Grid: (sum over slots of cdiv(rows, BN), cdiv(K, KC)).
    """
    tile = tl.program_id(0)
    chunk = tl.program_id(1)
    slot, local, rows, start = tile_group(tile, BN, r16, r8, r4, r3, r2, r0)
    offs_n = local * BN + tl.arange(0, BN)
    n_mask = offs_n < rows
    prow = start + offs_n
    out_row = tl.load(out_index_ptr + prow, mask=n_mask, other=0)
    if slot == 5 or slot == 0:  # pruned channels: zeros; dense rows: a copy (zeros for codes)
        k = chunk * KC + tl.arange(0, KC)
        mask = n_mask[:, None] & (k < K)[None, :]
        if slot == 5 or CODES:
            val = tl.zeros([BN, KC], dtype=W_ptr.dtype.element_ty)
        else:
            val = tl.load(w16_ptr + offs_n[:, None].to(tl.int64) * K + k[None, :], mask=mask,
                          other=0.0).to(W_ptr.dtype.element_ty)
        tl.store(W_ptr + out_row[:, None].to(tl.int64) * stride_w + k[None, :], val, mask=mask)
    elif slot == 1:
        _dequant_rows(w_ptr, wh_ptr, o8 * 16, 0, n8, offs_n, n_mask, prow, out_row, scale_ptr, zero_ptr, W_ptr, K,
                      stride_w, chunk, 8, BN, KC, CODES)
    elif slot == 2:
        _dequant_rows(w_ptr, wh_ptr, o4 * 16, 0, n4, offs_n, n_mask, prow, out_row, scale_ptr, zero_ptr, W_ptr, K,
                      stride_w, chunk, 4, BN, KC, CODES)
    elif slot == 3:
        _dequant_rows(w_ptr, wh_ptr, o3 * 16, h3 * 32, n3, offs_n, n_mask, prow, out_row, scale_ptr, zero_ptr,
                      W_ptr, K, stride_w, chunk, 3, BN, KC, CODES)
    else:
        _dequant_rows(w_ptr, wh_ptr, o2 * 16, 0, n2, offs_n, n_mask, prow, out_row, scale_ptr, zero_ptr, W_ptr, K,
                      stride_w, chunk, 2, BN, KC, CODES)
