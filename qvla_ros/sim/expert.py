"""MetaWorld's scripted experts behind the policy contract.

The expert is the harness's own check: it runs through exactly the path a learned policy runs
through (`run_lockstep`, the worker pool, `evaluate`), so a broken seed rule, camera, success test
or batching bug shows up as the expert scoring below its known ~99%. It is privileged: it ignores
the images and reads each environment's true 39-float state, handed to it by `bind_envs` before
every call. It also writes the demonstrations.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from metaworld.policies import ENV_POLICY_MAP

from .env import ACTION_DIM, PROPRIO_DIM

__all__ = ["ExpertConfig", "ScriptedExpert", "ExpertFactory"]


@dataclass(frozen=True)
class ExpertConfig:
    """Shape of the expert's interface (the policy contract's `config`).

    Args:
        n_cams: None: any number of cameras (it ignores them).
        image_size: None: any size (it never looks at images).
        proprio_dim: proprio floats per observation.
        horizon: actions per chunk; the scripted controllers are reactive, so 1.
        action_dim: MetaWorld's 4-D action.
    """

    n_cams: int | None = None
    image_size: int | None = None
    proprio_dim: int = PROPRIO_DIM
    horizon: int = 1
    action_dim: int = ACTION_DIM


class ScriptedExpert:
    """`actions = expert(images, instruction, proprio)` -> float32 [B, 1, 4], in [-1, 1]."""

    def __init__(self):
        self.config = ExpertConfig()
        self._envs = None
        self._controllers = {}

    def bind_envs(self, envs) -> None:
        """The environments whose observations the next call receives, in batch order."""
        self._envs = list(envs)

    def _controller(self, env_name: str):
        if env_name not in self._controllers:
            self._controllers[env_name] = ENV_POLICY_MAP[env_name]()
        return self._controllers[env_name]

    def __call__(self, images, instruction, proprio) -> torch.Tensor:
        if self._envs is None or len(self._envs) != len(instruction):
            raise RuntimeError("the scripted expert reads the true state: bind_envs(envs) with one "
                               "environment per observation before calling it")
        out = np.empty((len(self._envs), 1, ACTION_DIM), np.float32)
        with warnings.catch_warnings():
            # The controllers warn whenever their gain saturates an action; clipping is intended.
            warnings.simplefilter("ignore", UserWarning)
            for row, env in enumerate(self._envs):
                action = self._controller(env.task.env_name).get_action(env.state)
                out[row, 0] = np.clip(action, -1.0, 1.0)
        self._envs = None
        return torch.from_numpy(out)


class ExpertFactory:
    """Picklable zero-argument factory of the scripted expert (for worker processes)."""

    def __call__(self) -> ScriptedExpert:
        return ScriptedExpert()

    def describe(self) -> dict:
        return {"kind": "scripted-expert", "source": "metaworld.policies, actions clipped to [-1, 1]"}
