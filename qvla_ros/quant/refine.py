"""Allocation checked in action space: correct the additive cost model where channels act together.

The knapsack adds per-channel costs, which assumes the action changes of different channels are
uncorrelated. Measured on the shipped policy, that holds for quantization noise but not for
pruning and very low widths inside one layer: removing many channels of, say, a key projection
shifts every attention logit the same way, so their action changes add up coherently and the
real damage exceeds the sum. This module measures it and feeds it back:

1. allocate with the table;
2. for every layer and every large-perturbation width w it was given, apply just those channels at
   w (weights replaced by what the packed layout stores) and compare the measured action error
   on calibration frames with the table's sum for them: factor[layer, w] = measured / predicted;
3. re-allocate with the table's (layer, w) columns scaled by those factors; repeat;
4. keep the allocation whose whole quantized policy has the lowest measured action error.

Everything is measured on calibration frames (never on held-out data), with real forwards.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

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


def action_error(policy: nn.Module, frames: CalibrationFrames, reference: torch.Tensor, batch: int = 32) -> float:
    """E over frames of ||A - A_ref||^2 over the chunk (the quantity the table estimates)."""
    return float((predict_actions(policy, frames, batch) - reference).pow(2).sum(dim=(1, 2)).mean())


@dataclass
class Refinement:
    allocation: Allocation
    measured_error: float
    history: list[dict[str, Any]] = field(default_factory=list)
    factors: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def report(self) -> dict[str, Any]:
        return {"measured_calibration_error": self.measured_error, "rounds": self.history,
                "coherence_factors": self.factors, "seconds": round(self.seconds, 1)}


def refine_allocation(policy: nn.Module, frames: CalibrationFrames, table: SensitivityTable, budget: float, *,
                      rounds: int = 2, widths: Sequence[int] = (0, 2), clip: tuple[float, float] = (0.5, 100.0),
                      progress: bool = True, **allocate_kwargs) -> Refinement:
    """Allocate, measure coherence per (layer, width) in action space, re-allocate; keep the best."""
    from tqdm.auto import tqdm

    started = time.time()
    policy.eval()
    reference = predict_actions(policy, frames)
    factors: dict[tuple[str, int], float] = {}
    current = table
    best: Refinement | None = None
    history = []
    for r in range(rounds + 1):
        a = allocate(current, budget, **allocate_kwargs)
        with stored_weights(policy, a.bits):
            measured = action_error(policy, frames, reference)
        history.append({"round": r, "measured_error": measured, "table_cost": a.cost,
                        "totals": {str(b): int(sum((v == b).sum() for v in a.bits.values())) for b in (0, 2, 3, 4, 8, 16)}})
        if best is None or measured < best.measured_error:
            best = Refinement(a, measured)
        if r == rounds:
            break
        jobs = [(name, w) for name, b in a.bits.items() for w in widths if (b == w).any()]
        for name, w in tqdm(jobs, desc=f"coherence round {r + 1}", disable=not progress):
            chosen = a.bits[name] == w
            predicted = float(table.costs[name][chosen, table.column(w)].sum())
            if predicted <= 0:
                continue
            with stored_weights(policy, {name: a.bits[name]}, only=(w,)):
                measured_one = action_error(policy, frames, reference)
            factors[(name, w)] = float(np.clip(measured_one / predicted, *clip))
        costs = {}
        for name, c in table.costs.items():
            c = c.copy()
            for w in widths:
                if (name, w) in factors:
                    c[:, table.column(w)] *= factors[(name, w)]
            costs[name] = c
        meta = dict(table.meta)
        meta["estimator"] = f"{table.meta.get('estimator', '?')}+coherence-corrected"
        current = SensitivityTable(table.bits, costs, dict(table.in_features), meta)
    best.history = history
    best.factors = {f"{n}@{w}": f for (n, w), f in factors.items()}
    best.seconds = time.time() - started
    return best


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
            measured[name] = action_error(policy, frames, reference)
    best = min(measured, key=measured.get)
    return best, allocations[best], measured
