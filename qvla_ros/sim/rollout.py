"""Closed-loop rollouts of one policy on a batch of environments stepped in lockstep.

Each environment asks the policy for a new action chunk only when its queue of actions is empty;
all environments that need one at the same step share ONE batched policy call. A chunk of
`horizon` actions is executed open-loop for `replan_steps` steps (at most the horizon), then the
policy is asked again. Cameras are rendered only for observations the policy (or a recorder)
will read: with 8-step chunks that is one step in eight.

The action size is the environments' (`env.action_dim`: MetaWorld 4, LIBERO 7); a policy whose
chunks have another is refused at its first call (PolicyOutputError).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

if TYPE_CHECKING:  # no simulator import at run time: LIBERO runs need no MetaWorld
    from .env import SuiteEnv

__all__ = ["PolicyOutputError", "EpisodeResult", "Trajectory", "check_actions", "run_lockstep"]


class PolicyOutputError(ValueError):
    """The policy returned something that is not a [B, horizon, action_dim] finite action chunk."""


@dataclass
class EpisodeResult:
    task: str
    seed: int
    success: bool
    steps: int   # steps taken (the success step, or max_steps)

    def to_dict(self) -> dict:
        return {"task": self.task, "seed": self.seed, "success": self.success, "steps": self.steps}


@dataclass
class Trajectory:
    """What a recorder keeps of one episode: the observation before each action, and the action."""

    images: list = field(default_factory=list)
    proprio: list = field(default_factory=list)
    actions: list = field(default_factory=list)


def check_actions(out, batch: int, action_dim: int, where: str = "") -> np.ndarray:
    """The policy's output as float32 numpy [batch, horizon, action_dim], or PolicyOutputError."""
    if isinstance(out, torch.Tensor):
        out = out.detach().to("cpu", torch.float32).numpy()
    elif isinstance(out, np.ndarray):
        out = out.astype(np.float32, copy=False)
    else:
        raise PolicyOutputError(f"policy returned {type(out).__name__}{where}; expected a tensor "
                                f"[{batch}, horizon, {action_dim}]")
    if out.ndim != 3 or out.shape[0] != batch or out.shape[2] != action_dim or out.shape[1] < 1:
        raise PolicyOutputError(f"policy returned actions of shape {tuple(out.shape)}{where}; "
                                f"expected [{batch}, horizon>=1, {action_dim}]")
    if not np.all(np.isfinite(out)):
        bad = int((~np.isfinite(out)).any(axis=(1, 2)).sum())
        raise PolicyOutputError(f"policy returned NaN or infinite actions for {bad} of {batch} "
                                f"observations{where}")
    return out


def run_lockstep(policy, envs: Sequence["SuiteEnv"], seeds: Sequence[int],
                 replan_steps: int | None = None, record: bool = False,
                 on_episode_end: Callable[[int, EpisodeResult, Trajectory | None], None] | None = None,
                 ) -> list[EpisodeResult]:
    """Run one episode on each env (env i from seeds[i]) until success or its max_steps.

    Args:
        policy: object with the policy contract. A policy with `bind_envs(envs)` (the scripted
            expert) is handed the environments of each call first, to read their true state.
        replan_steps: actions executed from each chunk before asking again; None = whole chunk.
        record: keep each episode's observations and actions (for demonstrations).
        on_episode_end: called as each episode ends, with its index, result and trajectory.
    """
    if len(envs) != len(seeds):
        raise ValueError(f"{len(envs)} environments but {len(seeds)} seeds")
    if replan_steps is not None and replan_steps < 1:
        raise ValueError(f"replan_steps must be >= 1, got {replan_steps}")
    n = len(envs)
    dims = {int(env.action_dim) for env in envs}
    if len(dims) > 1:
        raise ValueError(f"environments of one batch take actions of different sizes {sorted(dims)}")
    action_dim = dims.pop() if dims else 0
    obs = [env.reset(seed) for env, seed in zip(envs, seeds)]
    queues = [deque() for _ in range(n)]
    trajs = [Trajectory() if record else None for _ in range(n)]
    results: list[EpisodeResult | None] = [None] * n
    bind = getattr(policy, "bind_envs", None)

    while any(r is None for r in results):
        active = [i for i in range(n) if results[i] is None]
        need = [i for i in active if not queues[i]]
        if need:
            images = torch.from_numpy(np.stack([obs[i]["images"] for i in need]))
            proprio = torch.from_numpy(np.stack([obs[i]["proprio"] for i in need]))
            instruction = [obs[i]["instruction"] for i in need]
            if bind is not None:
                bind([envs[i] for i in need])
            with torch.inference_mode():
                out = policy(images, instruction, proprio)
            tasks = sorted({envs[i].task.name for i in need})
            chunk = check_actions(out, len(need), action_dim, where=f" (tasks {', '.join(tasks)})")
            keep = chunk.shape[1] if replan_steps is None else min(replan_steps, chunk.shape[1])
            for row, i in enumerate(need):
                queues[i].extend(chunk[row, :keep])
        for i in active:
            action = queues[i].popleft()
            if record:
                trajs[i].images.append(obs[i]["images"])
                trajs[i].proprio.append(obs[i]["proprio"])
                trajs[i].actions.append(np.clip(action, -1.0, 1.0).astype(np.float32))
            env = envs[i]
            # Render the next observation only if someone will look at it.
            look = record or not queues[i]
            obs[i], success = env.step(action, render=look)
            if success or env.done_by_time:
                results[i] = EpisodeResult(env.task.name, int(seeds[i]), bool(success), env.steps)
                queues[i].clear()
                if on_episode_end is not None:
                    on_episode_end(i, results[i], trajs[i])
                trajs[i] = None
    return results  # type: ignore[return-value]
