"""Measured weight memory of the quantizable Linears, whatever method stored them.

Bytes are read from the stored tensors themselves: packed codes, scales, zero-points, dense
rows, row indices (MixedBitLinear, GroupWiseLinear: `packed_nbytes()`), explicit input scales
(InputScaled), and 2 bytes a weight for a Linear left unquantized (it would ship as bfloat16).
Biases are not weight memory (no method quantizes them). The reference is the same Linears in
bfloat16, and bits/param divides by their weight count.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from torch import nn

from .smoothing import InputScaled


@dataclass(frozen=True)
class WeightMemory:
    nbytes: int
    bf16_nbytes: int
    params: int

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / max(self.params, 1)

    @property
    def percent_of_bf16(self) -> float:
        return 100.0 * self.nbytes / max(self.bf16_nbytes, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "bits_per_param": self.bits_per_param,
                "percent_of_bf16": self.percent_of_bf16}


def module_weight_nbytes(module: nn.Module) -> int:
    """Stored weight bytes of one quantizable slot (see the module docstring)."""
    if isinstance(module, InputScaled):
        return module.scale.numel() * module.scale.element_size() + module_weight_nbytes(module.inner)
    if hasattr(module, "packed_nbytes"):
        return int(module.packed_nbytes())
    if isinstance(module, nn.Linear):
        return module.weight.numel() * 2
    raise TypeError(f"cannot measure the weight memory of a {type(module).__name__}")


def _shape(module: nn.Module) -> tuple[int, int]:
    while isinstance(module, InputScaled):
        module = module.inner
    return int(module.out_features), int(module.in_features)


def weight_memory(policy: nn.Module, names: Iterable[str]) -> WeightMemory:
    """Measured bytes of the named slots of `policy` against the same weights in bfloat16."""
    nbytes = params = 0
    for name in names:
        module = policy.get_submodule(name)
        n, k = _shape(module)
        nbytes += module_weight_nbytes(module)
        params += n * k
    return WeightMemory(nbytes=nbytes, bf16_nbytes=2 * params, params=params)
