"""`quantize_(policy, plan)`: apply a BitPlan in place, torchao style; the policy to serve.

    plan = BitPlan.load("config/plans/tiny_qvla_4.0.json", model=policy)   # checks it fits
    quantize_(policy, plan)                                            # Linear -> MixedBitLinear
    save_quantized(policy, plan, "out/tiny_q4")      # checkpoint.py: the one checkpoint format
    policy = load_quantized_policy("out/tiny_q4")                      # ... and back
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from .checkpoint import load_quantized, looks_quantized, set_submodule
from .mixed_linear import MixedBitLinear
from .plan import BitPlan, PlanError


def quantize_(model: nn.Module, plan: BitPlan, *, check_weights: bool = True,
              filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Swap every Linear the plan names for a MixedBitLinear holding its packed rows, in place.

    The plan is checked against the model first (architecture, weights unless check_weights=False,
    layer shapes), so a plan for another model raises PlanError before anything changes.
    `filter_fn(module, name)` can restrict the swap to some of the planned layers.
    """
    already = [n for n, m in model.named_modules() if isinstance(m, MixedBitLinear)]
    if already:
        raise PlanError(f"model is already quantized ({len(already)} MixedBitLinear layers, e.g. {already[0]!r}); "
                        "apply a plan to the float model")
    plan.check_model(model, check_weights=check_weights)
    modules = dict(model.named_modules())
    for name, layer in plan.layers.items():
        linear = modules[name]
        if not isinstance(linear, nn.Linear):
            raise PlanError(f"layer {name!r} is a {type(linear).__name__}, not an nn.Linear")
        if filter_fn is not None and not filter_fn(linear, name):
            continue
        set_submodule(model, name, MixedBitLinear.from_linear(
            linear, torch.from_numpy(layer.bits.astype("int64")), act_bits=layer.act_bits, row_tile=plan.row_tile))
    model.qvla_plan_id = plan.plan_id
    return model


def mixed_bit_layers(model: nn.Module) -> dict[str, MixedBitLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MixedBitLinear)}


def quantized_weight_nbytes(model: nn.Module) -> int:
    """Bytes of the packed weight buffers of every MixedBitLinear in `model`, measured on the tensors."""
    return sum(m.packed_nbytes() for m in mixed_bit_layers(model).values())


def set_dequant_cache(model: nn.Module, enabled: bool) -> None:
    """Keep (or drop) a float copy of each layer's dequantized weights: faster CPU forwards at the
    price of the memory the packing saves. Off by default."""
    for m in mixed_bit_layers(model).values():
        m.cache_dequantized = enabled
        m._dequant_cache = None


def load_quantized_policy(checkpoint_dir: str | os.PathLike | None = None,
                          plan_path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                          cache_dequantized: bool = False) -> nn.Module:
    """The policy to serve or evaluate.

    - checkpoint_dir a quantized checkpoint (checkpoint.save_quantized): loaded as saved; plan_path, if given,
      must be the same plan.
    - otherwise: the float policy at checkpoint_dir (None: the shipped default), quantized by the
      plan at plan_path (checked against the policy first); plan_path None: the float policy.
    The returned module has `qvla_plan_id` (None for the float policy).
    """
    from ..policy import load_policy

    if checkpoint_dir is not None and looks_quantized(checkpoint_dir):
        policy = load_quantized(checkpoint_dir, device="cpu")
        if plan_path is not None:
            wanted = BitPlan.load(plan_path).plan_id
            if wanted != policy.qvla_plan_id:
                raise PlanError(f"{checkpoint_dir} was quantized with plan {policy.qvla_plan_id}, not {wanted} ({plan_path})")
    else:
        policy = load_policy(checkpoint_dir, device="cpu")
        if plan_path is None:
            policy.qvla_plan_id = None
            return policy.to(device).eval()
        quantize_(policy, BitPlan.load(plan_path, model=policy))
    set_dequant_cache(policy, cache_dequantized)
    return policy.to(device).eval()
