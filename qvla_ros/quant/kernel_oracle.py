"""Random layers packed by the project's packer, and the float64 oracle every kernel must match,
for the kernels' tests and benchmarks.

    packed, weight = random_packed(n, k, mix_counts(n, MIXES["avg4"]))   # quant/packing.py's layout
    y = oracle(x, packed, bias, act_bits)                                # fake_quant(x) @ dequant^T
    check_against_oracle(out, packed, x, bias)                           # a kernel's output vs it

It sits in quant/ because it builds on the one packer and the one activation quantizer; the
kernel layout's own random layers (no packer) stay in qvla_ros/kernels/testing.py.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..kernels.layout import prepare_packed
from ..kernels.testing import bits_per_row
from .packing import PackedWeight
from .quantizer import fake_quantize_activations


def random_packed(out_features: int, in_features: int, counts: Mapping[int, int], seed: int = 0,
                  fractional_zero: bool = False):
    """(PackedWeight, dense float32 weight) for a random layer, packed by qvla_ros.quant.packing.

    fractional_zero: move every zero-point by a fraction (still a valid layout: weight = (q - zero) *
    scale), which sends the kernels down their folded-zero path.
    """
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    packed = PackedWeight.from_weight(weight, bits_per_row(out_features, counts, gen))
    if fractional_zero:
        for g in packed.groups:
            if g.bits != 16:
                g.zero = (g.zero.float() + 0.375).to(torch.float16)
    return packed, weight


def oracle(x: torch.Tensor, packed, bias: torch.Tensor | None, act_bits: int) -> torch.Tensor:
    """float64 y = fake_quant(x) @ dequantize(packed)^T + bias: what the kernels must reproduce."""
    xq = fake_quantize_activations(x.to(torch.float32), act_bits).to(torch.float64)
    y = xq @ packed.dequantize(torch.float64).to(x.device).T
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y


_GPU_LAYERS: dict = {}


def gpu_layer(n: int, k: int, counts: Mapping[int, int], frac: bool = False):
    """(PackedWeight on CPU, KernelWeights on the GPU) of a random layer, built once per shape and mix
    in a process (the GPU tests reuse a layer across many cases)."""
    key = (n, k, tuple(sorted(counts.items())), frac)
    if key not in _GPU_LAYERS:
        packed, _ = random_packed(n, k, counts, seed=n + 3 * k, fractional_zero=frac)
        _GPU_LAYERS[key] = (packed, prepare_packed(packed, device="cuda"))
    return _GPU_LAYERS[key]


def check_against_oracle(out: torch.Tensor, packed, x: torch.Tensor, bias: torch.Tensor | None, act_bits: int = 16,
                         tol: float | None = None) -> None:
    """Every output element written (the tests fill out with NaN first), and the relative error to
    the CPU oracle under tol, by default x's rounding: 1e-2 for bfloat16, 2e-3 for float16."""
    assert torch.isfinite(out).all(), "some output elements were never written"
    ref = oracle(x.cpu(), packed, None if bias is None else bias.cpu(), act_bits)
    err = float((out.cpu().to(torch.float64) - ref).norm() / ref.norm())
    assert err < (tol or (1e-2 if x.dtype == torch.bfloat16 else 2e-3)), err
