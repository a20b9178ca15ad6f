"""Bits per parameter over the WHOLE policy, not only over the layers a plan quantizes.

A plan's budget counts the planned Linears' weights (scales, zeros and row indices included).
What a robot's GPU holds is everything: the planned layers' packed bytes plus every other tensor
(embeddings, norms, biases, projectors, the action head) at the width it is stored in. These
functions convert between the two, from the tensors themselves.
"""
from __future__ import annotations

from typing import Iterable

from torch import nn


def _stored_bits(tensors: Iterable) -> int:
    return sum(t.numel() * t.element_size() * 8 for t in tensors)


def rest_of_policy(policy: nn.Module, planned: Iterable[str]) -> tuple[int, int]:
    """(parameters, stored bits) of the float policy outside the planned layers' weight matrices."""
    planned = set(planned)
    modules = dict(policy.named_modules())
    missing = [n for n in planned if not isinstance(modules.get(n), nn.Linear)]
    if missing:
        raise ValueError(f"planned layers {missing[:3]} are not Linear layers of the policy")
    skip = {id(modules[n].weight) for n in planned}
    rest = [p for p in policy.parameters() if id(p) not in skip]
    return sum(p.numel() for p in rest), _stored_bits(rest)


def planned_budget(policy: nn.Module, table, whole_bits_per_param: float) -> float:
    """The planned layers' bits per parameter that makes the whole float policy `whole_bits_per_param`
    once its planned layers (the sensitivity table's) are quantized; ValueError when the rest of
    the policy alone already costs more."""
    planned = {name: policy.get_submodule(name) for name in table.costs}
    planned_params = sum(m.weight.numel() for m in planned.values())
    rest_params, rest_bits = rest_of_policy(policy, planned)
    total = planned_params + rest_params
    budget = (whole_bits_per_param * total - rest_bits) / planned_params
    if budget <= 0:
        raise ValueError(f"{whole_bits_per_param:g} whole-policy bits/param is below what the unquantized "
                         f"rest of the policy alone costs ({rest_bits / total:.3f} bits/param)")
    return budget


def whole_policy_bits(policy: nn.Module) -> float:
    """Stored bits per parameter of a (possibly quantized) policy: packed layers at their real
    bytes over their float parameter count, every other parameter at its stored width."""
    from .mixed_linear import MixedBitLinear

    bits, params = 0, 0
    packed = set()
    for module in policy.modules():
        if isinstance(module, MixedBitLinear):
            bits += module.packed_nbytes() * 8
            params += module.in_features * module.out_features
            bias = getattr(module, "bias", None)
            if bias is not None:
                bits += _stored_bits([bias])
                params += bias.numel()
                packed.add(id(bias))
            packed.update(id(t) for t in module.buffers())
    rest = [p for p in policy.parameters() if id(p) not in packed]
    return (bits + _stored_bits(rest)) / (params + sum(p.numel() for p in rest))
