"""SmoothQuant (Xiao et al., 2023): W8A8 / W4A8 with activation outliers migrated into weights.

For each input channel j of a group of Linears that read one input X:

    s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha)       (max over the group's rows)

X is divided by s (folded into the feeding norm, or an explicit input scale; smoothing.py) and
W's column j multiplied by it. Weights are then quantized per output channel (the project's RTN
grid, MixedBitLinear) and activations per token, dynamically, to int8 (MixedBitLinear's A8 path).
alpha is chosen on the calibration frames by the action error it leaves, as the authors
recommend tuning it per model.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..action_error import action_error
from .calibration import InputStats, calibration_actions, check_batches, collect_input_stats
from .smoothing import apply_smoothing, scale_groups, wrap_input_scales

DEFAULT_ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9)


def smoothing_factors(x_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [K] for input channel maxima `x_absmax` [K] and the group's weights [N_i, K]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    w_absmax = torch.cat([w.detach().float().abs() for w in weights]).amax(0)
    return x_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1.0 - alpha)


@torch.no_grad()
def smooth_(policy: nn.Module, names: Sequence[str], stats: Mapping[str, InputStats],
            alpha: float) -> dict[str, torch.Tensor]:
    """Smooth the named Linears of `policy` in place (the fp function is unchanged).

    Returns the explicit input scales of the Linears with no feeding norm; apply them with
    `wrap_input_scales` after quantizing (they must stay outside the quantized module so its
    activation quantizer sees the smoothed input).
    """
    explicit: dict[str, torch.Tensor] = {}
    for group in scale_groups(policy, list(names)):
        weights = [policy.get_submodule(n).weight for n in group.linears]
        s = smoothing_factors(stats[group.linears[0]].absmax, weights, alpha)
        scale = apply_smoothing(policy, group, s)
        if scale is not None:
            for n in group.linears:
                explicit[n] = scale
    return explicit


@torch.no_grad()
def apply_smoothquant(policy: nn.Module, names: Sequence[str], batches: Sequence[Mapping],
                      pack: Callable[[nn.Module], None], *,
                      alphas: Sequence[float] = DEFAULT_ALPHAS,
                      progress: bool = True) -> dict:
    """Smooth (alpha tuned on calibration action error), pack and wrap `policy` in place.

    pack(policy) quantizes the named Linears of a smoothed policy (weights and activations);
    it is called once per alpha candidate on a copy, then once on `policy`.
    Returns {"alpha": chosen, "calibration_error": {alpha: quant.action_error on the calibration frames}}.
    """
    batches = check_batches(batches)
    if not alphas:
        raise ValueError("SmoothQuant needs at least one alpha candidate")
    modules = {n: policy.get_submodule(n) for n in names}
    stats = collect_input_stats(policy, modules, batches)
    reference = calibration_actions(policy, batches)
    errors: dict[float, float] = {}
    for alpha in tqdm(list(alphas), desc="SmoothQuant alpha", disable=not progress or len(alphas) == 1,
                      leave=False):
        if len(alphas) == 1:
            break
        trial = copy.deepcopy(policy)
        explicit = smooth_(trial, names, stats, alpha)
        pack(trial)
        wrap_input_scales(trial, explicit)
        errors[float(alpha)] = action_error(calibration_actions(trial, batches), reference)
        del trial
    best = float(alphas[0]) if len(alphas) == 1 else min(errors, key=errors.get)
    explicit = smooth_(policy, names, stats, best)
    pack(policy)
    wrap_input_scales(policy, explicit)
    return {"alpha": best, "calibration_error": errors}
