"""The policy the node serves, and the swap of its bit plan at run time. No ROS here: the node
feeds it numpy arrays and publishes what it returns.

One `ServedPolicy` (weights + the id of the plan that made them) is active at a time. A forward
reads the active one ONCE and uses it to the end, so a chunk always comes from one plan and
names it. A reload builds the new ServedPolicy beside the serving one (load, quantize, check its
shapes against the serving one, one probe forward) and only then replaces the reference; a
forward already running finishes on the old weights.

On a CUDA device the forward is a CUDA graph (qvla_ros.policy.graphed.GraphedForward), float
and quantized plans alike: the probe forward of the build IS the capture (a reload captures
before it swaps, so no frame pays for it), followed by a check of the graph against the eager
forward on another observation. A graph that cannot be captured or does not match is not an
error: that plan serves eagerly and `forward_mode` says why. The build takes turns with
forwards (forward_priority: a turn between two forwards, half a typical forward long), so a
reload delays no chunk by more than that and still ends in about three times its idle time when
forwards run back to back. One reload at a time; a second one asked for meanwhile is refused,
not queued.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .forward_priority import ForwardPriority

__all__ = ["FULL_PRECISION_ID", "Inference", "PlanRejected", "PolicyServer", "ServedPolicy"]

# plan_id of the unquantized policy (ActionChunk.plan_id: empty = full precision).
FULL_PRECISION_ID = ""

# Config fields a plan must leave unchanged so that the node's inputs and outputs still fit.
_INTERFACE_FIELDS = ("n_cams", "image_size", "proprio_dim", "horizon", "action_dim")


class PlanRejected(Exception):
    """A plan that will not be served; the message says why, in words a person can act on."""


@dataclass(frozen=True)
class ServedPolicy:
    """Weights ready to run and where they came from."""

    policy: Any  # honours the policy contract: policy(images, instruction, proprio) -> actions
    plan_id: str  # FULL_PRECISION_ID for the unquantized checkpoint
    plan_path: str  # "" for the unquantized checkpoint
    load_seconds: float
    runner: Any = None  # what infer calls: GraphedForward(policy); None = the policy itself

    @property
    def forward(self):
        return self.policy if self.runner is None else self.runner

    @property
    def forward_mode(self) -> str:
        """"cuda-graph" or "eager: <reason>"."""
        return getattr(self.runner, "forward_mode", "eager: not graphed")

    @property
    def config(self):
        return self.policy.config

    @property
    def label(self) -> str:
        return self.plan_id or "full precision"


@dataclass(frozen=True)
class Inference:
    """One forward: the chunk [horizon, action_dim], the plan that produced it, its wall time."""

    actions: np.ndarray
    plan_id: str
    seconds: float


def _load_policy(checkpoint: str, plan_path: str, device: str) -> tuple[Any, str]:
    """(policy, plan_id) for a checkpoint directory ("" = the shipped default; a quantized
    checkpoint carries its own plan) and a BitPlan file ("" = none)."""
    from qvla_ros.quant import load_quantized_policy

    policy = load_quantized_policy(checkpoint or None, plan_path or None, device=device)
    return policy.eval(), getattr(policy, "qvla_plan_id", None) or FULL_PRECISION_ID


class PolicyServer:
    """Runs the active policy on one observation at a time and swaps plans between forwards.

    checkpoint: policy checkpoint directory ("" = the shipped default); device: torch device;
    plan_path: BitPlan file to start with ("" = full precision); cuda_graph: False serves every
    plan eagerly. Raises PlanRejected when the starting plan cannot be served.
    """

    def __init__(self, checkpoint: str = "", device: str = "cpu", plan_path: str = "",
                 cuda_graph: bool = True):
        # Imported before the first load is timed (torch and transformers take seconds).
        import qvla_ros.quant.api  # noqa: F401

        self.checkpoint = checkpoint
        self.device = device
        self.cuda_graph = cuda_graph
        self._reload_lock = threading.Lock()
        self._reloading = ""
        self._priority = ForwardPriority()
        # Of the last reload: (s waited for forwards, turns, s the longest forward waited for one)
        self.last_reload_waits = (0.0, 0, 0.0)
        self._active = self._build(plan_path, reference=None)

    @property
    def active(self) -> ServedPolicy:
        return self._active

    @property
    def config(self):
        return self._active.config

    @property
    def forward_mode(self) -> str:
        """How the serving plan's forward runs: "cuda-graph" or "eager: <reason>"."""
        return self._active.forward_mode

    # Inference ----------------------------------------------------------------------------------
    def infer(self, images: np.ndarray, instruction: str, proprio: np.ndarray) -> Inference:
        """Chunk for one observation: images uint8 [n_cams, H, W, 3], proprio float32 [P]."""
        served = self._active  # one read: this forward uses one plan from start to end
        with self._priority.forward():
            # Timed inside: `seconds` is the forward; a wait for a reload's turn is latency.
            start = time.perf_counter()
            actions = self._forward(served.forward, images, instruction, proprio)
            seconds = time.perf_counter() - start
        return Inference(actions=actions, plan_id=served.plan_id, seconds=seconds)

    def _forward(self, policy, images: np.ndarray, instruction: str,
                 proprio: np.ndarray) -> np.ndarray:
        """policy (or a call with its arguments: GraphedForward.capture) on one observation, as
        numpy [horizon, action_dim]."""
        import torch

        with torch.inference_mode():
            out = policy(*self._batch(images, instruction, proprio))
        return out[0].float().cpu().numpy()

    def _batch(self, images: np.ndarray, instruction: str, proprio: np.ndarray):
        """The policy contract's arguments for one observation: a batch of one, on the device."""
        import torch

        image_batch = torch.from_numpy(np.ascontiguousarray(images))[None].to(self.device)
        proprio_batch = torch.from_numpy(np.asarray(proprio, dtype=np.float32))[None].to(self.device)
        return image_batch, [instruction], proprio_batch

    # Reload -------------------------------------------------------------------------------------
    def reload(self, plan_path: str) -> ServedPolicy:
        """Load, check and start serving `plan_path` ("" = full precision). Returns the new
        ServedPolicy. Raises PlanRejected (the old plan keeps serving) when the plan cannot be
        served or another reload is running."""
        if not self._reload_lock.acquire(blocking=False):
            raise PlanRejected(
                f"another reload (of {self._reloading or 'full precision'!r}) is in progress; "
                f"ask again when it has finished")
        try:
            self._reloading = plan_path
            waited, turns = self._priority.waited, self._priority.turns
            self._priority.forward_delay_max = 0.0
            try:
                with self._priority.background():
                    candidate = self._build(plan_path, reference=self._active)
            except PlanRejected:
                raise
            except Exception as exc:  # e.g. MemoryError outside the loader: still a refusal
                raise PlanRejected(f"plan {plan_path!r} could not be prepared: "
                                   f"{type(exc).__name__}: {exc}") from exc
            self._active = candidate  # the swap: one reference assignment, atomic for readers
            # Of the build's load_seconds, this long went to forwards it let run first; and the
            # longest a forward waited for one of its turns.
            self.last_reload_waits = (self._priority.waited - waited, self._priority.turns - turns,
                                      self._priority.forward_delay_max)
            return candidate
        finally:
            self._reloading = ""
            self._reload_lock.release()

    def _build(self, plan_path: str, reference: ServedPolicy | None) -> ServedPolicy:
        if plan_path and not os.path.isfile(plan_path):
            raise PlanRejected(f"no plan file at {plan_path!r}")
        start = time.perf_counter()
        try:
            policy, plan_id = _load_policy(self.checkpoint, plan_path, self.device)
        except Exception as exc:  # any loader failure is a refused plan, with its reason
            what = f"plan {plan_path!r}" if plan_path else "the full-precision checkpoint"
            raise PlanRejected(f"{what} cannot be loaded: {exc}") from exc
        from qvla_ros.policy.graphed import GraphedForward

        # lazy=False: only the probe below captures; a frame never does.
        runner = GraphedForward(policy, enabled=self.cuda_graph, lazy=False)
        served = ServedPolicy(policy=policy, plan_id=plan_id, plan_path=plan_path,
                              load_seconds=time.perf_counter() - start, runner=runner)
        self._check(served, reference)
        return served

    def _check(self, served: ServedPolicy, reference: ServedPolicy | None) -> None:
        """Refuse weights whose interface differs from the serving ones, or whose probe forward
        gives a chunk of the wrong shape or non-finite values. The probe captures the CUDA graph
        (its output is the eager forward's); the graph is then checked against eager on another
        observation and, if it differs, dropped for the eager forward (forward_mode says why)."""
        cfg = served.config
        if reference is not None:
            changed = [f"{name} {getattr(reference.config, name)} -> {getattr(cfg, name)}"
                       for name in _INTERFACE_FIELDS
                       if getattr(cfg, name) != getattr(reference.config, name)]
            if changed:
                raise PlanRejected(f"plan {served.plan_path!r} is for a policy with another "
                                   f"interface ({', '.join(changed)}); not swapped in")
        probe_images = np.zeros((cfg.n_cams, cfg.image_size, cfg.image_size, 3), np.uint8)
        probe_proprio = np.zeros(cfg.proprio_dim, np.float32)
        try:
            actions = self._forward(served.runner.capture, probe_images, "probe", probe_proprio)
        except Exception as exc:
            raise PlanRejected(f"{served.label}: probe forward failed: {exc}") from exc
        if actions.shape != (cfg.horizon, cfg.action_dim):
            raise PlanRejected(f"{served.label}: probe forward returned a chunk of shape "
                               f"{list(actions.shape)}, expected [{cfg.horizon}, {cfg.action_dim}]")
        if not np.isfinite(actions).all():
            raise PlanRejected(f"{served.label}: probe forward returned non-finite actions")
        if served.runner.graphed:
            rng = np.random.default_rng(0)
            images = rng.integers(0, 256, probe_images.shape, dtype=np.uint8)
            proprio = rng.standard_normal(cfg.proprio_dim).astype(np.float32)
            try:
                served.runner.verify(*self._batch(images, "check the graph", proprio))
            except Exception as exc:  # the graph is at fault, not the plan: serve eagerly
                served.runner.fall_back(f"check on fresh inputs raised {type(exc).__name__}: {exc}")

