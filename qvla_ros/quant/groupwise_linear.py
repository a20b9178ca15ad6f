"""Group-wise round-to-nearest: one (scale, zero) per `group_size` consecutive inputs of a row.

The packed layout of MixedBitLinear has one scale per row, so group-wise weights get their own
small format, built from the same parts (the project's quantizer and code packer):

    K padded to Kg, a multiple of group_size (itself a multiple of 8), with zero weights
    qweight     uint8   [N, Kg*b/8]   b in {2, 4, 8}; b = 3: low 2 bits [N, Kg/4]
    qweight_hi  uint8   [N, Kg/8]     b = 3 only (high-bit plane)
    scale, zero float16 [N, Kg/group_size]; weight[n, k] = (q - zero[n, k//g]) * scale[n, k//g]
    bias        float32 [N]           (not counted as quantized weight memory)

Codes pack exactly as in `qvla_ros.quant.packing` (element k of a row at bit offset
(k % (8//b)) * b of byte k // (8//b)); each group is quantized by `quantize_rows` as if it were a
row, so "b bits" means the same grid as everywhere else. Memory: b + 32/group_size bits a weight
(4.25 at b = 4, g = 128), plus the padding of K when group_size does not divide it.

`fake_quantize_group_wise` gives the float weights this layout stores, for the searches that try
candidate weights before packing (AWQ) and the checks that a method's weights repack exactly (GPTQ).
"""
from __future__ import annotations

import torch
from torch import nn

from .packing import K_ALIGN, pack_codes, unpack_codes
from .quantizer import QUANT_BITS, check_bits, dequantize_rows, quantize_rows


def check_group_size(group_size: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or group_size % K_ALIGN:
        raise ValueError(f"group_size must be a positive multiple of {K_ALIGN}, got {group_size!r}")
    return group_size


def padded_groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """`weight` [N, K] as float32 groups [N * Kg/group_size, group_size], K zero-padded to Kg.
    A zero never changes a group's grid (the range always holds 0), so a padded last group is
    quantized exactly as its real columns alone would be."""
    n, k = weight.shape
    kg = -(-k // group_size) * group_size
    w = torch.zeros(n, kg, dtype=torch.float32, device=weight.device)
    w[:, :k] = weight.detach().float()
    return w.reshape(n * kg // group_size, group_size)


def fake_quantize_group_wise(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """What GroupWiseLinear stores for `weight` [N, K] at `bits`, as float32 [N, K]."""
    n, k = weight.shape
    groups = padded_groups(weight, check_group_size(group_size))
    return dequantize_rows(*quantize_rows(groups, bits)).reshape(n, -1)[:, :k]


class GroupWiseLinear(nn.Module):
    """y = x W^T + b with W stored group-wise at `bits` (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, *,
                 bias: bool = True):
        super().__init__()
        self.bits = check_bits(bits, QUANT_BITS)
        check_group_size(group_size)
        self.in_features, self.out_features, self.group_size = int(in_features), int(out_features), int(group_size)
        kg = self.padded_in_features
        planes = {3: kg // 4}.get(self.bits, kg * self.bits // 8)
        self.register_buffer("qweight", torch.zeros(out_features, planes, dtype=torch.uint8))
        if self.bits == 3:
            self.register_buffer("qweight_hi", torch.zeros(out_features, kg // 8, dtype=torch.uint8))
        else:
            self.qweight_hi = None
        self.register_buffer("scale", torch.zeros(out_features, kg // group_size, dtype=torch.float16))
        self.register_buffer("zero", torch.zeros(out_features, kg // group_size, dtype=torch.float16))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32))
        else:
            self.bias = None
        # As MixedBitLinear: optionally keep the dequantized weights (fast CPU rollouts, at the
        # price of the memory the packing saves); never counted as stored weight memory.
        self.cache_dequantized = False
        self._dequant_cache: torch.Tensor | None = None

    @property
    def padded_in_features(self) -> int:
        return -(-self.in_features // self.group_size) * self.group_size

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int) -> "GroupWiseLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        n, k = linear.weight.shape
        module = cls(k, n, bits, group_size, bias=linear.bias is not None)
        kg = module.padded_in_features
        codes, scale, zero = quantize_rows(padded_groups(linear.weight.detach().cpu(), group_size), module.bits)
        qweight, qweight_hi = pack_codes(codes.reshape(n, kg), module.bits)
        module.qweight.copy_(qweight)
        if qweight_hi is not None:
            module.qweight_hi.copy_(qweight_hi)
        module.scale.copy_(scale.reshape(n, -1))
        module.zero.copy_(zero.reshape(n, -1))
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        return module.to(linear.weight.device)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Weights [N, K] as `dtype`."""
        n, kg, g = self.out_features, self.padded_in_features, self.group_size
        codes = unpack_codes(self.qweight, self.qweight_hi, self.bits)
        w = dequantize_rows(codes.reshape(n * kg // g, g), self.scale.reshape(-1), self.zero.reshape(-1))
        return w.reshape(n, kg)[:, : self.in_features].to(dtype)

    def packed_nbytes(self) -> int:
        """Bytes of the stored weight tensors (codes, scales, zeros), measured; bias excluded."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers(recurse=False)
                   if name != "bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        dtype = x.dtype if x.is_floating_point() else torch.float32
        bias = None if self.bias is None else self.bias.to(dtype)
        if self.cache_dequantized:
            if self._dequant_cache is None or self._dequant_cache.dtype != dtype:
                self._dequant_cache = self.dequantize(dtype).to(x.device)
            weight = self._dequant_cache
        else:
            weight = self.dequantize(dtype).to(x.device)
        return torch.nn.functional.linear(x.to(dtype), weight, bias)

    def _apply(self, fn, *args, **kwargs):
        self._dequant_cache = None
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
