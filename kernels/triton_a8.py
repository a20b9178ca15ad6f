"""Triton kernel for many tokens with 8-bit activations: an int8 GEMM over a layer's decoded codes.

Why: at ~590 tokens (an OpenVLA-OFT forward) a layer is compute-bound, and int8 tensor cores do
twice the bf16 rate on Hopper. The grouped GEMM's int8 path (triton_gemm.py), which decodes every
weight tile once per token tile, ran the whole oft-7b policy at 0.26x bf16 (H100, 2026-12-07,
bench/serve/README.md). Here the layer is decoded once per call into a transient int8 [N, K] matrix
of its codes (triton_dequant.py with CODES: one memory-bound pass writing 1 byte a weight, half of
what the 16-bit path's decode writes), then this kernel multiplies the per-token int8 activations
(triton_gemm.act_quant_kernel) by it on int8 tensor cores and applies everything else in its
epilogue, so no int32 product ever goes to memory:

    y[m, n] = s_x[m] * s_w[n] * (acc[m, n] + c[n] * sum_k xq[m, k]) + bias[n]

with c = -zero (or 128 - zero for 8-bit rows, whose codes were stored as q - 128 to fit int8), the
numbers of the grouped GEMM's A8 path and of kernels/reference.py. Dense (16-bit) rows are zero in
the decoded matrix; their products come from cuBLAS (int8 codes are exact in bf16) as y16, and the
epilogue takes s_x * y16 for those channels instead. Pruned channels have s_w = 0 and give the bias.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_order(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program in Triton's grouped order: GROUP_M token tiles walk the weight
    tiles together, so a weight tile is read by consecutive programs while it is in L2 (at 590
    tokens and BM >= 128 a group holds every token tile: each weight tile streams from DRAM once)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


@triton.jit
def a8_gemm_kernel(x_ptr, w_ptr, xscale_ptr, xsum_ptr, wscale_ptr, wcorr_ptr, dense_ptr, y16_ptr, bias_ptr, y_ptr,
                   M, N, K, stride_y16, HAS_DENSE: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """y [M, N] (output-channel order) = the epilogue above over xq [M, K] int8 @ W [N, K] int8.

    Grid: (cdiv(M, BM) * cdiv(N, BN),), in tile_order.
    """
    pid_m, pid_n = tile_order(M, N, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    # rows past M or N read row 0 again (their results are masked at the store), so the loads in
    # the main loop need a mask only for K's tail
    a_ptrs = x_ptr + (offs_m % M)[:, None].to(tl.int64) * K + offs_k[None, :]
    b_ptrs = w_ptr + (offs_n % N)[None, :].to(tl.int64) * K + offs_k[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, K, BK):
        k_left = K - k0
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BK
        b_ptrs += BK
    m_mask = offs_m < M
    n_mask = offs_n < N
    xscale = tl.load(xscale_ptr + offs_m, mask=m_mask, other=0.0)
    xsum = tl.load(xsum_ptr + offs_m, mask=m_mask, other=0).to(tl.float32)
    wscale = tl.load(wscale_ptr + offs_n, mask=n_mask, other=0.0)
    wcorr = tl.load(wcorr_ptr + offs_n, mask=n_mask, other=0.0)
    y = (acc.to(tl.float32) + wcorr[None, :] * xsum[:, None]) * (xscale[:, None] * wscale[None, :])
    if HAS_DENSE:
        dense = tl.load(dense_ptr + offs_n, mask=n_mask, other=-1)
        is_dense = dense >= 0
        y16 = tl.load(y16_ptr + offs_m[:, None].to(tl.int64) * stride_y16 + dense[None, :],
                      mask=m_mask[:, None] & is_dense[None, :], other=0.0)
        y = tl.where(is_dense[None, :], y16.to(tl.float32) * xscale[:, None], y)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])
