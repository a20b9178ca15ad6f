"""Allocation checked in action space: choose between allocation variants by what they really do.

The knapsack adds per-channel costs, which assumes the action changes of different channels are
uncorrelated. Measured on the shipped policy, that holds for quantization noise but not for
pruning and very low widths inside one layer: removing many channels of, say, a key projection
shifts every attention logit the same way, so their action changes add up coherently and the
real damage exceeds the sum. `select_allocation` allocates with each variant (e.g. with and
without pruning), applies each allocation as the packed layout stores it (`stored_weights`) and
keeps the one whose policy's actions move least on calibration frames (never on held-out data),
with real forwards. (Per-layer coherence factors fed back into the table did not improve
held-out error and were removed; bench/quant/NOTES.md.)
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from .action_error import action_error
from .allocate import Allocation, allocate
from .calibration import CalibrationFrames
from .quantizer import fake_quantize_rows
from .sensitivity import SensitivityTable


@contextlib.contextmanager
def stored_weights(policy: nn.Module, bits: Mapping[str, np.ndarray], only: Iterable[int] | None = None):
    """Inside: the named Linears' rows hold what the packed layout stores at the given widths
    (rows whose width is not in `only`, when given, stay float). Restored on exit."""
    saved = {}
    try:
        with torch.no_grad():
            for name, b in bits.items():
                linear = policy.get_submodule(name)
                saved[name] = linear.weight.detach().clone()
                b = np.asarray(b)
                for width in np.unique(b):
                    width = int(width)
                    if width == 16 or (only is not None and width not in only):
                        continue
                    rows = torch.from_numpy(np.flatnonzero(b == width))
                    linear.weight[rows] = fake_quantize_rows(saved[name][rows], width).to(linear.weight.dtype)
        yield policy
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                policy.get_submodule(name).weight.copy_(w)


def predict_actions(policy: nn.Module, frames: CalibrationFrames, batch: int = 32) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for s in range(0, len(frames), batch):
            outs.append(policy(*frames.select(range(s, min(s + batch, len(frames)))).inputs()).float())
    return torch.cat(outs)


#: allocation variants compared by `select_allocation` (keyword arguments of `allocate`)
DEFAULT_VARIANTS = {"all widths": {}, "no pruning": {"candidate_bits": (2, 3, 4, 8, 16)}}


def select_allocation(policy: nn.Module, frames: CalibrationFrames, table: SensitivityTable, budget: float,
                      variants: Mapping[str, Mapping[str, Any]] | None = None,
                      reference: torch.Tensor | None = None) -> tuple[str, Allocation, dict[str, float]]:
    """Allocate with each variant (e.g. with and without pruning) and keep the one whose quantized
    policy really changes the actions least on `frames` (calibration frames, not held-out ones).
    Returns (variant name, allocation, measured error of every variant)."""
    variants = DEFAULT_VARIANTS if variants is None else variants
    reference = predict_actions(policy, frames) if reference is None else reference
    measured, allocations = {}, {}
    for name, kwargs in variants.items():
        allocations[name] = allocate(table, budget, **kwargs)
        with stored_weights(policy, allocations[name].bits):
            measured[name] = action_error(predict_actions(policy, frames), reference)
    best = min(measured, key=measured.get)
    return best, allocations[best], measured
