"""The one action-error metric: how far a policy's action chunks are from reference chunks.

Normalization (the only one in the package): the squared Euclidean distance over the whole chunk,
every step and every action dimension summed, then averaged over frames,

    action_error = mean over frames of  sum_{t, d} (A[t, d] - A_ref[t, d])^2 .

It is the quantity the sensitivity table estimates, S[c, b] = E ||A(c at b bits) - A*||^2
(DESIGN.md step 3), and the quantity the knapsack adds up, so a measured error stands beside a
predicted one without a conversion factor. The per-element mean squared error is this divided by
horizon x action_dim; it is not computed anywhere, so figures never silently mix the two.

Distances to demonstrations (sim.metrics.offline_action_error: L1 against recorded actions, what
training's loss measures) are a different quantity and keep their own name.
"""
from __future__ import annotations

import torch

__all__ = ["action_error", "action_error_per_frame"]


def action_error_per_frame(actions: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """||A - A_ref||^2 summed over each chunk, float64 [frames]; inputs [frames, horizon, action_dim]."""
    if actions.shape != reference.shape or actions.dim() != 3:
        raise ValueError(f"action error compares chunks [frames, horizon, action_dim] of one shape, got "
                         f"{tuple(actions.shape)} against reference {tuple(reference.shape)}")
    diff = actions.detach().double() - reference.detach().to(actions.device).double()
    return diff.pow(2).sum(dim=(1, 2))


def action_error(actions: torch.Tensor, reference: torch.Tensor) -> float:
    """The action error (module docstring): mean over frames of the chunk's summed squared difference."""
    per_frame = action_error_per_frame(actions, reference)
    if per_frame.numel() == 0:
        raise ValueError("action error of no frames is undefined")
    return float(per_frame.mean())
