"""Statistics of the benchmark: Wilson intervals for success rates, and the offline action error
of a policy on held-out demonstration frames (a seconds-long proxy for closed-loop success)."""
from __future__ import annotations

import math

import numpy as np
import torch

from .rollout import check_actions

__all__ = ["wilson_interval", "offline_action_error"]


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval (95% by default) of a binomial rate. Unlike the normal
    approximation it stays inside [0, 1] and is honest at 0/n and n/n, which is where a
    benchmark's best and worst tasks sit."""
    if trials <= 0:
        raise ValueError(f"trials must be > 0, got {trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in [0, {trials}], got {successes}")
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    # At 0/n and n/n the exact bound is 0 or 1; rounding would leave it a hair inside.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == trials else min(1.0, centre + half)
    return lo, hi


def _frames(dataset, horizon: int, stride: int, max_frames: int | None):
    """(images, instruction, proprio, target chunk) per sampled frame; the target is actions
    t..t+horizon-1, padded with the episode's last action (how training builds its samples)."""
    taken = 0
    for ep in dataset.episodes():
        actions = ep["actions"]
        t_len = len(actions)
        for t in range(0, t_len, stride):
            idx = np.minimum(np.arange(t, t + horizon), t_len - 1)
            yield ep["images"][t], ep["instruction"], ep["proprio"][t], actions[idx]
            taken += 1
            if max_frames is not None and taken >= max_frames:
                return


def offline_action_error(policy, dataset, stride: int = 5, max_frames: int | None = 2000,
                         batch_size: int = 32) -> dict:
    """Mean distance of the policy's action chunks to the demonstrations' actions (L1, what
    training's loss measures). The deviation of one policy from another, e.g. a quantized one from
    its float policy, is quant.action_error instead: another norm, for another question.

    Args:
        policy: object with the policy contract (`policy.config.horizon` sets the chunk length).
        dataset: a DemoDataset, normally `DemoDataset(path, split="val")` (held-out episodes).
        stride: use every `stride`-th frame of each episode.
        max_frames: stop after this many frames (None = all).

    Returns:
        {"l1": mean |a - a*| per action element, "l2": mean Euclidean distance per action step,
         "l1_first": l1 of the first action of each chunk (what is executed at once),
         "frames": frames used}
    """
    if stride < 1 or batch_size < 1:
        raise ValueError(f"stride and batch_size must be >= 1, got {stride}, {batch_size}")
    horizon = int(getattr(policy.config, "horizon", 1))
    sums = {"l1": 0.0, "l2": 0.0, "l1_first": 0.0}
    count = 0
    batch: list = []

    def flush():
        nonlocal count
        images = torch.from_numpy(np.stack([b[0] for b in batch]))
        proprio = torch.from_numpy(np.stack([b[2] for b in batch]).astype(np.float32))
        target = np.stack([b[3] for b in batch])
        with torch.inference_mode():
            out = policy(images, [b[1] for b in batch], proprio)
        pred = check_actions(out, len(batch), target.shape[-1], where=" (offline action error)")
        h = min(horizon, pred.shape[1])
        diff = pred[:, :h] - target[:, :h]
        sums["l1"] += float(np.abs(diff).mean(axis=(1, 2)).sum())
        sums["l2"] += float(np.linalg.norm(diff, axis=-1).mean(axis=1).sum())
        sums["l1_first"] += float(np.abs(diff[:, 0]).mean(axis=1).sum())
        count += len(batch)
        batch.clear()

    for frame in _frames(dataset, horizon, stride, max_frames):
        batch.append(frame)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if count == 0:
        raise ValueError(f"no frames to score: dataset {getattr(dataset, 'path', '')} split "
                         f"{getattr(dataset, 'split', '?')!r} is empty")
    return {**{k: v / count for k, v in sums.items()}, "frames": count}
