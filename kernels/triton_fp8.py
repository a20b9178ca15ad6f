"""fp8 (e4m3) activations on fp8 tensor cores for mixed-bit layers (issue #17 item 4).

    prepared = prepare_fp8(mixed_bit_linear_or_packed_weight)   # once per layer (load time)
    y = fp8_mixed_linear(x, prepared)                              # every forward

Two launches per layer on a CUDA device (Triton; Hopper lowers the fp8 tl.dot to wgmma):

1. `fp8_act_quant_kernel`: per token m, s_x[m] = max(max|x[m, :]| / 448, 1e-12),
   xq[m, k] = e4m3(clamp(x[m, k] / s_x[m], -448, 448)) (round to nearest even, the cast torch's
   `.to(torch.float8_e4m3fn)` makes) and sumx[m] = sum_k xq[m, k] (float32).
2. `fp8_mixed_gemm_kernel`: one launch over every group of the layer (tiles of 16-, 8-, 4-, 3-,
   2-bit rows, then the pruned channels), each program a BM x BN output tile of one width.

Weights stay in the CONTRACT layout of qvla_ros/quant/packing.py (no repacking, no extra bytes:
element k of a row at byte k // (8/b), bit (k % (8/b)) * b, low bits first). A program loads a
[BN, BK*b/8] byte tile and spreads it with tl.interleave (low nibble = even k, high nibble = odd
k; twice for 2-bit fields, three times for the 3-bit rows' high-bit plane), which yields codes
uint8 [BN, BK] for BK consecutive features with no data movement between threads.

Decoding codes to fp8 costs nothing: a byte q in 0..15 read AS an e4m3 bit pattern is exactly
q * 2^-9 (0x00-0x07 are the subnormals m * 2^-9, 0x08-0x0F the first binade (8 + m) * 2^-9), so the
codes are bitcast to float8e4nv and 512 = 2^9 goes into the epilogue (DECODE="bitcast"). The
alternative DECODE="cvt" converts q -> float16 -> e4m3 (exact too, integers <= 16 are e4m3 values)
at the cost of conversion instructions; it is there in case a tensor core flushes fp8 subnormals
(the tuner checks every configuration against the reference before timing it).

Per slot, with the project's dequantization w[n, k] = s_w[n] * (q[n, k] - z[n]):

* 4/3/2-bit rows: acc = sum_k xq[m, k] * q[n, k] on fp8 tensor cores (float32 accumulator), then
  y = s_x[m] * s_w[n] * (acc - z[n] * sumx[m]) + bias[n]. Exact weights, fp8 activations.
* 8-bit rows (codes up to 255 are not e4m3 values): q = 16 * q_hi + q_lo with both nibbles exact in
  e4m3, so the program runs two passes over K into one accumulator (the high nibbles, times 16,
  then the low nibbles): twice the tensor-core work for these rows, exact 8-bit weights, no extra
  memory, the same epilogue.
* 16-bit rows: bf16 x (the unquantized input) times the bf16 weights on bf16 tensor cores:
  these rows (the allocator's most sensitive) see no activation quantization at all.
* pruned channels: y = bias (or 0).

Accuracy consequence: the only approximation against the float product of the stored weights is
the activations' e4m3 rounding (3 mantissa bits: relative error up to 2^-4 per element, ~2-3% of
a layer output's norm, against ~0.5% for per-token int8), plus the fp8 tensor cores' reduced-
precision accumulation on sm_90 (Triton's default lets the tensor core accumulate all of K;
`promote=n` adds the partial sums into float32 registers every n features, as DeepSeek-V3 does).
The 8- and 16-bit rows keep their full weight precision.

On CPU tensors (without the interpreter) fp8_mixed_linear runs the same arithmetic in plain torch
(`fp8_mixed_linear_reference`); TRITON_INTERPRET=1 runs the Triton kernels on the CPU (the tests).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import torch

#: slots of the kernel in packed order (0 = pruned channels, last)
SLOTS = (16, 8, 4, 3, 2, 0)
#: e4m3's largest finite value
E4M3_MAX = 448.0
#: a byte q <= 15 read as e4m3 is q * 2^-9
_BITCAST_UNIT = 512.0
_PARTS = ("w16", "q8", "q4", "q3", "q3h", "q2")

try:  # the module imports (and its torch paths run) without Triton
    import triton
    import triton.language as tl
    _HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = tl = None
    _HAVE_TRITON = False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---- the prepared layer ----------------------------------------------------------------------------

@dataclass
class Fp8Weights:
    """One mixed-bit layer as the fp8 kernel reads it.

    out_features, in_features: N and K. kp: K padded to a multiple of 8 (the contract's rows).
    w16 bf16 [R16, K]; q8 uint8 [R8, Kp]; q4 uint8 [R4, Kp/2]; q3 uint8 [R3, Kp/4] (low two bits)
    and q3h uint8 [R3, Kp/8] (high bit); q2 uint8 [R2, Kp/4]: the contract buffers as they are (a
    [1, 1] placeholder where a width is absent). scale, zero float32 [N_kept] over the kept rows in
    packed order (16, 8, 4, 3, 2); out_index int32 [N]: the output channel of every packed row,
    then the pruned channels. rows: rows per slot of SLOTS (host ints). bias: float32 [N] or None.
    """
    out_features: int
    in_features: int
    kp: int
    w16: torch.Tensor
    q8: torch.Tensor
    q4: torch.Tensor
    q3: torch.Tensor
    q3h: torch.Tensor
    q2: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    out_index: torch.Tensor
    rows: tuple[int, ...]
    bias: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.scale.device

    @property
    def kept_rows(self) -> int:
        return sum(self.rows[:5])

    def slot_start(self, bits: int) -> int:
        """First packed row of the `bits`-wide group."""
        i = SLOTS.index(bits)
        return sum(self.rows[:i])

    def to(self, device) -> "Fp8Weights":
        moved = {name: getattr(self, name).to(device) for name in _PARTS + ("scale", "zero", "out_index")}
        bias = None if self.bias is None else self.bias.to(device)
        return replace(self, bias=bias, **moved)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The buffers the kernel reads (placeholders of absent widths left out), bias excluded."""
        present = dict(zip(_PARTS, (self.rows[0], self.rows[1], self.rows[2], self.rows[3], self.rows[3],
                                    self.rows[4])))
        out = {p: getattr(self, p) for p in _PARTS if present[p]}
        out.update(scale=self.scale, zero=self.zero, out_index=self.out_index)
        return out

    def nbytes(self) -> int:
        """Bytes of the weight buffers (codes, dense rows, scales, zero-points, channel index)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def _placeholder(dtype, device) -> torch.Tensor:
    return torch.zeros(1, 1, dtype=dtype, device=device)


def prepare_fp8(layer, bias: torch.Tensor | None = None, device=None) -> Fp8Weights:
    """The fp8 kernel's view of a layer: a qvla_ros.quant MixedBitLinear (its bias is taken unless
    `bias` is given) or a PackedWeight (anything with out_features, in_features, row_index and
    groups of PackedGroup attributes). The contract buffers are copied to `device` (default: where
    the layer's data lives) unchanged; scales and zero-points become float32."""
    if hasattr(layer, "packed_weight") and callable(layer.packed_weight):  # MixedBitLinear
        if bias is None and getattr(layer, "bias", None) is not None:
            bias = layer.bias
        layer = layer.packed_weight()
    n, k = int(layer.out_features), int(layer.in_features)
    if n <= 0 or k <= 0:
        raise ValueError(f"layer shape must be positive, got out_features={n}, in_features={k}")
    kp = -(-k // 8) * 8
    row_index = layer.row_index.detach().flatten().to(torch.int64)
    device = torch.device(device) if device is not None else row_index.device
    if device.type == "meta":
        raise ValueError("the layer's buffers live on the meta device; move the module first")
    by_bits = {int(g.bits): g for g in layer.groups}
    if len(by_bits) != len(layer.groups):
        raise ValueError("a layer holds one group per width")
    order = [int(g.bits) for g in layer.groups]
    if order != sorted(order, key=SLOTS.index):
        raise ValueError(f"groups come in order {order}; the packed layout stores them as 16, 8, 4, 3, 2")
    parts = {"w16": _placeholder(torch.bfloat16, device)}
    parts.update({p: _placeholder(torch.uint8, device) for p in _PARTS[1:]})
    rows, scales, zeros, start = [], [], [], 0
    for bits in SLOTS[:5]:
        g = by_bits.get(bits)
        r = 0 if g is None else int(g.rows)
        rows.append(r)
        if g is None:
            continue
        if int(g.start) != start:
            raise ValueError(f"{bits}-bit group starts at packed row {g.start}, expected {start}")
        start += r
        if bits == 16:
            if g.weight is None or tuple(g.weight.shape) != (r, k):
                raise ValueError(f"16-bit group: weight must be [{r}, {k}]")
            parts["w16"] = g.weight.detach().to(device=device, dtype=torch.bfloat16).contiguous()
            scales.append(torch.ones(r, dtype=torch.float32, device=device))
            zeros.append(torch.zeros(r, dtype=torch.float32, device=device))
            continue
        expect = (r, kp // 4) if bits == 3 else (r, kp * bits // 8)
        if g.qweight is None or g.qweight.dtype != torch.uint8 or tuple(g.qweight.shape) != expect:
            raise ValueError(f"{bits}-bit group: qweight must be uint8 {expect}")
        parts[f"q{bits}"] = g.qweight.detach().to(device).contiguous()
        if bits == 3:
            if g.qweight_hi is None or tuple(g.qweight_hi.shape) != (r, kp // 8):
                raise ValueError(f"3-bit group: qweight_hi must be uint8 [{r}, {kp // 8}]")
            parts["q3h"] = g.qweight_hi.detach().to(device).contiguous()
        for name in ("scale", "zero"):
            t = getattr(g, name)
            if t is None or t.numel() != r:
                raise ValueError(f"{bits}-bit group: {name} must hold one value per row ({r})")
        scales.append(g.scale.detach().to(device=device, dtype=torch.float32).flatten())
        zeros.append(g.zero.detach().to(device=device, dtype=torch.float32).flatten())
    kept = sum(rows)
    if row_index.numel() != kept:
        raise ValueError(f"row_index has {row_index.numel()} entries for {kept} kept rows")
    mask = torch.ones(n, dtype=torch.bool)
    mask[row_index.cpu()] = False
    if kept and row_index.cpu().unique().numel() != kept:
        raise ValueError("row_index names an output channel twice")
    pruned = torch.nonzero(mask).flatten()
    rows.append(int(pruned.numel()))
    out_index = torch.cat([row_index.cpu(), pruned]).to(torch.int32).to(device)
    f32 = dict(dtype=torch.float32, device=device)
    scale = torch.cat(scales) if scales else torch.ones(1, **f32)
    zero = torch.cat(zeros) if zeros else torch.zeros(1, **f32)
    if bias is not None:
        bias = bias.detach().to(**f32).flatten().contiguous()
        if bias.numel() != n:
            raise ValueError(f"bias has {bias.numel()} entries for {n} output channels")
    return Fp8Weights(n, k, kp, out_index=out_index.contiguous(), scale=scale.contiguous(), zero=zero.contiguous(),
                      rows=tuple(rows), bias=bias, **parts)


def random_fp8_layer(out_features: int, in_features: int, counts: Mapping[int, int], device,
                     seed: int = 0, bias: bool = True):
    """layer(x) = fp8_mixed_linear(x, random weights of these widths): a timing stand-in for a
    quantized Linear of this shape (bench/serve/serve.py's A8 fp8 variant)."""
    prepared = random_fp8_weights(out_features, in_features, counts, device, seed=seed, bias=bias)
    return lambda x: fp8_mixed_linear(x, prepared)


def random_fp8_weights(out_features: int, in_features: int, counts: Mapping[int, int], device,
                       seed: int = 0, bias: bool = True) -> Fp8Weights:
    """A layer with random contract bytes drawn on `device` (for timing layers of Llama-2-7B's size
    without packing on the CPU): every byte pattern is a valid code, integer zero-points at
    mid-range, small scales, channels assigned to widths at random."""
    n, k = int(out_features), int(in_features)
    kp = -(-k // 8) * 8
    gen = torch.Generator(device=device).manual_seed(seed)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if sum(int(counts.get(b, 0)) for b in SLOTS) != n:
        raise ValueError(f"counts {dict(counts)} do not add up to out_features={n}")

    def randbytes(r, c):
        return torch.randint(0, 256, (r, c), generator=gen, device=device, dtype=torch.int32).to(torch.uint8)

    parts = {"w16": _placeholder(torch.bfloat16, device)}
    parts.update({p: _placeholder(torch.uint8, device) for p in _PARTS[1:]})
    rows, scales, zeros = [], [], []
    for bits in SLOTS[:5]:
        r = int(counts.get(bits, 0))
        rows.append(r)
        if not r:
            continue
        if bits == 16:
            parts["w16"] = (torch.randn(r, k, generator=gen, device=device) * 0.02).to(torch.bfloat16)
            scales.append(torch.ones(r, device=device))
            zeros.append(torch.zeros(r, device=device))
            continue
        parts[f"q{bits}"] = randbytes(r, kp // 4 if bits == 3 else kp * bits // 8)
        if bits == 3:
            parts["q3h"] = randbytes(r, kp // 8)
        scales.append(torch.full((r,), 0.04 / 2 ** bits, device=device))
        zeros.append(torch.full((r,), float(2 ** (bits - 1)), device=device))
    rows.append(int(counts.get(0, 0)))
    out_index = perm.to(torch.int32).to(device)  # kept rows in packed order take perm[:kept]
    b = (torch.randn(n, generator=gen, device=device) * 0.1) if bias else None
    return Fp8Weights(n, k, kp, out_index=out_index, rows=tuple(rows), bias=b,
                      scale=torch.cat(scales).float() if scales else torch.ones(1, device=device),
                      zero=torch.cat(zeros).float() if zeros else torch.zeros(1, device=device), **parts)


# ---- plain-torch model (the CPU path and the tests' oracle of the arithmetic) -------------------------

def _fields(packed: torch.Tensor, width: int) -> torch.Tensor:
    per = 8 // width
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * width
    return ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << width) - 1)).reshape(packed.shape[0], -1)


def group_codes(p: Fp8Weights, bits: int) -> torch.Tensor:
    """Codes int32 [R, K] of the `bits`-wide group, read from the contract bytes."""
    if bits == 3:
        codes = _fields(p.q3, 2) | (_fields(p.q3h, 1) << 2)
    else:
        codes = _fields(getattr(p, f"q{bits}"), bits)
    return codes[:, :p.in_features]


def dequantize_fp8_weights(p: Fp8Weights, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [N, K] in original channel order (pruned rows zero): (q - zero) * scale, float32 math."""
    w = torch.zeros(p.out_features, p.in_features, dtype=dtype, device=p.device)
    for bits in SLOTS[:5]:
        r = p.rows[SLOTS.index(bits)]
        if not r:
            continue
        lo = p.slot_start(bits)
        if bits == 16:
            part = p.w16.to(dtype)
        else:
            codes = group_codes(p, bits).to(torch.float32)
            part = ((codes - p.zero[lo:lo + r, None]) * p.scale[lo:lo + r, None]).to(dtype)
        w[p.out_index[lo:lo + r].long()] = part
    return w


def quantize_activations_fp8_reference(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token e4m3 activations: (xq float8_e4m3fn [M, K], s_x float32 [M], sum of xq float32 [M]).

    s_x = max(max|x| / 448, 1e-12); xq = e4m3(clamp(x / s_x, -448, 448)), round to nearest even."""
    xf = x2d.to(torch.float32)
    amax = xf.abs().amax(dim=-1)
    # divided by a tensor, not the Python number: torch's CUDA division by a scalar multiplies by
    # its reciprocal, one float32 step off the correctly rounded quotient the kernel computes
    scale = (amax / torch.full_like(amax, E4M3_MAX)).clamp(min=1e-12)
    xq = torch.clamp(xf / scale[:, None], -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return xq, scale, xq.to(torch.float32).sum(dim=-1)


def fake_quantize_activations_fp8(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] through per-token e4m3 and back (float32): what the fp8 tensor cores see."""
    lead = x.shape[:-1]
    xq, scale, _ = quantize_activations_fp8_reference(x.reshape(-1, x.shape[-1]))
    return (xq.to(torch.float32) * scale[:, None]).reshape(*lead, x.shape[-1])


def fp8_mixed_linear_reference(x: torch.Tensor, p: Fp8Weights, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """y [..., N] in `dtype`: rows of <= 8 bits see per-token e4m3 x, 16-bit rows the input as it is
    (the kernel's arithmetic, computed as a float product of fake-quantized x and dequantized W)."""
    if x.shape[-1] != p.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {p.in_features}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, p.in_features)
    xf = fake_quantize_activations_fp8(x2).to(dtype)
    x16 = x2.to(dtype)
    w = dequantize_fp8_weights(p, dtype)
    dense = torch.zeros(p.out_features, dtype=torch.bool, device=w.device)
    if p.rows[0]:
        dense[p.out_index[:p.rows[0]].long()] = True
    y = xf @ torch.where(dense[:, None], 0, w).T + x16 @ torch.where(dense[:, None], w, 0).T
    if p.bias is not None:
        y = y + p.bias.to(dtype)
    return y.reshape(*lead, p.out_features)


# ---- Triton -------------------------------------------------------------------------------------------

def patch_interpreter_fp8() -> None:
    """Triton 3.6's interpreter converts to fp8 by truncating the mantissa (and mishandles carries);
    the GPU rounds to nearest even. Under TRITON_INTERPRET=1 conversions to float8e4nv go through
    torch's cast instead (the project's other interpreter work-arounds: _interpreter_compat.py)."""
    import numpy as np
    import triton.runtime.interpreter as interp

    if getattr(interp.InterpreterBuilder, "_qvla_fp8_patch", False):
        return
    from ._interpreter_compat import patch_interpreter
    patch_interpreter()
    original = interp.InterpreterBuilder.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        dst = dst_type.scalar
        if dst == tl.float8e4nv and src.dtype.scalar in (tl.float32, tl.float16, tl.bfloat16):
            data = src.data
            if src.dtype.scalar == tl.bfloat16:
                data = (data.astype(np.uint32) << 16).view(np.float32)
            t = torch.from_numpy(np.ascontiguousarray(data).astype(np.float32))
            out = t.to(torch.float8_e4m3fn).view(torch.uint8).numpy().reshape(src.data.shape)
            return interp.TensorHandle(out, dst)
        return original(self, src, dst_type, rounding_mode)

    interp.InterpreterBuilder.create_fp_to_fp = create_fp_to_fp
    interp.InterpreterBuilder._qvla_fp8_patch = True


if _HAVE_TRITON:
    @triton.jit
    def _round_to_e4m3(r):
        """float32 r (|r| <= 448) -> the nearest e4m3 value, ties to even, still float32.

        Triton 3.6's float32 -> e4m3 conversion on sm_90 is not torch's single round to nearest
        even: it put 0.08% of the codes of a 590 x 4096 activation one step off (H200). A value
        already on the e4m3 grid converts exactly by any path, so the kernel rounds first:
        adding and removing 1.5 * 2^(e+20) leaves r rounded to a multiple of e4m3's step 2^(e-3)
        at r's exponent e (float32 arithmetic rounds ties to even); below 2^-6 the step stays
        2^-9, e4m3's subnormals."""
        bits = r.to(tl.int32, bitcast=True)
        e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
        magic = (((e + 147) << 23) | (1 << 22)).to(tl.float32, bitcast=True)
        q = (r + magic) - magic
        return tl.where(q == 0.0, r * 0.0, q)  # keeps the sign of values that round to zero

    @triton.jit
    def fp8_act_quant_kernel(x_ptr, xq_ptr, sx_ptr, sum_ptr, K, stride_xm, stride_qm, BLOCK: tl.constexpr):
        """Row m of x -> e4m3 values xq, scale s_x = max(max|x| / 448, 1e-12), sum of xq."""
        m = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        row = x_ptr + m * stride_xm
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            v = tl.load(row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), 448.0), 1e-12)
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            kmask = k0 + offs < K
            v = tl.load(row + k0 + offs, mask=kmask, other=0.0).to(tl.float32)
            r = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -448.0), 448.0)
            q = _round_to_e4m3(r).to(tl.float8e4nv)
            tl.store(xq_ptr + m * stride_qm + k0 + offs, q, mask=kmask)
            total += q.to(tl.float32)
        tl.store(sx_ptr + m, scale)
        tl.store(sum_ptr + m, tl.sum(total, axis=0))

    @triton.jit
    def _spread2(b):
        """Bytes [R, C] of four 2-bit fields (field i = feature 4c + i) -> codes [R, 4C]."""
        return tl.interleave(tl.interleave(b & 3, (b >> 4) & 3), tl.interleave((b >> 2) & 3, b >> 6))

    @triton.jit
    def _spread1(h):
        """Bytes [R, C] of eight 1-bit fields (bit i = feature 8c + i) -> bits [R, 8C]."""
        even = tl.interleave(tl.interleave(h & 1, (h >> 4) & 1), tl.interleave((h >> 2) & 1, (h >> 6) & 1))
        odd = tl.interleave(tl.interleave((h >> 1) & 1, (h >> 5) & 1), tl.interleave((h >> 3) & 1, h >> 7))
        return tl.interleave(even, odd)

    @triton.jit
    def _codes(q_ptr, qh_ptr, ld, ldh, k0, prow, n_mask, BITS: tl.constexpr, SHIFT: tl.constexpr,
               BK: tl.constexpr, EVEN_K: tl.constexpr):
        """uint8 codes [BN, BK] of features k0 .. k0+BK-1 of rows prow (contract layout; ld, ldh:
        bytes per row). 8-bit rows give one nibble: (byte >> SHIFT) & 15."""
        if BITS == 8:
            c = k0 + tl.arange(0, BK)
        elif BITS == 4:
            c = k0 // 2 + tl.arange(0, BK // 2)
        else:
            c = k0 // 4 + tl.arange(0, BK // 4)
        if EVEN_K:
            mask = n_mask[:, None]
        else:
            mask = n_mask[:, None] & (c < ld)[None, :]
        b = tl.load(q_ptr + prow[:, None] * ld + c[None, :], mask=mask, other=0)
        if BITS == 8:
            q = (b >> SHIFT) & 15
        elif BITS == 4:
            q = tl.interleave(b & 15, b >> 4)
        elif BITS == 2:
            q = _spread2(b)
        else:
            ch = k0 // 8 + tl.arange(0, BK // 8)
            if EVEN_K:
                hmask = n_mask[:, None]
            else:
                hmask = n_mask[:, None] & (ch < ldh)[None, :]
            h = tl.load(qh_ptr + prow[:, None] * ldh + ch[None, :], mask=hmask, other=0)
            q = _spread2(b) | (_spread1(h) << 2)
        return q

    @triton.jit
    def _quant_loop(acc, xq_ptr, stride_qm, offs_m, m_mask, K, q_ptr, qh_ptr, ld, ldh, prow, n_mask,
                    BITS: tl.constexpr, SHIFT: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
                    DECODE: tl.constexpr, PROMOTE: tl.constexpr):
        """acc += xq[offs_m, :] @ codes[prow, :]^T over all of K (codes as fp8: q * 2^-9 when
        DECODE == 0, q when DECODE == 1)."""
        offs_k = tl.arange(0, BK)
        for k0 in range(0, K, BK):
            k = k0 + offs_k
            if EVEN_K:
                xmask = m_mask[:, None]
            else:
                xmask = m_mask[:, None] & (k < K)[None, :]
            a = tl.load(xq_ptr + offs_m[:, None] * stride_qm + k[None, :], mask=xmask, other=0.0)
            q = _codes(q_ptr, qh_ptr, ld, ldh, k0, prow, n_mask, BITS, SHIFT, BK, EVEN_K)
            if DECODE == 0:
                w = q.to(tl.float8e4nv, bitcast=True)
            else:
                w = q.to(tl.float16).to(tl.float8e4nv)
            if PROMOTE > 0:
                acc = tl.dot(a, tl.trans(w), acc, max_num_imprecise_acc=PROMOTE)
            else:
                acc = tl.dot(a, tl.trans(w), acc)
        return acc

    @triton.jit
    def _quant_slot(xq_ptr, stride_qm, offs_m, m_mask, K, q_ptr, qh_ptr, ld, ldh, prow, n_mask, gp,
                    sx_ptr, sum_ptr, scale_ptr, zero_ptr, BITS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr, EVEN_K: tl.constexpr, DECODE: tl.constexpr, PROMOTE: tl.constexpr):
        """s_x * s_w * (x_codes . w_codes - z * sum(x_codes)) for a BM x BN tile of one width."""
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        if BITS == 8:  # q = 16 q_hi + q_lo, both nibbles exact in e4m3: two passes, one accumulator
            acc = _quant_loop(acc, xq_ptr, stride_qm, offs_m, m_mask, K, q_ptr, qh_ptr, ld, ldh, prow, n_mask,
                              8, 4, BK, EVEN_K, DECODE, PROMOTE)
            acc = acc * 16.0
            acc = _quant_loop(acc, xq_ptr, stride_qm, offs_m, m_mask, K, q_ptr, qh_ptr, ld, ldh, prow, n_mask,
                              8, 0, BK, EVEN_K, DECODE, PROMOTE)
        else:
            acc = _quant_loop(acc, xq_ptr, stride_qm, offs_m, m_mask, K, q_ptr, qh_ptr, ld, ldh, prow, n_mask,
                              BITS, 0, BK, EVEN_K, DECODE, PROMOTE)
        if DECODE == 0:
            acc = acc * 512.0
        sw = tl.load(scale_ptr + gp, mask=n_mask, other=0.0)
        z = tl.load(zero_ptr + gp, mask=n_mask, other=0.0)
        sx = tl.load(sx_ptr + offs_m, mask=m_mask, other=0.0)
        sumx = tl.load(sum_ptr + offs_m, mask=m_mask, other=0.0)
        return (acc - z[None, :] * sumx[:, None]) * (sx[:, None] * sw[None, :])

    @triton.jit
    def _dense_slot(x_ptr, stride_xm, offs_m, m_mask, K, w_ptr, prow, n_mask, BM: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr, EVEN_K: tl.constexpr):
        """x @ W16^T for a BM x BN tile of the 16-bit rows (bf16 tensor cores, x as it is)."""
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        offs_k = tl.arange(0, BK)
        for k0 in range(0, K, BK):
            k = k0 + offs_k
            if EVEN_K:
                xmask = m_mask[:, None]
                wmask = n_mask[:, None]
            else:
                xmask = m_mask[:, None] & (k < K)[None, :]
                wmask = n_mask[:, None] & (k < K)[None, :]
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=xmask, other=0.0)
            w = tl.load(w_ptr + prow[:, None] * K + k[None, :], mask=wmask, other=0.0)
            acc = tl.dot(a.to(tl.bfloat16), tl.trans(w), acc)
        return acc

    @triton.jit(do_not_specialize=["M", "r16", "r8", "r4", "r3", "r2", "r0"])
    def fp8_mixed_gemm_kernel(x_ptr, xq_ptr, sx_ptr, sum_ptr, w16_ptr, q8_ptr, q4_ptr, q3_ptr, q3h_ptr, q2_ptr,
                              scale_ptr, zero_ptr, out_index_ptr, bias_ptr, y_ptr,
                              M, K, stride_xm, stride_qm, stride_ym, ld8, ld4, ld3, ld3h, ld2,
                              r16, r8, r4, r3, r2, r0,
                              HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                              EVEN_K: tl.constexpr, DECODE: tl.constexpr, PROMOTE: tl.constexpr):
        """y[:, out_index] = x @ W^T (+ bias) over every group of the layer; pruned channels get the bias.

        Grid: cdiv(M, BM) * (sum over slots of cdiv(rows, BN)) programs, the token tile fastest (the
        programs that read one weight tile run together)."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        pid_m = pid % num_m
        tile = pid // num_m
        e16 = tl.cdiv(r16, BN)
        e8 = e16 + tl.cdiv(r8, BN)
        e4 = e8 + tl.cdiv(r4, BN)
        e3 = e4 + tl.cdiv(r3, BN)
        e2 = e3 + tl.cdiv(r2, BN)
        offs_m = pid_m * BM + tl.arange(0, BM)
        m_mask = offs_m < M
        lane = tl.arange(0, BN)
        if tile < e16:
            prow = tile * BN + lane
            n_mask = prow < r16
            gp = prow
            out = _dense_slot(x_ptr, stride_xm, offs_m, m_mask, K, w16_ptr, prow, n_mask, BM, BN, BK, EVEN_K)
        elif tile < e8:
            prow = (tile - e16) * BN + lane
            n_mask = prow < r8
            gp = r16 + prow
            out = _quant_slot(xq_ptr, stride_qm, offs_m, m_mask, K, q8_ptr, q8_ptr, ld8, ld8, prow, n_mask, gp,
                              sx_ptr, sum_ptr, scale_ptr, zero_ptr, 8, BM, BN, BK, EVEN_K, DECODE, PROMOTE)
        elif tile < e4:
            prow = (tile - e8) * BN + lane
            n_mask = prow < r4
            gp = r16 + r8 + prow
            out = _quant_slot(xq_ptr, stride_qm, offs_m, m_mask, K, q4_ptr, q4_ptr, ld4, ld4, prow, n_mask, gp,
                              sx_ptr, sum_ptr, scale_ptr, zero_ptr, 4, BM, BN, BK, EVEN_K, DECODE, PROMOTE)
        elif tile < e3:
            prow = (tile - e4) * BN + lane
            n_mask = prow < r3
            gp = r16 + r8 + r4 + prow
            out = _quant_slot(xq_ptr, stride_qm, offs_m, m_mask, K, q3_ptr, q3h_ptr, ld3, ld3h, prow, n_mask, gp,
                              sx_ptr, sum_ptr, scale_ptr, zero_ptr, 3, BM, BN, BK, EVEN_K, DECODE, PROMOTE)
        elif tile < e2:
            prow = (tile - e3) * BN + lane
            n_mask = prow < r2
            gp = r16 + r8 + r4 + r3 + prow
            out = _quant_slot(xq_ptr, stride_qm, offs_m, m_mask, K, q2_ptr, q2_ptr, ld2, ld2, prow, n_mask, gp,
                              sx_ptr, sum_ptr, scale_ptr, zero_ptr, 2, BM, BN, BK, EVEN_K, DECODE, PROMOTE)
        else:
            prow = (tile - e2) * BN + lane
            n_mask = prow < r0
            gp = r16 + r8 + r4 + r3 + r2 + prow
            out = tl.zeros([BM, BN], dtype=tl.float32)
        cols = tl.load(out_index_ptr + gp, mask=n_mask, other=0)
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + cols, mask=n_mask, other=0.0)[None, :]
        ptrs = y_ptr + offs_m[:, None] * stride_ym + cols[None, :]
        tl.store(ptrs, out.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# ---- launching ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fp8Config:
    """One tile configuration of fp8_mixed_gemm_kernel.

    bm/bn/bk: tokens, rows and features per program step; num_warps/num_stages: Triton's launch
    options; promote: 0 = Triton's default fp8 accumulation (sm_90: inside the tensor core over all
    of K), n > 0 = partial sums added into float32 registers every n features (n <= bk);
    decode: "bitcast" (codes read as e4m3 bit patterns, 2^9 in the epilogue) or "cvt"."""
    bm: int = 128
    bn: int = 128
    bk: int = 128
    num_warps: int = 8
    num_stages: int = 3
    promote: int = 0
    decode: str = "bitcast"

    def __post_init__(self) -> None:
        for name in ("bm", "bn", "bk"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {v}")
        if self.bk < 32:
            raise ValueError(f"bk must be >= 32 (the fp8 tensor-core step), got {self.bk}")
        if self.promote < 0 or self.promote > self.bk:
            raise ValueError(f"promote must be in 0..bk ({self.bk}), got {self.promote}")
        if self.decode not in ("bitcast", "cvt"):
            raise ValueError(f"decode must be 'bitcast' or 'cvt', got {self.decode!r}")

    def label(self) -> str:
        s = f"bm{self.bm} bn{self.bn} bk{self.bk} w{self.num_warps} s{self.num_stages}"
        if self.promote:
            s += f" promote{self.promote}"
        if self.decode != "bitcast":
            s += f" {self.decode}"
        return s


def quantize_activations_fp8(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(xq float8_e4m3fn [M, K], s_x float32 [M], sum of xq float32 [M]) of x2d [M, K]: one Triton
    launch on CUDA (or under the interpreter), quantize_activations_fp8_reference otherwise."""
    if x2d.dim() != 2:
        raise ValueError(f"expected a 2-D activation [tokens, features], got shape {tuple(x2d.shape)}")
    if not (_HAVE_TRITON and (x2d.is_cuda or _interpreting())):
        return quantize_activations_fp8_reference(x2d)
    if _interpreting():
        patch_interpreter_fp8()
    x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    m, k = x2d.shape
    xq = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x2d.device)
    sx = torch.empty(m, dtype=torch.float32, device=x2d.device)
    sumx = torch.empty(m, dtype=torch.float32, device=x2d.device)
    if m:
        block = min(2048, max(128, triton.next_power_of_2(k)))
        fp8_act_quant_kernel[(m,)](x2d, xq, sx, sumx, k, x2d.stride(0), xq.stride(0), BLOCK=block, num_warps=4)
    return xq, sx, sumx


def launch_fp8_gemm(x2d: torch.Tensor, xq: torch.Tensor, sx: torch.Tensor, sumx: torch.Tensor, p: Fp8Weights,
                    config: Fp8Config, out: torch.Tensor | None = None,
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One launch of fp8_mixed_gemm_kernel: y [M, N] (x2d: the 16-bit input, read by the 16-bit rows;
    xq, sx, sumx: quantize_activations_fp8(x2d)). Every element of y is written."""
    if _interpreting():
        patch_interpreter_fp8()
    m, k = x2d.shape
    if k != p.in_features:
        raise ValueError(f"input has {k} features, the layer expects {p.in_features}")
    dtype = out_dtype or x2d.dtype
    if out is None:
        out = torch.empty(m, p.out_features, dtype=dtype, device=x2d.device)
    elif out.shape != (m, p.out_features) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous tensor of shape ({m}, {p.out_features})")
    if m == 0:
        return out
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    cfg = config
    tiles = sum(-(-r // cfg.bn) for r in p.rows) * -(-m // cfg.bm)
    if tiles == 0:
        return out
    even_k = k % cfg.bk == 0 and k == p.kp
    bias = p.bias if p.bias is not None else p.scale
    fp8_mixed_gemm_kernel[(tiles,)](
        x2d, xq, sx, sumx, p.w16, p.q8, p.q4, p.q3, p.q3h, p.q2, p.scale, p.zero, p.out_index, bias, out,
        m, k, x2d.stride(0), xq.stride(0), out.stride(0), p.kp, p.kp // 2, p.kp // 4, p.kp // 8, p.kp // 4,
        *p.rows, HAS_BIAS=p.bias is not None, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, EVEN_K=even_k,
        DECODE=0 if cfg.decode == "bitcast" else 1, PROMOTE=cfg.promote,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


# ---- tile choice at the first call per shape ---------------------------------------------------------

#: the configurations tried per token bucket, in tiers: the first tier whose configurations pass the
#: accuracy check supplies the choice; the later tiers (float32 promotion of the partial sums, then
#: converted codes instead of subnormal bit patterns) are compiled only when an earlier tier fails
CANDIDATES: dict[str, list[list[Fp8Config]]] = {
    "m16": [[Fp8Config(64, 64, 128, 4, 4), Fp8Config(64, 128, 128, 4, 3), Fp8Config(64, 64, 64, 4, 4)],
            [Fp8Config(64, 64, 128, 4, 4, promote=128)],
            [Fp8Config(64, 64, 128, 4, 4, promote=128, decode="cvt")]],
    "m64": [[Fp8Config(64, 64, 128, 4, 4), Fp8Config(64, 128, 128, 4, 3), Fp8Config(64, 128, 64, 4, 4)],
            [Fp8Config(64, 128, 128, 4, 3, promote=128)],
            [Fp8Config(64, 128, 128, 4, 3, promote=128, decode="cvt")]],
    "large": [[Fp8Config(128, 128, 128, 8, 3), Fp8Config(128, 128, 64, 4, 4), Fp8Config(128, 256, 64, 8, 3),
               Fp8Config(64, 128, 128, 4, 4), Fp8Config(128, 128, 64, 8, 4)],
              [Fp8Config(128, 128, 128, 8, 3, promote=128), Fp8Config(128, 128, 64, 4, 4, promote=64)],
              [Fp8Config(128, 128, 128, 8, 3, promote=128, decode="cvt")]],
}
#: relative error (Frobenius) a configuration may show against the float reference of the same
#: fake-quantized activations and weights (bf16 output rounding alone is ~1e-3)
TUNE_TOLERANCE = 1e-2
DEFAULT_CONFIGS = {"m16": CANDIDATES["m16"][0][0], "m64": CANDIDATES["m64"][0][0],
                   "large": CANDIDATES["large"][0][0]}

_CHOSEN: dict[tuple, Fp8Config] = {}
#: what the tuner measured, per key: list of {config, time_us, rel_err, ok} (the benchmark reports it)
TUNE_LOG: dict[tuple, list[dict]] = {}


def m_bucket(m: int) -> str:
    return "m16" if m <= 16 else "m64" if m <= 64 else "large"


def _key(p: Fp8Weights, m: int) -> tuple:
    return (p.out_features, p.in_features, m_bucket(m))


def chosen_configs() -> dict[tuple, Fp8Config]:
    return dict(_CHOSEN)


def set_config(p: Fp8Weights, m: int, config: Fp8Config) -> None:
    """Use `config` for layers of p's shape at m's token bucket (skips tuning)."""
    _CHOSEN[_key(p, m)] = config


def _time_us(fn, reps: int) -> float:
    """Median microseconds of fn() (CUDA events; L2 flushed between calls by writing 256 MiB)."""
    if not torch.cuda.is_available():
        import time
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=3, rep=reps, return_mode="median")) * 1e3


def tune(x2d: torch.Tensor, p: Fp8Weights, reps: int = 20, tiers: Sequence[Sequence[Fp8Config]] | None = None
         ) -> Fp8Config:
    """Time every candidate of m's bucket on (x2d, p), checked against the float reference first,
    remember the fastest one that passes for p's shape and bucket, and return it."""
    m = x2d.shape[0]
    key = _key(p, m)
    tiers = tiers if tiers is not None else CANDIDATES[m_bucket(m)]
    xq, sx, sumx = quantize_activations_fp8(x2d)
    ref = fp8_mixed_linear_reference(x2d, p, torch.float32 if x2d.is_cuda else torch.float64)
    log, best = [], None
    for tier in tiers:
        timings = []
        for cfg in tier:
            entry = {"config": cfg.label()}
            try:
                out = torch.full((m, p.out_features), float("nan"), dtype=x2d.dtype, device=x2d.device)
                launch_fp8_gemm(x2d, xq, sx, sumx, p, cfg, out=out)
                err = float((out.to(ref.dtype) - ref).norm() / ref.norm().clamp(min=1e-30))
                entry["rel_err"] = err
                entry["ok"] = bool(torch.isfinite(out).all()) and err < TUNE_TOLERANCE
                if entry["ok"]:
                    entry["time_us"] = _time_us(lambda: launch_fp8_gemm(x2d, xq, sx, sumx, p, cfg, out=out), reps)
                    timings.append((entry["time_us"], cfg))
            except Exception as e:  # a configuration the compiler or the card refuses
                entry.update(ok=False, error=repr(e)[:300])
            log.append(entry)
        if timings:
            best = min(timings, key=lambda t: t[0])[1]
            break
    TUNE_LOG[key] = log
    if best is None:
        raise RuntimeError(f"no fp8 configuration passed the accuracy check for {key}: {log}")
    _CHOSEN[key] = best
    return best


def pick_config(x2d: torch.Tensor, p: Fp8Weights) -> Fp8Config:
    """The tuned configuration for p's shape and x2d's token bucket: tuned at the first call (not
    inside a CUDA graph capture: there the bucket's default runs until a call outside tunes it)."""
    m = x2d.shape[0]
    cfg = _CHOSEN.get(_key(p, m))
    if cfg is not None:
        return cfg
    capturing = x2d.is_cuda and torch.cuda.is_current_stream_capturing()
    if capturing or not (x2d.is_cuda or _interpreting()) or m == 0:
        return DEFAULT_CONFIGS[m_bucket(m)]
    return tune(x2d, p)


def fp8_mixed_linear(x: torch.Tensor, prepared: Fp8Weights, config: Fp8Config | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """y [..., N] = x W^T + bias with 8-bit (e4m3, per-token) activations for the rows of <= 8 bits.

    CUDA tensors: two Triton launches (activation quantization, the grouped fp8 GEMM), the tiles
    chosen per layer shape and token bucket at the first call (warm up before capturing a CUDA
    graph). CPU tensors: the same arithmetic in plain torch, or the Triton kernels under
    TRITON_INTERPRET=1. Output in x's dtype."""
    p = prepared
    if x.shape[-1] != p.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {p.in_features}")
    if x.device != p.device:
        raise ValueError(f"input on {x.device}, layer on {p.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, p.in_features)
    if not (_HAVE_TRITON and (x.is_cuda or _interpreting())):
        y = fp8_mixed_linear_reference(x2, p, torch.float32).to(x.dtype)
        if out is not None:
            out.copy_(y.reshape(out.shape))
            return out
        return y.reshape(*lead, p.out_features)
    xq, sx, sumx = quantize_activations_fp8(x2)
    cfg = config or pick_config(x2, p)
    y = launch_fp8_gemm(x2, xq, sx, sumx, p, cfg, out=None if out is None else out.view(-1, p.out_features))
    return y.reshape(*lead, p.out_features)


def compile_offline(config: Fp8Config, arch: int = 90, x_dtype: str = "bf16", out_dtype: str = "bf16") -> dict:
    """Compile fp8_mixed_gemm_kernel with `config` for sm_{arch} on a machine without a GPU (Triton
    ships ptxas and cuobjdump), for K and the row strides multiples of 16 (the OFT-7B shapes).
    Returns registers, spill_bytes, shared_bytes, seconds (compile time), wgmma (HGMMA + QGMMA
    instructions in the SASS), fp8_wgmma (QGMMA) and loops (per-loop instruction counts,
    offline_compile.sass_loops)."""
    import re
    import time

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .offline_compile import resources_and_sass, sass_loops

    pointers = dict(x_ptr="*" + x_dtype, xq_ptr="*fp8e4nv", sx_ptr="*fp32", sum_ptr="*fp32", w16_ptr="*bf16",
                    q8_ptr="*u8", q4_ptr="*u8", q3_ptr="*u8", q3h_ptr="*u8", q2_ptr="*u8", scale_ptr="*fp32",
                    zero_ptr="*fp32", out_index_ptr="*i32", bias_ptr="*fp32", y_ptr="*" + out_dtype)
    ints = ("M", "K", "stride_xm", "stride_qm", "stride_ym", "ld8", "ld4", "ld3", "ld3h", "ld2",
            "r16", "r8", "r4", "r3", "r2", "r0")
    divisible = ("K", "stride_xm", "stride_qm", "stride_ym", "ld8", "ld4", "ld3", "ld3h", "ld2")
    signature = dict(pointers)
    signature.update({name: "i32" for name in ints})
    constants = dict(HAS_BIAS=True, BM=config.bm, BN=config.bn, BK=config.bk, EVEN_K=True,
                     DECODE=0 if config.decode == "bitcast" else 1, PROMOTE=config.promote)
    signature.update({name: "constexpr" for name in constants})
    names = fp8_mixed_gemm_kernel.arg_names
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in list(pointers) + list(divisible)}
    t = time.time()
    kernel = triton.compile(ASTSource(fp8_mixed_gemm_kernel, signature, constants, attrs),
                            target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    seconds = time.time() - t
    registers, shared, local, sass = resources_and_sass(kernel)
    return {"registers": registers, "spill_bytes": local, "shared_bytes": shared, "seconds": seconds,
            "wgmma": len(re.findall(r"\s[HQ]GMMA", sass)), "fp8_wgmma": len(re.findall(r"\sQGMMA", sass)),
            "loops": sass_loops(sass), "ttgir": kernel.asm["ttgir"]}


__all__ = ["Fp8Weights", "Fp8Config", "prepare_fp8", "random_fp8_weights", "fp8_mixed_linear",
           "fp8_mixed_linear_reference", "quantize_activations_fp8", "quantize_activations_fp8_reference",
           "fake_quantize_activations_fp8", "dequantize_fp8_weights", "group_codes", "launch_fp8_gemm", "tune",
           "pick_config", "set_config", "compile_offline", "chosen_configs", "CANDIDATES", "TUNE_LOG", "SLOTS"]
