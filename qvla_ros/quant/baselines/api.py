"""One entry point for every baseline: policy + calibration batches + method in, quantized policy out.

    result = quantize_baseline(policy, "gptq-w4", frames)   # CalibrationFrames or batch dicts
    result.policy            # the same object, quantized in place (like quantize_)
    result.memory            # measured weight memory of the quantizable Linears
    result.info              # what the method chose (SmoothQuant's alpha, AWQ's alphas, ...)

Per-channel methods are stored as MixedBitLinear (with a BitPlan), group-wise ones (rtn-g, gptq-g,
awq-g) as GroupWiseLinear; either way memory is measured from the stored tensors.

The quantizable Linears are the QVLA core's (`quantizable_linears`: decoder and vision Linears;
projectors and the action head stay 16-bit), so every method compresses the same weights.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..api import quantize_
from ..plan import BitPlan, plan_from_bits
from ..targets import quantizable_linears
from .awq import apply_awq
from .calibration import check_batches
from .gptq import apply_gptq
from ..groupwise_linear import GroupWiseLinear
from ..accounting import policy_storage
from .memory import WeightMemory, weight_memory
from .methods import MethodSpec, parse_method
from ..checkpoint import set_submodule
from .smoothquant import DEFAULT_ALPHAS, apply_smoothquant


@dataclass
class QuantResult:
    policy: nn.Module
    spec: MethodSpec
    memory: WeightMemory
    info: dict = field(default_factory=dict)
    plan: BitPlan | None = None  # the per-channel plan, for methods stored as MixedBitLinear
    seconds: float = 0.0


def pack_per_channel(policy: nn.Module, names: Sequence[str], wbits: int, abits: int = 16,
                     method: str | None = None) -> BitPlan:
    """Every named Linear -> MixedBitLinear with all rows at `wbits`: the uniform BitPlan, applied
    by the QVLA core's quantize_. Returns the plan (its id names the packed weights)."""
    plan = plan_from_bits(policy, {n: wbits for n in names}, act_bits=abits,
                          budget_bits_per_param=None,
                          provenance={"method": method or f"uniform W{wbits}A{abits}"})
    quantize_(policy, plan)
    return plan


def pack_group_wise(policy: nn.Module, names: Sequence[str], wbits: int, group_size: int) -> None:
    for name in names:
        set_submodule(policy, name, GroupWiseLinear.from_linear(policy.get_submodule(name), wbits,
                                                                group_size))


#: (policy, calibration batches, method, budget bits/param) -> info with the applied plan under "plan"
QvlaCall = Callable[[nn.Module, Sequence[Mapping], MethodSpec, float], dict]


@torch.no_grad()
def quantize_baseline(policy: nn.Module, method: str | MethodSpec, batches: Sequence[Mapping] = (),
                      *, names: Sequence[str] | None = None, alphas: Sequence[float] = DEFAULT_ALPHAS,
                      budget: float | None = None, qvla: QvlaCall | None = None,
                      awq_grid: int = 20, progress: bool = True) -> QuantResult:
    """Quantize `policy` in place with `method` and measure its weight memory.

    batches: calibration batches (dicts with images/instruction/proprio) or the QVLA core's
        CalibrationFrames; not needed by fp and RTN.
    names: the Linears to quantize (default: the QVLA core's quantizable Linears).
    alphas: SmoothQuant's alpha candidates (the one with the lowest calibration action error wins).
    awq_grid: points of AWQ's scale-exponent and clip-ratio searches (the paper: 20).
    budget: bits/param for QVLA methods that match another method's memory (the caller measured it).
    qvla: runs QVLA (calibrate, allocate, quantize_) on the policy at a budget and returns its info
        dict, with the applied BitPlan under "plan"; see qvla_match.py.
    """
    spec = parse_method(method) if isinstance(method, str) else method
    names = list(names) if names is not None else list(quantizable_linears(policy))
    whole_params = policy_storage(policy)["params"]  # the float policy's weights, before any swap
    if spec.family not in ("fp", "rtn", "rtn-group"):
        batches = check_batches(batches)
    start = time.perf_counter()
    info: dict = {}
    plan: BitPlan | None = None
    if spec.family == "rtn":
        plan = pack_per_channel(policy, names, spec.wbits, method=spec.name)
    elif spec.family == "rtn-group":
        pack_group_wise(policy, names, spec.wbits, spec.group_size)
    elif spec.family == "smoothquant":
        plans: list[BitPlan] = []
        info = apply_smoothquant(
            policy, names, batches,
            lambda p: plans.append(pack_per_channel(p, names, spec.wbits, spec.abits, method=spec.name)),
            alphas=alphas, progress=progress)
        plan = plans[-1]
    elif spec.family in ("gptq", "awq"):
        modules = {n: policy.get_submodule(n) for n in names}
        if spec.family == "gptq":
            # Group-wise GPTQ as LLM users run it (no act-order); per channel keeps act-order.
            rel = apply_gptq(policy, modules, batches, spec.wbits, group_size=spec.group_size,
                             act_order=spec.group_size is None, progress=progress)
            info = {"mean_relative_layer_error": sum(rel.values()) / len(rel)}
        else:
            info = apply_awq(policy, modules, batches, spec.wbits, group_size=spec.group_size,
                             grid=awq_grid, progress=progress)
        # The searched float weights lie on (GPTQ) or are searched against (AWQ) the packer's grid.
        if spec.group_size is None:
            plan = pack_per_channel(policy, names, spec.wbits, method=spec.name)
        else:
            pack_group_wise(policy, names, spec.wbits, spec.group_size)
    elif spec.family == "qvla":
        target = spec.budget if spec.budget is not None else budget
        if target is None:
            raise ValueError(f"{spec.name}: give the budget in bits/param (the matched method's "
                             f"measured memory)")
        if qvla is None:
            raise ValueError(f"{spec.name}: pass `qvla`, the QVLA runner (see qvla_match.py)")
        info = dict(qvla(policy, batches, spec, float(target)))
        plan = info.pop("plan", None)
    elif spec.family != "fp":
        raise ValueError(f"no baseline implements family {spec.family!r}")
    return QuantResult(policy=policy, spec=spec, memory=weight_memory(policy, names, whole_params), info=info,
                       plan=plan, seconds=time.perf_counter() - start)
