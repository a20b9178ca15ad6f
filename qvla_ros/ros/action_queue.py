"""Single actions at the robot's control rate from the policy's action chunks. No ROS here: the
node adds each chunk it publishes and asks for one action per control tick.

Time base: every chunk starts at the (monotonic) arrival of the image it answers, and its step k
belongs to the k-th control period after that. The first tick that sees a chunk puts its cursor
on the step of the period it falls in, so the steps that went by during the forward (the latency)
are skipped; from then on the cursor advances exactly one step per tick, so timer jitter never
skips or repeats a step. Monotonic arrival times, not header stamps, keep this independent of the
camera's clock.

Aggregation:
- "latest": the newest chunk, step by step (a new chunk replaces the old one at once).
- "temporal_ensemble": ACT's temporal ensembling (Zhao et al. 2023; LeRobot's
  ACTTemporalEnsembler): every live chunk's prediction for this tick, averaged with weights
  w_i = exp(-m * i), i = 0 for the OLDEST prediction. m > 0 favours older predictions (ACT's
  choice, smoother), m = 0 is a plain mean, m < 0 favours newer ones.

A chunk is live while it has a step left and is at most `stale_after` seconds old. When none is
live the queue is stale and answers as `on_stale` says: "hold" repeats the last action, "zero"
gives zeros. Before the first chunk there is no action at all (None).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["AGGREGATIONS", "ON_STALE", "Action", "ActionQueue"]

AGGREGATIONS = ("latest", "temporal_ensemble")
ON_STALE = ("hold", "zero")


@dataclass(frozen=True)
class Action:
    """One control tick's action and where it came from.

    header: the header of the image of the newest chunk that contributed (a stale action keeps
    the one of the action it holds or replaces); plan_id, instruction, inference_time: of that
    chunk; age: seconds from that image's arrival to this tick; stale: no live chunk; chunks:
    how many chunks were averaged; step: the step of the newest contributing chunk."""

    values: np.ndarray  # float32 [action_dim]
    header: Any
    plan_id: str
    instruction: str
    inference_time: float
    age: float
    stale: bool
    chunks: int
    step: int


@dataclass
class _Chunk:
    actions: np.ndarray  # float32 [horizon, action_dim]
    start: float  # monotonic arrival of the image the chunk answers
    added: float  # monotonic time the chunk was added
    header: Any
    plan_id: str
    instruction: str
    inference_time: float
    cursor: int | None = None  # set by the first tick that sees the chunk


class ActionQueue:
    """See the module docstring. Thread-safe: `add` from the inference thread, `next` from the
    control timer."""

    def __init__(self, rate_hz: float, aggregation: str = "latest", ensemble_m: float = 0.01,
                 stale_after: float = 0.5, on_stale: str = "hold"):
        if not rate_hz > 0:
            raise ValueError(f"rate_hz must be > 0, got {rate_hz}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, "
                             f"got {aggregation!r}")
        if on_stale not in ON_STALE:
            raise ValueError(f"on_stale must be one of {', '.join(ON_STALE)}, got {on_stale!r}")
        if not math.isfinite(ensemble_m):
            raise ValueError(f"ensemble_m must be finite, got {ensemble_m}")
        if not stale_after > 0:
            raise ValueError(f"stale_after must be > 0, got {stale_after}")
        self.period = 1.0 / rate_hz
        self.aggregation = aggregation
        self.m = float(ensemble_m)
        self.stale_after = float(stale_after)
        self.on_stale = on_stale
        self._lock = threading.Lock()
        self._chunks: list[_Chunk] = []  # oldest first
        self._last: Action | None = None
        self._last_start = 0.0
        self.stale = False  # the state of the last tick
        self.ticks = 0
        self.stale_ticks = 0

    def clear(self) -> None:
        """Forget every chunk and the last action (a node that stops serving): the next tick
        gives None until a chunk comes."""
        with self._lock:
            self._chunks, self._last, self.stale = [], None, False

    def add(self, actions: np.ndarray, start: float, now: float, header: Any = None,
            plan_id: str = "", instruction: str = "", inference_time: float = 0.0) -> None:
        """A chunk [horizon, action_dim] whose image arrived at `start` (monotonic seconds)."""
        actions = np.asarray(actions, np.float32)
        if actions.ndim != 2 or 0 in actions.shape:
            raise ValueError(f"a chunk is [horizon, action_dim], got shape {list(actions.shape)}")
        chunk = _Chunk(actions.copy(), float(start), float(now), header, plan_id, instruction,
                       float(inference_time))
        with self._lock:
            if self._chunks and self._chunks[-1].actions.shape[1] != actions.shape[1]:
                raise ValueError(f"action_dim changed from {self._chunks[-1].actions.shape[1]} "
                                 f"to {actions.shape[1]}")
            if self.aggregation == "latest":
                self._chunks = [chunk]
            else:
                self._chunks.append(chunk)

    def next(self, now: float) -> Action | None:
        """The action of the control tick at `now` (monotonic seconds); None before any chunk."""
        with self._lock:
            self.ticks += 1
            live = []
            for chunk in self._chunks:
                if chunk.cursor is None:
                    chunk.cursor = max(0, int(math.floor((now - chunk.start) / self.period
                                                         + 1e-9)))
                else:
                    chunk.cursor += 1
                if chunk.cursor < len(chunk.actions) and now - chunk.added <= self.stale_after:
                    live.append(chunk)
            # Exhausted or too old chunks never come back.
            self._chunks = live
            if not live:
                return self._stale(now)
            self.stale = False
            newest = live[-1]
            if len(live) == 1:
                values = newest.actions[newest.cursor].copy()
            else:
                # i = 0 for the oldest prediction (ACT / LeRobot).
                weights = np.exp(-self.m * np.arange(len(live), dtype=np.float64))
                rows = np.stack([c.actions[c.cursor] for c in live]).astype(np.float64)
                values = ((weights[:, None] * rows).sum(0) / weights.sum()).astype(np.float32)
            action = Action(values=values, header=newest.header, plan_id=newest.plan_id,
                            instruction=newest.instruction,
                            inference_time=newest.inference_time, age=now - newest.start,
                            stale=False, chunks=len(live), step=newest.cursor)
            self._last, self._last_start = action, newest.start
            return action

    def _stale(self, now: float) -> Action | None:
        last = self._last
        if last is None:
            return None
        self.stale = True
        self.stale_ticks += 1
        values = last.values if self.on_stale == "hold" else np.zeros_like(last.values)
        # The age keeps growing from the image the held action came from.
        return Action(values=values.copy(), header=last.header, plan_id=last.plan_id,
                      instruction=last.instruction, inference_time=last.inference_time,
                      age=now - self._last_start, stale=True, chunks=0, step=-1)
