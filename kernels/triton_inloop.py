"""Probe kernels: can a GEMM that decodes 4-bit weights inside its main loop reach cuBLAS at 590 tokens?

Measured by bench/kernels/inloop_probe.py; nothing routes here. ONE width (4-bit codes) with a
per-output-channel scale s[n] and zero-point z[n], so the main loop only turns codes into
tensor-core operands and everything per channel sits in the epilogue:

    y[m, n] = s[n] * (sum_k x[m, k] q[n, k] - z[n] * sum_k x[m, k]) + bias[n]

Kernels (one BM x BN output tile per program, program ids swizzled in GROUP_M as in Triton's matmul
tutorial, float32 accumulator, tl.dot):

* bf16_gemm_kernel       bf16 x  @ bf16 W^T                  -- the Triton bf16 ceiling
* w4a16_gemm_kernel      bf16 x  @ decode(codes)^T, bf16     -- the 16-bit-activation probe
* fp8_gemm_kernel        e4m3 xq @ e4m3 W^T                  -- the Triton fp8 ceiling
* w4a8_gemm_kernel       e4m3 xq @ decode(codes)^T, e4m3     -- the 8-bit-activation probe
* row_sum_kernel         sum_k x[m, k] in float32 (the A16 zero-point term; A8 gets it from
                         triton_fp8.quantize_activations_fp8)

Packed layout (pack_int4): int32 [N, K // 8], rows along K like F.linear's weight; the 8 nibbles
of a word are not 8 consecutive features but exactly the 8 codes that one tensor-core lane holds
of that row in the register-A fragment (feature_of_nibble; the order differs for bf16 and e4m3
operands, so each kernel has its own). A [BN, BK // 8] word tile then expands to the operand with
joins + reshape/permute that Triton lowers to renamed registers: no data crosses threads (or
shared memory) between the word load and the wgmma.

Decoding, exact and without any integer-to-float conversion:
* bf16: 0x3F80 | (q << 3) read as bf16 is 1 + q/16 (the code in the top 4 of the 7 mantissa bits
  of 1.0). The two codes of a register pair sit 16 bits apart in the word, so one shift, AND and
  OR on 32 bits make two operands (sm_90 SASS: ~1 instruction per weight, no PRMT). The offset is
  folded into the epilogue: s * (16 acc - (16 + z) sum(x)). It costs float32 headroom in the
  accumulator (cancelled after the loop); with q in the top mantissa bits it is 16 code units,
  where the usual 0x4300 | q = 128 + q makes it 128 (8x the cancellation error).
* e4m3: a byte q <= 15 read as e4m3 is q * 2^-9 (0x00-0x07 subnormals, 0x08-0x0F the first binade);
  one AND per 4 codes (w & 0x0F0F0F0F, (w >> 4) & 0x0F0F0F0F), the epilogue multiplies by 512 (the
  trick of triton_fp8.py's DECODE="bitcast"); LLVM still re-packs the bytes (~1.1 instructions
  per weight on sm_90).

SWAP (w4a16/w4a8): which tl.dot operand the decoded codes are. On sm_90 wgmma reads B from shared
memory and A from shared memory or registers. SWAP=0 decodes B (y = x @ Wd^T): the decoded tile
must be written back to shared memory every step before the wgmma can read it. SWAP=1 computes
y^T = Wd @ x^T, so the decoded tile is A and can feed wgmma from registers while x^T, K-major
(which fp8 wgmma requires), streams through the software pipeline as B; the token tile is then
wgmma's N (8..256), which also suits small M. The probe times both.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    _HAVE_TRITON = True
except ImportError:  # pragma: no cover - the package imports without Triton
    triton = tl = None
    _HAVE_TRITON = False

#: bf16 bits of 1.0: OR-ing q << 3 (q < 16) into the mantissa gives 1 + q/16 exactly
BF16_ONE = 0x3F80
BF16_SHIFT = 3
#: the decoded bf16 operand is (BF16_OFFSET + q) / BF16_UNIT
BF16_OFFSET = 16.0
BF16_UNIT = 16.0
#: a byte q <= 15 read as e4m3 is q * 2^-9
E4M3_UNIT = 512.0
#: H200 (sm_90): opt-in shared memory per block
SMEM_LIMIT = 227 * 1024


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _patch_interpreter() -> None:
    if _interpreting():
        from .triton_fp8 import patch_interpreter_fp8
        patch_interpreter_fp8()  # includes _interpreter_compat's bf16-dot fix


# ---- host-side layout and reference -------------------------------------------------------------------

ORDERS = ("a16", "a8")


def feature_of_nibble(order: str, k: int) -> torch.Tensor:
    """int64 [K // 8, 8]: the feature whose code nibble i of word g holds, for the kernel `order`.

    Words come in fours per 32 features (g = 4 b + c); the order puts in word (n, 4b + c) exactly
    the 8 codes that tensor-core lane c (lane % 4) holds of row n in the register-A fragment (what
    Triton's MMAv3 dot operand layout assigns), so the decoded operand needs no data movement:
    * a16 (bf16, kWidth 2: lane c holds k = 2c + {0, 1} + {0, 8, 16, 24}): nibble i = j1 + 2 j2 + 4 j0
      holds k = 32 b + 16 j2 + 8 j1 + 2 c + j0, so the pair (k, k + 1) of one 32-bit register sits
      16 bits apart in the word;
    * a8 (e4m3, kWidth 4: lane c holds k = 4c + {0..3} + {0, 16}): nibble i = 2 j + h holds
      k = 32 b + 16 h + 4 c + j, so a register's 4 bytes are the low (or high) nibbles of the word's
      4 bytes."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if k % 32:
        raise ValueError(f"K must be a multiple of 32, got {k}")
    g = torch.arange(k // 8)[:, None]
    i = torch.arange(8)[None, :]
    b, c = g // 4, g % 4
    if order == "a16":
        return 32 * b + 16 * ((i >> 1) & 1) + 8 * (i & 1) + 2 * c + (i >> 2)
    return 32 * b + 16 * (i & 1) + 4 * c + (i >> 1)


def pack_int4(codes: torch.Tensor, order: str) -> torch.Tensor:
    """codes [N, K] in 0..15 (K a multiple of 32) -> int32 [N, K // 8] in the kernel `order`
    (feature_of_nibble)."""
    n, k = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > 15):
        raise ValueError("codes must lie in 0..15")
    idx = feature_of_nibble(order, k).to(codes.device)
    c = c[:, idx.reshape(-1)].reshape(n, k // 8, 8)
    words = (c << (4 * torch.arange(8, device=codes.device))).sum(-1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def unpack_int4(packed: torch.Tensor, order: str) -> torch.Tensor:
    n, g = packed.shape
    w = packed.to(torch.int64) & 0xFFFFFFFF
    nib = ((w[:, :, None] >> (4 * torch.arange(8, device=packed.device))) & 15).reshape(n, 8 * g)
    out = torch.empty_like(nib)
    out[:, feature_of_nibble(order, 8 * g).to(packed.device).reshape(-1)] = nib
    return out.to(torch.uint8)


def reference_w4(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """float64 x @ (s * (q - z))^T + bias."""
    w = scale.double()[:, None] * (codes.double() - zero.double()[:, None])
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


# ---- kernels ------------------------------------------------------------------------------------------

if _HAVE_TRITON:
    from .triton_a8 import tile_order as _swizzle  # the grouped program order, shared with the A8 GEMM

    @triton.jit
    def _bf16_pair(words, p: tl.constexpr):
        """Nibbles p and p + 4 of every word (16 bits apart: pack_int4's a16 order) as two bf16
        1 + q/16. The shift/AND/OR run once on the 32-bit word for both, and the two halves are the
        (k, k + 1) register pair the tensor core reads, so no byte permutes follow."""
        if p == 0:
            t = ((words << 3) & 0x00780078) | 0x3F803F80
        else:
            t = ((words >> (4 * p - 3)) & 0x00780078) | 0x3F803F80
        return t.to(tl.int16).to(tl.bfloat16, bitcast=True), (t >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _e4m3_byte(v, j: tl.constexpr):
        """Byte j of v as e4m3 (v's bytes are codes <= 15: q * 2^-9)."""
        return (v >> (8 * j)).to(tl.int8).to(tl.float8e4nv, bitcast=True)

    @triton.jit
    def _operand(w_ptrs, kmask, FP8: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr):
        """The decoded [BN, BK] operand from the word tile at w_ptrs ([BN, BK // 8], pack_int4 order).

        tl.join appends its new axis in the registers of the thread that holds its inputs, so the 8
        codes of a word stay in the thread that loaded the word; the reshape/permute only rename which
        feature each register holds (feature_of_nibble), which Triton's linear layouts do for free: on
        sm_90 the result is already the wgmma register-A fragment (no shared-memory round trip,
        test_kernels_inloop.py checks the SASS)."""
        if EVEN_K:
            words = tl.load(w_ptrs)
        else:
            words = tl.load(w_ptrs, mask=kmask, other=0)
        if FP8:
            # one AND per 4 codes: byte j of lo / hi is nibble 2j / 2j + 1 of the word (a8 order:
            # k = 32 b + 16 h + 4 c + j), and a register's 4 bytes are the fragment's 4 consecutive k
            lo = words & 0x0F0F0F0F
            hi = (words >> 4) & 0x0F0F0F0F
            # [.., h, j1, j0] with j = 2 j1 + j0: the first join makes the slowest of the new axes
            t = tl.join(tl.join(tl.join(_e4m3_byte(lo, 0), _e4m3_byte(hi, 0)),
                                tl.join(_e4m3_byte(lo, 2), _e4m3_byte(hi, 2))),
                        tl.join(tl.join(_e4m3_byte(lo, 1), _e4m3_byte(hi, 1)),
                                tl.join(_e4m3_byte(lo, 3), _e4m3_byte(hi, 3))))
            t = tl.reshape(t, (BN, BK // 32, 4, 2, 4))  # [n, b, c, h, j]
            t = tl.permute(t, (0, 1, 3, 2, 4))  # [n, b, h, c, j]
        else:
            # nibble j1 + 2 j2 + 4 j0 holds k = 32 b + 16 j2 + 8 j1 + 2 c + j0 (a16 order)
            n0, n4 = _bf16_pair(words, 0)
            n1, n5 = _bf16_pair(words, 1)
            n2, n6 = _bf16_pair(words, 2)
            n3, n7 = _bf16_pair(words, 3)
            t = tl.join(tl.join(tl.join(n0, n2), tl.join(n1, n3)), tl.join(tl.join(n4, n6), tl.join(n5, n7)))
            t = tl.reshape(t, (BN, BK // 32, 4, 2, 2, 2))  # [n, b, c, j2, j1, j0]
            t = tl.permute(t, (0, 1, 3, 4, 2, 5))  # [n, b, j2, j1, c, j0]
        return tl.reshape(t, (BN, BK))

    @triton.jit
    def decode_kernel(w_ptr, out_ptr, N, KW, FP8: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """Writes the operand the GEMM loops build from the codes (bit patterns as int16/int8), so the
        tests compare the decode bitwise on the interpreter and on the GPU."""
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rg = tl.program_id(1) * (BK // 8) + tl.arange(0, BK // 8)
        rk = tl.program_id(1) * BK + tl.arange(0, BK)
        b = _operand(w_ptr + rn[:, None] * KW + rg[None, :], (rn[:, None] < N) & (rg[None, :] < KW), FP8, BN, BK,
                     False)
        if FP8:
            v = b.to(tl.int8, bitcast=True)
        else:
            v = b.to(tl.int16, bitcast=True)
        tl.store(out_ptr + rn[:, None] * (KW * 8) + rk[None, :], v, mask=(rn[:, None] < N) & (rk[None, :] < KW * 8))

    @triton.jit
    def row_sum_kernel(x_ptr, out_ptr, K, stride_xm, BLOCK: tl.constexpr):
        m = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            total += tl.load(x_ptr + m * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        tl.store(out_ptr + m, tl.sum(total, axis=0))

    @triton.jit
    def _store(y_ptr, out, rm, rn, M, N, stride_ym, bias_ptr, HAS_BIAS: tl.constexpr):
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], out.to(y_ptr.dtype.element_ty),
                 mask=(rm < M)[:, None] & (rn < N)[None, :])

    @triton.jit
    def _dense_main_loop(x_ptr, w_ptr, rm, rn, K, stride_xm, stride_wn, EVEN_K: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """sum_k x[rm, k] * W[rn, k] in float32 [BM, BN]: the ceilings' loop, no decoding."""
        rk = tl.arange(0, BK)
        x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
        w_ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :]
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, K, BK):
            if EVEN_K:
                a = tl.load(x_ptrs)
                b = tl.load(w_ptrs)
            else:
                a = tl.load(x_ptrs, mask=(k0 + rk)[None, :] < K, other=0.0)
                b = tl.load(w_ptrs, mask=(k0 + rk)[None, :] < K, other=0.0)
            acc = tl.dot(a, tl.trans(b), acc)
            x_ptrs += BK
            w_ptrs += BK
        return acc

    # M is not specialised: one binary serves 1, 16 and 590 tokens (fewer compiles to tune)
    @triton.jit(do_not_specialize=["M"])
    def bf16_gemm_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                         HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                         BK: tl.constexpr, GROUP_M: tl.constexpr):
        """y = x @ W^T (+ bias); x bf16 [M, K], W bf16 [N, K]."""
        pid_m, pid_n = _swizzle(M, N, BM, BN, GROUP_M)
        # rows past M / N wrap to valid ones (loads need no mask; the store drops them)
        rm = (pid_m * BM + tl.arange(0, BM)) % M
        rn = (pid_n * BN + tl.arange(0, BN)) % N
        acc = _dense_main_loop(x_ptr, w_ptr, rm, rn, K, stride_xm, stride_wn, EVEN_K, BM, BN, BK)
        _store(y_ptr, acc, pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN), M, N, stride_ym,
               bias_ptr, HAS_BIAS)

    @triton.jit(do_not_specialize=["M"])
    def fp8_gemm_kernel(xq_ptr, sx_ptr, w_ptr, sw_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                        HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr, GROUP_M: tl.constexpr):
        """y = s_x[m] s_w[n] (xq @ Wq^T) (+ bias); xq e4m3 [M, K] (per token), Wq e4m3 [N, K] (per channel)."""
        pid_m, pid_n = _swizzle(M, N, BM, BN, GROUP_M)
        # rows past M / N wrap to valid ones (loads need no mask; the store drops them)
        rm = (pid_m * BM + tl.arange(0, BM)) % M
        rn = (pid_n * BN + tl.arange(0, BN)) % N
        acc = _dense_main_loop(xq_ptr, w_ptr, rm, rn, K, stride_xm, stride_wn, EVEN_K, BM, BN, BK)
        sx = tl.load(sx_ptr + rm)
        sw = tl.load(sw_ptr + rn)
        _store(y_ptr, acc * sx[:, None] * sw[None, :], pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN),
               M, N, stride_ym, bias_ptr, HAS_BIAS)

    @triton.jit
    def _w4_main_loop(x_ptr, w_ptr, rm, rn, K, stride_xm, stride_wn, FP8: tl.constexpr, SWAP: tl.constexpr,
                      EVEN_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """sum_k x[rm, k] * decode(q[rn, k]) in float32: [BM, BN], or [BN, BM] when SWAP."""
        rk = tl.arange(0, BK)
        rg = tl.arange(0, BK // 8)
        x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
        w_ptrs = w_ptr + rn[:, None] * stride_wn + rg[None, :]
        if SWAP:
            acc = tl.zeros([BN, BM], dtype=tl.float32)
        else:
            acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, K, BK):
            if EVEN_K:
                a = tl.load(x_ptrs)
            else:
                a = tl.load(x_ptrs, mask=(k0 + rk)[None, :] < K, other=0.0)
            b = _operand(w_ptrs, (k0 // 8 + rg)[None, :] < K // 8, FP8, BN, BK, EVEN_K)
            if SWAP:
                acc = tl.dot(b, tl.trans(a), acc)
            else:
                acc = tl.dot(a, tl.trans(b), acc)
            x_ptrs += BK
            w_ptrs += BK // 8
        return acc

    @triton.jit(do_not_specialize=["M"])
    def w4a16_gemm_kernel(x_ptr, sumx_ptr, w_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, M, N, K,
                          stride_xm, stride_wn, stride_ym, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                          SWAP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                          GROUP_M: tl.constexpr):
        """y = s (16 x @ (1 + q/16)^T - (16 + z) sum(x)) (+ bias); x bf16 [M, K], codes int32 [N, K // 8]."""
        pid_m, pid_n = _swizzle(M, N, BM, BN, GROUP_M)
        rm = (pid_m * BM + tl.arange(0, BM)) % M
        rn = (pid_n * BN + tl.arange(0, BN)) % N
        acc = _w4_main_loop(x_ptr, w_ptr, rm, rn, K, stride_xm, stride_wn, False, SWAP, EVEN_K, BM, BN, BK)
        if SWAP:
            acc = tl.trans(acc)
        s = tl.load(scale_ptr + rn)
        zo = tl.load(zero_ptr + rn) + 16.0
        sumx = tl.load(sumx_ptr + rm)
        out = (acc * 16.0 - sumx[:, None] * zo[None, :]) * s[None, :]
        _store(y_ptr, out, pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN), M, N, stride_ym,
               bias_ptr, HAS_BIAS)

    @triton.jit(do_not_specialize=["M"])
    def w4a8_gemm_kernel(xq_ptr, sx_ptr, sumx_ptr, w_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, M, N, K,
                         stride_xm, stride_wn, stride_ym, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                         SWAP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         GROUP_M: tl.constexpr):
        """y = s_x s (512 xq @ (q 2^-9)^T - z sum(xq)) (+ bias); xq e4m3 [M, K], sum(xq) float32 [M]."""
        pid_m, pid_n = _swizzle(M, N, BM, BN, GROUP_M)
        rm = (pid_m * BM + tl.arange(0, BM)) % M
        rn = (pid_n * BN + tl.arange(0, BN)) % N
        acc = _w4_main_loop(xq_ptr, w_ptr, rm, rn, K, stride_xm, stride_wn, True, SWAP, EVEN_K, BM, BN, BK)
        if SWAP:
            acc = tl.trans(acc)
        s = tl.load(scale_ptr + rn)
        z = tl.load(zero_ptr + rn)
        sx = tl.load(sx_ptr + rm)
        sumx = tl.load(sumx_ptr + rm)
        out = (acc * 512.0 - sumx[:, None] * z[None, :]) * (sx[:, None] * s[None, :])
        _store(y_ptr, out, pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN), M, N, stride_ym,
               bias_ptr, HAS_BIAS)


# ---- configurations and launchers -----------------------------------------------------------------------

KERNELS = ("bf16", "w4a16", "fp8", "w4a8")


class Config(tuple):
    """(BM, BN, BK, num_warps, num_stages, SWAP): BM tokens x BN output channels per program."""

    def __new__(cls, bm, bn, bk, warps, stages, swap=0):
        return super().__new__(cls, (bm, bn, bk, warps, stages, swap))

    bm = property(lambda self: self[0])
    bn = property(lambda self: self[1])
    bk = property(lambda self: self[2])
    warps = property(lambda self: self[3])
    stages = property(lambda self: self[4])
    swap = property(lambda self: self[5])

    def label(self) -> str:
        return f"bm{self.bm} bn{self.bn} bk{self.bk} w{self.warps} s{self.stages}" + (" swap" if self.swap else "")


def smem_bytes(kernel: str, cfg: Config) -> int:
    """Shared memory the software pipeline needs: (stages - 1) buffered steps plus the one computed on
    (Triton allocates `stages` buffers), x tile + weight tile per step; a decoded B (SWAP=0) adds one
    decoded tile. The epilogue reuses the buffers."""
    xb = 2 if kernel in ("bf16", "w4a16") else 1
    wb = {"bf16": 2.0, "fp8": 1.0, "w4a16": 0.5, "w4a8": 0.5}[kernel]
    per_stage = cfg.bm * cfg.bk * xb + cfg.bn * cfg.bk * wb
    extra = cfg.bn * cfg.bk * xb if kernel in ("w4a16", "w4a8") and not cfg.swap else 0
    return int(cfg.stages * per_stage + extra)


def fits(kernel: str, cfg: Config) -> bool:
    """Shared memory within the block limit, and a float32 accumulator of at most 128 registers per
    thread (beyond that the compiler spills)."""
    acc_regs = cfg.bm * cfg.bn // (32 * cfg.warps)
    return smem_bytes(kernel, cfg) <= SMEM_LIMIT - 8 * 1024 and acc_regs <= 128


#: 590 tokens: a modest slice of BM 64/128 x BN 128/256 x BK 64/128 x 4/8 warps x 3/4/5 stages, the
#: points Hopper GEMMs use (8 warps for the 128 x 256 tile: 4 would hold 256 accumulators per thread)
LARGE_M = ((128, 128, 64, 4, 4), (128, 128, 64, 8, 4), (128, 128, 64, 8, 5), (128, 128, 128, 8, 3),
           (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 256, 128, 8, 3),
           (64, 256, 64, 4, 4), (64, 256, 64, 8, 4), (64, 256, 128, 4, 3),
           (64, 128, 64, 4, 4), (64, 128, 128, 4, 4))
#: 1-16 tokens: a 16-token tile (mma.sync when it is wgmma's M, i.e. not swapped; wgmma N = 16 when
#: swapped), BN 64/128 (few programs either way: no split-K in this probe)
SMALL_M = ((16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 128, 256, 4, 3), (64, 128, 128, 4, 4))


def candidates(kernel: str, m: int, swap: int = 0) -> list[Config]:
    """Configurations tried for `kernel` at m tokens, pruned to those that fit (fits())."""
    out = [Config(*c, swap) for c in (SMALL_M if m <= 16 else LARGE_M)]
    return [c for c in out if fits(kernel, c)]


def _even_k(k: int, bk: int) -> bool:
    return k % bk == 0


def _grid(m: int, n: int, cfg: Config) -> tuple[int]:
    return (triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn),)


GROUP_M = 8


def _launch(kernel, args, m, n, k, cfg: Config, warmup: bool, **constexprs):
    """kernel[grid](*args, ...) for cfg; warmup=True compiles only and returns the compiled kernel."""
    options = dict(EVEN_K=_even_k(k, cfg.bk), BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=GROUP_M,
                   num_warps=cfg.warps, num_stages=cfg.stages, **constexprs)
    if warmup:
        return kernel.warmup(*args, grid=(1,), **options)
    kernel[_grid(m, n, cfg)](*args, **options)
    return None


def _output(m, n, device, out, out_dtype):
    return torch.empty(m, n, dtype=out_dtype, device=device) if out is None else out


# The launchers: y [M, N] (into `out` when given). warmup=True compiles without launching and returns
# the compiled kernel (under triton.AsyncCompileMode: a future), which is how the probe compiles every
# candidate in parallel before timing.

def bf16_gemm(x, w, bias, cfg: Config, out=None, out_dtype=torch.bfloat16, warmup=False):
    _patch_interpreter()
    (m, k), n = x.shape, w.shape[0]
    y = _output(m, n, x.device, out, out_dtype)
    args = (x, w, y if bias is None else bias, y, m, n, k, x.stride(0), w.stride(0), y.stride(0))
    compiled = _launch(bf16_gemm_kernel, args, m, n, k, cfg, warmup, HAS_BIAS=bias is not None)
    return compiled if warmup else y


def fp8_gemm(xq, sx, wq, sw, bias, cfg: Config, out=None, out_dtype=torch.bfloat16, warmup=False):
    """xq, sx: per-token e4m3 activations and scales; wq, sw: per-channel e4m3 weights and scales."""
    _patch_interpreter()
    (m, k), n = xq.shape, wq.shape[0]
    y = _output(m, n, xq.device, out, out_dtype)
    args = (xq, sx, wq, sw, y if bias is None else bias, y, m, n, k, xq.stride(0), wq.stride(0), y.stride(0))
    compiled = _launch(fp8_gemm_kernel, args, m, n, k, cfg, warmup, HAS_BIAS=bias is not None)
    return compiled if warmup else y


def _check_packed(packed, k):
    if k % 32 or packed.shape[1] != k // 8:
        raise ValueError(f"packed codes must be [N, K // 8] with K % 32 == 0 (K = {k}), got {tuple(packed.shape)}")


def w4a16_gemm(x, sumx, packed, scale, zero, bias, cfg: Config, out=None, out_dtype=torch.bfloat16, warmup=False):
    """x bf16 [M, K]; sumx = row_sum(x); packed = pack_int4(codes, "a16"); scale, zero float32 [N]."""
    _patch_interpreter()
    m, k = x.shape
    _check_packed(packed, k)
    n = packed.shape[0]
    y = _output(m, n, x.device, out, out_dtype)
    args = (x, sumx, packed, scale, zero, y if bias is None else bias, y, m, n, k, x.stride(0), packed.stride(0),
            y.stride(0))
    compiled = _launch(w4a16_gemm_kernel, args, m, n, k, cfg, warmup, HAS_BIAS=bias is not None, SWAP=cfg.swap)
    return compiled if warmup else y


def w4a8_gemm(xq, sx, sumxq, packed, scale, zero, bias, cfg: Config, out=None, out_dtype=torch.bfloat16,
              warmup=False):
    """xq, sx, sumxq = triton_fp8.quantize_activations_fp8(x); packed = pack_int4(codes, "a8")."""
    _patch_interpreter()
    m, k = xq.shape
    _check_packed(packed, k)
    n = packed.shape[0]
    y = _output(m, n, xq.device, out, out_dtype)
    args = (xq, sx, sumxq, packed, scale, zero, y if bias is None else bias, y, m, n, k, xq.stride(0),
            packed.stride(0), y.stride(0))
    compiled = _launch(w4a8_gemm_kernel, args, m, n, k, cfg, warmup, HAS_BIAS=bias is not None, SWAP=cfg.swap)
    return compiled if warmup else y


def row_sum(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 sum over features of x [M, K] (one Triton program per token)."""
    _patch_interpreter()
    m, k = x.shape
    out = torch.empty(m, dtype=torch.float32, device=x.device) if out is None else out
    row_sum_kernel[(m,)](x, out, k, x.stride(0), BLOCK=min(2048, max(128, triton.next_power_of_2(k))), num_warps=4)
    return out


def decode_operand(packed: torch.Tensor, fp8: bool, bn: int = 16, bk: int = 64) -> torch.Tensor:
    """The operand bits the GEMM loops build: int16 (bf16 patterns) or int8 (e4m3 patterns) [N, K]."""
    _patch_interpreter()
    n, kw = packed.shape
    out = torch.empty(n, kw * 8, dtype=torch.int8 if fp8 else torch.int16, device=packed.device)
    decode_kernel[(triton.cdiv(n, bn), triton.cdiv(kw * 8, bk))](packed, out, n, kw, FP8=fp8, BN=bn, BK=bk)
    return out


def expected_operand(codes: torch.Tensor, fp8: bool) -> torch.Tensor:
    """What decode_operand must produce, bit for bit: 0x3F80 | (q << 3), or the byte q."""
    c = codes.to(torch.int16)
    return c.to(torch.int8) if fp8 else ((c << BF16_SHIFT) | BF16_ONE)


# ---- offline compile (no GPU): what Hopper makes of a configuration ----------------------------------------

_SIGNATURES = {
    "bf16": (bf16_gemm_kernel if _HAVE_TRITON else None,
             dict(x_ptr="*bf16", w_ptr="*bf16", bias_ptr="*fp32", y_ptr="*bf16")),
    "fp8": (fp8_gemm_kernel if _HAVE_TRITON else None,
            dict(xq_ptr="*fp8e4nv", sx_ptr="*fp32", w_ptr="*fp8e4nv", sw_ptr="*fp32", bias_ptr="*fp32",
                 y_ptr="*bf16")),
    "w4a16": (w4a16_gemm_kernel if _HAVE_TRITON else None,
              dict(x_ptr="*bf16", sumx_ptr="*fp32", w_ptr="*i32", scale_ptr="*fp32", zero_ptr="*fp32",
                   bias_ptr="*fp32", y_ptr="*bf16")),
    "w4a8": (w4a8_gemm_kernel if _HAVE_TRITON else None,
             dict(xq_ptr="*fp8e4nv", sx_ptr="*fp32", sumx_ptr="*fp32", w_ptr="*i32", scale_ptr="*fp32",
                  zero_ptr="*fp32", bias_ptr="*fp32", y_ptr="*bf16")),
}


def compile_offline(kernel: str, cfg: Config, arch: int = 90) -> dict:
    """Compile one kernel/configuration for sm_{arch} without a GPU (Triton ships ptxas and cuobjdump),
    for N, K and the row strides multiples of 16 as in the OFT-7B shapes. Returns registers,
    spill_bytes, shared_bytes, seconds, wgmma / fp8_wgmma (HGMMA / QGMMA in the SASS), loops
    (offline_compile.sass_loops), the TTGIR layout conversions and shared-memory round trips in the
    main loop, and ttgir."""
    import re
    import time

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .offline_compile import resources_and_sass, sass_loops

    fn, pointers = _SIGNATURES[kernel]
    signature = dict(pointers)
    ints = ("M", "N", "K", "stride_xm", "stride_wn", "stride_ym")
    signature.update({name: "i32" for name in ints})
    constants = dict(HAS_BIAS=True, EVEN_K=True, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=GROUP_M)
    if kernel in ("w4a16", "w4a8"):
        constants["SWAP"] = cfg.swap
    signature.update({name: "constexpr" for name in constants})
    names = fn.arg_names
    attrs = {(names.index(name),): [["tt.divisibility", 16]]
             for name in list(pointers) + ["N", "K", "stride_xm", "stride_wn", "stride_ym"]}
    t = time.time()
    compiled = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=cfg.warps, num_stages=cfg.stages))
    seconds = time.time() - t
    registers, shared, local, sass = resources_and_sass(compiled)
    ttgir = compiled.asm["ttgir"]
    loop = ttgir[ttgir.find("scf.for"):]
    loop = loop[:loop.find("scf.yield")]
    return {"registers": registers, "spill_bytes": local, "shared_bytes": compiled.metadata.shared,
            "seconds": round(seconds, 2), "wgmma": len(re.findall(r"\s[HQ]GMMA", sass)),
            "fp8_wgmma": len(re.findall(r"\sQGMMA", sass)), "loops": sass_loops(sass),
            "loop_convert_layout": loop.count("ttg.convert_layout"), "loop_local_alloc": loop.count("ttg.local_alloc"),
            "loop_local_load": loop.count("ttg.local_load"), "ttgir": ttgir}
