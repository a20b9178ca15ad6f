"""Plain-torch model of what the GPU kernels compute, read from the kernel layout.

It decodes the kernel words (not the contract buffers), applies the same activation quantization
and the same integer arithmetic of the 8-bit-activation path, and writes every output channel
through `out_index`. On a CPU tensor the custom op runs this; the tests hold it against the quant
module's oracle (which reads the contract layout), so a mistake in the kernel layout or in the
kernels' arithmetic shows up on machines without a GPU too.
"""
from __future__ import annotations

import torch

from .layout import SLOT_BITS, KernelWeights

#: the activation widths the kernels run: 16 (the input as is) or 8 (per-token dynamic int8)
ACT_BITS = (16, 8)


def check_act_bits(act_bits: int) -> int:
    if act_bits not in ACT_BITS:
        raise ValueError(f"act_bits must be 16 or 8, got {act_bits!r}")
    return int(act_bits)


def quantize_activations_reference(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8: (codes int8 [M, K], scale float32 [M], code sum int32 [M]).

    scale = max|x| / 127 (at least 1e-12), codes = clamp(round(x / scale), -127, 127): the numbers of
    qvla_ros.quant.quantizer.fake_quantize_activations.
    """
    xf = x2d.to(torch.float32)
    scale = (xf.abs().amax(dim=-1) / 127.0).clamp(min=1e-12)
    codes = torch.clamp(torch.round(xf / scale[:, None]), -127.0, 127.0)
    return codes.to(torch.int8), scale, codes.sum(dim=-1).to(torch.int32)


def dequantize_kernel_weights(kw: KernelWeights, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [N, K] in original channel order (pruned rows zero), decoded from the kernel words."""
    w = torch.zeros(kw.out_features, kw.in_features, dtype=dtype, device=kw.device)
    for bits, rows in zip(SLOT_BITS[:5], kw.group_rows[:5]):
        if rows == 0:
            continue
        s = kw.slot(bits)
        lo, hi = s.start, s.start + rows
        if bits == 16:
            part = kw.w16.to(dtype)
        else:
            codes = kw.group_codes(bits).to(torch.float32)
            part = ((codes - kw.zero[lo:hi, None]) * kw.scale[lo:hi, None]).to(dtype)
        w[kw.out_index[lo:hi].long()] = part
    return w


def mixed_bit_linear_reference(x: torch.Tensor, kw: KernelWeights, bias: torch.Tensor | None = None,
                               act_bits: int = 16) -> torch.Tensor:
    """y [..., N] = x W^T + bias, W decoded from the kernel layout; float32 math, x's dtype out."""
    act_bits = check_act_bits(act_bits)
    if x.shape[-1] != kw.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {kw.in_features}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, kw.in_features)
    m = x2.shape[0]
    if act_bits == 8:
        xq, xscale, xsum = quantize_activations_reference(x2)
        xin = xq.to(torch.float32)
    else:
        xin = x2.to(torch.float32)
    packed = torch.zeros(m, kw.kept_rows, dtype=torch.float32, device=x.device)
    for bits, rows in zip(SLOT_BITS[:5], kw.group_rows[:5]):
        if rows == 0:
            continue
        s = kw.slot(bits)
        lo, hi = s.start, s.start + rows
        if bits == 16:
            w = kw.w16.to(torch.float32)
            part = xin @ w.T
            packed[:, lo:hi] = part * xscale[:, None] if act_bits == 8 else part
            continue
        codes = kw.group_codes(bits).to(torch.float32)
        scale, zero = kw.scale[lo:hi], kw.zero[lo:hi]
        if act_bits == 8:
            # exact integer dot product, zero-point folded with the code sum of the activations
            acc = (xq.to(torch.int64) @ codes.to(torch.int64).T).to(torch.float64)
            folded = acc - zero.to(torch.float64)[None, :] * xsum.to(torch.float64)[:, None]
            packed[:, lo:hi] = (folded * xscale.to(torch.float64)[:, None]
                                * scale.to(torch.float64)[None, :]).to(torch.float32)
        else:
            packed[:, lo:hi] = xin @ ((codes - zero[:, None]) * scale[:, None]).T
    y = torch.zeros(m, kw.out_features, dtype=torch.float32, device=x.device)
    y[:, kw.out_index[:kw.kept_rows].long()] = packed
    if bias is not None:
        y += bias.to(torch.float32)
    return y.to(x.dtype).reshape(*lead, kw.out_features)
