"""The project's one weight quantizer: round-to-nearest, per output row, asymmetric.

Every stage that quantizes weights (QVLA's packed layers, its sensitivity measurement, the uniform
baselines, the GPU kernels' oracle) calls these functions, so "b bits" means the same numbers
everywhere.

For a row w of K weights and b bits (qmax = 2**b - 1):

    lo = min(min(w), 0), hi = max(max(w), 0)      # the range always holds 0 ...
    scale = fp16((hi - lo) / qmax)
    zero  = round(-lo / scale)                    # ... so an integer zero-point decodes to exactly 0
    q     = clamp(round(w / scale) + zero, 0, qmax)
    w_hat = (q - zero) * scale

Scale and zero are stored as float16 (the packed layout's contract) and q is computed with the
float16-rounded scale, so decoding from the stored numbers reproduces w_hat exactly. The zero-point
is an integer (exact in float16 up to 2048), which makes zero weights (the padding of K) decode to
exactly 0.
"""
from __future__ import annotations

import torch

#: bit-widths a quantized row can have (0 = pruned, 16 = kept dense in bfloat16)
QUANT_BITS = (2, 3, 4, 8)
ALL_BITS = (0, 2, 3, 4, 8, 16)

# The smallest positive float16 (subnormal): a scale must stay non-zero after rounding to fp16.
_FP16_TINY = 2.0 ** -24


def check_bits(bits: int, allowed=ALL_BITS) -> int:
    """Return `bits` as an int, or raise ValueError naming the allowed widths."""
    try:
        value = int(bits)
    except (TypeError, ValueError):
        raise ValueError(f"bit-width {bits!r} is not an integer; allowed: {list(allowed)}") from None
    if value != bits or value not in allowed:
        raise ValueError(f"unknown bit-width {bits!r}; allowed: {list(allowed)}")
    return value


def quantize_rows(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize each row of `weight` [R, K] to `bits` in {2, 3, 4, 8}.

    Returns (codes uint8 [R, K], scale float16 [R], zero float16 [R]) with
    weight ~= (codes - zero) * scale.
    """
    bits = check_bits(bits, QUANT_BITS)
    if weight.dim() != 2:
        raise ValueError(f"quantize_rows expects a 2-D weight [rows, in_features], got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        raise ValueError("weight holds NaN or Inf values; cannot quantize")
    qmax = float(2 ** bits - 1)
    lo = w.amin(dim=1).clamp(max=0.0)
    hi = w.amax(dim=1).clamp(min=0.0)
    scale = ((hi - lo) / qmax).clamp(min=_FP16_TINY).to(torch.float16)
    # A row whose range overflows float16 cannot be stored in this layout.
    if not torch.isfinite(scale).all():
        raise ValueError("a weight row's range exceeds float16; cannot store its scale")
    s = scale.to(torch.float32)
    zero = torch.round(-lo / s).clamp(0.0, qmax)
    codes = torch.clamp(torch.round(w / s[:, None]) + zero[:, None], 0.0, qmax).to(torch.uint8)
    return codes, scale, zero.to(torch.float16)


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(codes - zero) * scale, row-wise, computed in float32 and returned as `dtype`."""
    w = (codes.to(torch.float32) - zero.to(torch.float32)[:, None]) * scale.to(torch.float32)[:, None]
    return w.to(dtype)


def fake_quantize_rows(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """What the packed layout stores for `weight` rows at `bits`, as float32.

    0 -> zeros (pruned), 16 -> bfloat16-rounded rows, 2/3/4/8 -> quantize + dequantize.
    """
    bits = check_bits(bits)
    if bits == 0:
        return torch.zeros_like(weight, dtype=torch.float32)
    if bits == 16:
        return weight.detach().to(torch.bfloat16).to(torch.float32)
    return dequantize_rows(*quantize_rows(weight, bits))


#: activation widths a layer can run at: 16 (the input as is) or 8 (per-token dynamic int8)
ACT_BITS = (16, 8)


def fake_quantize_activations(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-token dynamic symmetric quantization of `x` [..., K] (each token its own scale).

    8 bits: scale = max|x_token| / 127, x -> clamp(round(x / scale), -127, 127) * scale, the
    numbers an int8 tensor-core GEMM with per-token scales sees. 16 bits: `x` unchanged.
    """
    bits = check_bits(bits, ACT_BITS)
    if bits == 16:
        return x
    xf = x.to(torch.float32)
    scale = (xf.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-12)
    return (torch.clamp(torch.round(xf / scale), -127.0, 127.0) * scale).to(x.dtype)
