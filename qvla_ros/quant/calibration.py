"""Calibration frames: observations (images, instruction, proprio) the sensitivity is averaged over.

They come from the benchmark's demonstrations (`qvla_ros.dataset.DemoDataset`, "train" split
by default, so held-out "val" frames stay unseen for the offline evaluation), sampled across
episodes and tasks with a fixed seed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class CalibrationFrames:
    """F observations in the policy contract's form (plus the demonstration's actions, if known).

    images uint8 [F, n_cams, H, W, 3]; instructions list of F str; proprio float32 [F, proprio_dim];
    actions float32 [F, action_dim] (the expert's action at that frame) or None.
    """
    images: torch.Tensor
    instructions: list[str]
    proprio: torch.Tensor
    actions: torch.Tensor | None = None
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        f = self.images.shape[0]
        if self.images.dtype != torch.uint8 or self.images.dim() != 5:
            raise ValueError(f"calibration images must be uint8 [F, n_cams, H, W, 3], got "
                             f"{self.images.dtype} {tuple(self.images.shape)}")
        if len(self.instructions) != f or self.proprio.shape[0] != f:
            raise ValueError(f"calibration frames disagree: {f} images, {len(self.instructions)} "
                             f"instructions, {self.proprio.shape[0]} proprio rows")
        if f == 0:
            raise ValueError("no calibration frames")

    def __len__(self) -> int:
        return self.images.shape[0]

    def select(self, index) -> "CalibrationFrames":
        idx = torch.as_tensor(index, dtype=torch.long).flatten()
        return CalibrationFrames(self.images[idx], [self.instructions[i] for i in idx.tolist()],
                                 self.proprio[idx], None if self.actions is None else self.actions[idx],
                                 dict(self.source))

    def inputs(self, replicas: int = 1) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """(images, instructions, proprio) for the policy, the F frames repeated `replicas` times,
        replica-major: row r * F + f is frame f of replica r."""
        if replicas == 1:
            return self.images, list(self.instructions), self.proprio
        return (self.images.repeat(replicas, 1, 1, 1, 1), list(self.instructions) * replicas,
                self.proprio.repeat(replicas, 1))


def frames_from_demos(path: str | Path, n_frames: int, split: str = "train", seed: int = 0) -> CalibrationFrames:
    """`n_frames` frames sampled from a demonstration folder: distinct episodes first (spread over
    tasks), then more frames per episode when there are fewer episodes than frames."""
    from ..dataset import DemoDataset

    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    dataset = DemoDataset(path, split=split)
    if len(dataset) == 0:
        raise ValueError(f"{path} has no {split!r} episodes to calibrate on")
    rng = np.random.default_rng(seed)
    n_eps = min(len(dataset), n_frames)
    episodes = np.sort(rng.choice(len(dataset), size=n_eps, replace=False))
    per_episode = np.full(n_eps, n_frames // n_eps)
    per_episode[: n_frames % n_eps] += 1
    images, proprio, actions, instructions, picked = [], [], [], [], []
    for e, k in zip(episodes.tolist(), per_episode.tolist()):
        ep = dataset[e]
        t = len(ep["actions"])
        times = np.sort(rng.choice(t, size=min(k, t), replace=False))
        images.append(ep["images"][times])
        proprio.append(ep["proprio"][times])
        actions.append(ep["actions"][times])
        instructions += [ep["instruction"]] * len(times)
        picked.append([ep["task"], ep["seed"], times.tolist()])
    source = {"data": str(path), "split": split, "seed": seed, "frames": sum(len(p[2]) for p in picked),
              "episodes": len(picked), "manifest_recipe": dataset.manifest.get("recipe")}
    return CalibrationFrames(torch.from_numpy(np.concatenate(images)), instructions,
                             torch.from_numpy(np.concatenate(proprio)), torch.from_numpy(np.concatenate(actions)),
                             source)


def synthetic_frames(config, n_frames: int, seed: int = 0,
                     instructions: tuple[str, ...] = ("open the drawer", "close the window",
                                                      "press the button", "turn on the faucet")) -> CalibrationFrames:
    """Random observations shaped for `config` (a policy config): for tests and for runs before
    any demonstrations exist. Smooth random images, so the vision encoder sees structure."""
    gen = torch.Generator().manual_seed(seed)
    s = config.image_size
    coarse = torch.randint(0, 256, (n_frames * config.n_cams, 3, 8, 8), generator=gen).float()
    images = torch.nn.functional.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8).reshape(n_frames, config.n_cams, 3, s, s)
    images = images.permute(0, 1, 3, 4, 2).contiguous()
    proprio = torch.randn(n_frames, config.proprio_dim, generator=gen) * 0.1
    chosen = [instructions[i % len(instructions)] for i in range(n_frames)]
    return CalibrationFrames(images, chosen, proprio, None, {"data": "synthetic", "seed": seed, "frames": n_frames})
