"""Whole-policy accounting: bits per parameter over every weight of the policy.

A plan's own figure (`BitPlan.bits_per_param`) counts only the planned layers' weights. What a
user deploys is the whole policy: the planned layers packed, and everything else at the width it
is stored in (32 bits for float32, 16 for bfloat16): the Linears left unquantized (action head,
projectors), embeddings, norms, biases, normalization statistics. So

    whole bits/param = (bits of the planned layers' packed weights + rest_bits) / params

with `params` every weight of the float policy and `rest_bits` the stored bits of every weight the
plan does not pack. A policy's weights are its parameters and persistent buffers, i.e. what its
checkpoint stores; non-persistent buffers (rotary frequencies, position ids) are functions of the
config, rebuilt on load, and are not weights. Tied parameters count once.

`policy_storage(model)` records what this needs of a float policy (calibration stores it in the
sensitivity table's meta, so `allocate` can turn a whole-policy budget into a planned-layers
budget exactly, without the model); `rest_of_policy` derives a plan's remainder from it;
`resident_nbytes` measures a (quantized or float) policy's weight bytes from its tensors.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch
from torch import nn

#: what BitPlan's "whole" record and the whole-policy figures count
WHOLE_COUNTS = ("every weight of the policy (parameters and persistent buffers, tied ones once): the "
                "planned layers' packed weights as in the plan's budget, every other weight (other "
                "layers, biases, embeddings, norms, action head, statistics) at its stored width")


def _own_weights(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The module's own parameters and persistent buffers (no children)."""
    yield from module.named_parameters(recurse=False)
    transient = module._non_persistent_buffers_set
    for name, buf in module.named_buffers(recurse=False):
        if name not in transient:
            yield name, buf


def _tensor_bits(t: torch.Tensor) -> int:
    return t.numel() * t.element_size() * 8


#: a packed layer (MixedBitLinear, GroupWiseLinear) keeps its Linear's bias in float32, whatever
#: the Linear held it in
PACKED_BIAS_BITS = 32


def policy_storage(model: nn.Module) -> dict[str, Any]:
    """What a float policy stores: {"params": weights, "bits": their stored bits,
    "linear_weight_bits": {Linear name: stored bits per element of its weight},
    "linear_bias": {Linear name: [bias elements, stored bits per element]} for Linears with a bias}."""
    seen: set[int] = set()
    params = bits = 0
    linear: dict[str, int] = {}
    biases: dict[str, list[int]] = {}
    for module_name, module in model.named_modules():
        for _, t in _own_weights(module):
            if id(t) in seen:
                continue
            seen.add(id(t))
            params += t.numel()
            bits += _tensor_bits(t)
        if isinstance(module, nn.Linear):
            linear[module_name] = module.weight.element_size() * 8
            if module.bias is not None:
                biases[module_name] = [module.bias.numel(), module.bias.element_size() * 8]
    return {"params": int(params), "bits": int(bits), "linear_weight_bits": linear, "linear_bias": biases}


def check_storage(storage: Any, where: str = "storage record") -> dict[str, Any]:
    """`storage` if it is a well-formed policy_storage record, else ValueError naming the problem."""
    if not isinstance(storage, Mapping):
        raise ValueError(f"{where} is not an object")
    for key in ("params", "bits"):
        value = storage.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{where}: '{key}' must be a positive integer, got {value!r}")
    widths = storage.get("linear_weight_bits")
    if not isinstance(widths, Mapping) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 64
            for k, v in widths.items()):
        raise ValueError(f"{where}: 'linear_weight_bits' must map Linear names to stored bits per weight")
    biases = storage.get("linear_bias", {})   # absent in records made before it was kept
    if not isinstance(biases, Mapping) or not all(
            isinstance(k, str) and isinstance(v, (list, tuple)) and len(v) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
            for k, v in biases.items()):
        raise ValueError(f"{where}: 'linear_bias' must map Linear names to [bias elements, stored bits]")
    return dict(storage)


def rest_of_policy(storage: Mapping[str, Any], layer_params: Mapping[str, int]) -> dict[str, int]:
    """{"params": every weight of the policy, "rest_bits": stored bits of all but the weights of
    the given layers ({Linear name: weight count})}. ValueError if the record does not cover them."""
    storage = check_storage(storage)
    widths = storage["linear_weight_bits"]
    missing = [name for name in layer_params if name not in widths]
    if missing:
        raise ValueError(f"the storage record has no Linear {missing[0]!r} ({len(missing)} layers missing); "
                         "it was made for another model")
    planned_bits = sum(int(n) * widths[name] for name, n in layer_params.items())
    planned_params = sum(int(n) for n in layer_params.values())
    # Packing a layer widens its bias to float32 (a bf16 policy's biases grow); the rest grows with it.
    biases = storage.get("linear_bias", {})
    widened = sum(n * (PACKED_BIAS_BITS - b) for name, (n, b) in biases.items()
                  if name in layer_params and b < PACKED_BIAS_BITS)
    rest = storage["bits"] - planned_bits + widened
    if rest < 0 or planned_params > storage["params"]:
        raise ValueError(f"the storage record ({storage['params']} weights, {storage['bits']} bits) is smaller "
                         f"than the layers it should hold ({planned_params} weights, {planned_bits} bits)")
    return {"params": storage["params"], "rest_bits": int(rest)}


def resident_nbytes(model: nn.Module) -> int:
    """Bytes of every weight of `model` as it is held now, measured on the tensors: a packed layer
    (anything with `packed_nbytes()`, e.g. MixedBitLinear, resident kernel layout included) counts
    its packed bytes plus its bias; everything else its parameters and persistent buffers."""
    seen: set[int] = set()
    total = 0
    packed_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in packed_prefixes):
            continue
        if hasattr(module, "packed_nbytes"):
            total += int(module.packed_nbytes())
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor) and id(bias) not in seen:
                seen.add(id(bias))
                total += bias.numel() * bias.element_size()
            packed_prefixes.append(f"{name}.")
            continue
        for _, t in _own_weights(module):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total
