"""Measured weight memory of the quantizable Linears, whatever method stored them.

Bytes are read from the stored tensors themselves: packed codes, scales, zero-points, dense
rows, row indices (MixedBitLinear, GroupWiseLinear: `packed_nbytes()`), explicit input scales
(InputScaled), and 2 bytes a weight for a Linear left unquantized (it would ship as bfloat16).
Biases are not weight memory (no method quantizes them). The reference is the same Linears in
bfloat16, and bits/param divides by their weight count.

Beside it, the whole policy (accounting.py): `policy_nbytes` is every weight the quantized policy
holds (measured on its tensors, everything else at its stored width), `policy_params` every weight
of the float policy, and policy_bits_per_param their ratio.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from torch import nn

from ..accounting import resident_nbytes
from ..input_scaled import InputScaled


@dataclass(frozen=True)
class WeightMemory:
    nbytes: int
    bf16_nbytes: int
    params: int
    policy_nbytes: int | None = None
    policy_params: int | None = None

    @property
    def bits_per_param(self) -> float:
        """Over the quantizable Linears' weights."""
        return 8.0 * self.nbytes / max(self.params, 1)

    @property
    def policy_bits_per_param(self) -> float | None:
        """Over every weight of the whole policy (None when not measured)."""
        if self.policy_nbytes is None or not self.policy_params:
            return None
        return 8.0 * self.policy_nbytes / self.policy_params

    @property
    def percent_of_bf16(self) -> float:
        return 100.0 * self.nbytes / max(self.bf16_nbytes, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "bits_per_param": self.bits_per_param,
                "percent_of_bf16": self.percent_of_bf16, "policy_bits_per_param": self.policy_bits_per_param}


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


def weight_memory(policy: nn.Module, names: Iterable[str], policy_params: int | None = None) -> WeightMemory:
    """Measured bytes of the named slots of `policy` against the same weights in bfloat16, and of
    the whole policy when `policy_params` (the float policy's weight count) is given."""
    nbytes = params = 0
    for name in names:
        module = policy.get_submodule(name)
        n, k = _shape(module)
        nbytes += module_weight_nbytes(module)
        params += n * k
    whole = None if policy_params is None else resident_nbytes(policy)
    return WeightMemory(nbytes=nbytes, bf16_nbytes=2 * params, params=params, policy_nbytes=whole,
                        policy_params=policy_params)
