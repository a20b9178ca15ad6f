"""AWQ-style activation-aware weight-only quantization (Lin et al., 2023), per output channel.

Two searches per layer on calibration inputs, both against the layer output error
||Q(W') X' - W X||^2 (a layer-level objective; the paper measures the whole block's output):

1. scale search: s_j = mean|x_j|^a (normalised so max*min = 1), a on a grid in [0, 1); input
   channel j of W is multiplied by s_j and the input divided by it (folded into the feeding norm,
   or an explicit input scale; see smoothing.py), which protects the weights that meet large
   activations. The Linears fed by one norm share s.
2. clip search: each row's range [min, max] shrunk by a ratio r in [0.5, 1], per row, to trade
   clipping error against rounding error. q/k projections are not clipped (their error is
   amplified by the attention scores, as in the paper).

Both searches only change fp weights; the result is then packed by the project's RTN quantizer
(the clipped range IS the row's min/max), so AWQ uses MixedBitLinear's storage.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..quantizer import check_bits, fake_quantize_rows
from .calibration import check_batches, collect_input_stats
from .smoothing import apply_smoothing, scale_groups

NO_CLIP_SUFFIXES = ("q_proj", "k_proj")


def _output_error(x: torch.Tensor, w_ref: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Squared output error per output row: ||x (w_q - w_ref)^T||^2 summed over tokens [N]."""
    return (x @ (w_q - w_ref).T).pow(2).sum(0)


@torch.no_grad()
def search_scale(x: torch.Tensor, absmean: torch.Tensor, weights: Sequence[torch.Tensor], bits: int,
                 grid: int = 20, fp16_scale: bool = False) -> tuple[torch.Tensor, float]:
    """Best AWQ scale vector [K] for Linears `weights` sharing input sample `x` [n, K].

    Returns (s, alpha). fp16_scale rounds s to float16 as an explicit input scale stores it.
    """
    best, best_alpha, best_err = torch.ones_like(absmean), 0.0, float("inf")
    for i in range(grid):
        alpha = i / grid
        s = absmean.clamp(min=1e-4).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        if fp16_scale:
            s = s.to(torch.float16).float()
        err = 0.0
        for w in weights:
            wq = fake_quantize_rows(w * s[None, :], bits) / s[None, :]
            err += float(_output_error(x, w, wq).sum())
        if err < best_err:
            best, best_alpha, best_err = s, alpha, err
    return best, best_alpha


@torch.no_grad()
def search_clip(x: torch.Tensor, weight: torch.Tensor, bits: int, grid: int = 20,
                min_ratio: float = 0.5) -> torch.Tensor:
    """The weight with each row clamped to its best shrunk range [r*lo, r*hi] (r per row)."""
    w = weight.float()
    lo = w.amin(1, keepdim=True).clamp(max=0)
    hi = w.amax(1, keepdim=True).clamp(min=0)
    best_err = torch.full((w.shape[0],), float("inf"))
    best = w.clone()
    for i in range(grid + 1):
        r = 1.0 - (1.0 - min_ratio) * i / grid
        clipped = torch.maximum(torch.minimum(w, r * hi), r * lo)
        err = _output_error(x, w, fake_quantize_rows(clipped, bits))
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best[better] = clipped[better]
    return best


@torch.no_grad()
def apply_awq(policy: nn.Module, modules: Mapping[str, nn.Linear], batches: Sequence[Mapping],
              bits: int, *, grid: int = 20, clip: bool = True, max_samples: int = 512,
              progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Scale-search, fold and clip-search every Linear in `modules` in place (weights stay fp).

    Returns (explicit input scales to wrap around the Linears with no feeding norm, chosen alpha
    per group keyed by the group's first Linear). Pack afterwards with the all-`bits` plan.
    """
    bits = check_bits(bits, (2, 3, 4, 8))
    batches = check_batches(batches)
    names = list(modules)
    stats = collect_input_stats(policy, modules, batches, max_samples=max_samples)
    input_scales: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    applied: dict[str, torch.Tensor] = {}
    for group in tqdm(scale_groups(policy, names), desc=f"AWQ W{bits} scales", disable=not progress,
                      leave=False):
        first = stats[group.linears[0]]
        x = first.sample_tensor()
        weights = [modules[n].weight.float() for n in group.linears]
        s, alpha = search_scale(x, first.absmean, weights, bits, grid, fp16_scale=group.norm is None)
        explicit = apply_smoothing(policy, group, s)
        alphas[group.linears[0]] = alpha
        for name in group.linears:
            applied[name] = s
            if explicit is not None:
                input_scales[name] = explicit
    if clip:
        for name in tqdm(names, desc=f"AWQ W{bits} clip", disable=not progress, leave=False):
            if name.rsplit(".", 1)[-1] in NO_CLIP_SUFFIXES:
                continue
            x = stats[name].sample_tensor() / applied[name][None, :]
            lin = modules[name]
            lin.weight.copy_(search_clip(x, lin.weight, bits, grid).to(lin.weight.dtype))
    return input_scales, alphas
