"""Assembles one policy observation from separately arriving messages: the primary camera's
newest frame, the other cameras' and the proprio sample stamped closest to it, and the
instruction in force. No ROS here; the node feeds it from its callbacks and its worker thread
takes observations out.

Why stamps: the cameras and the state travel on separate topics, so the message of camera 2 (or
the proprio) that belongs to a frame can arrive just after it. Taking "the newest" would then pair
the frame with the previous state. The worker instead waits (up to `timeout`) for partners
stamped within `tolerance` of the primary frame; a negative tolerance turns this off and takes
the newest of each (for sources that do not stamp their messages).

A partner stamped before the frame may still be bettered by one stamped after it that is in
flight: at 30 Hz the previous frame of camera 2 is 33 ms older and inside a 50 ms tolerance, while
camera 2's frame of this instant arrives a millisecond later. So a match whose stream has nothing
stamped at or after the frame yet is provisional: the worker waits until a later sample arrives or
until the frame's arrival time plus the gap to that match (plus SETTLE_SLACK), the latest a closer
partner could arrive with the frame's own transport delay, and then takes the closest.

Only the newest primary frame is kept: one that is replaced before the worker takes it is
counted as dropped, so a slow policy skips stale frames and memory stays bounded.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Dropped", "Observation", "ObservationSync", "Stamped"]

# Recent samples kept per secondary stream: enough to cover a fast joint_states publisher over a
# policy forward, small enough to search linearly.
_HISTORY = 64
#: How much later than the primary frame a partner's transport may deliver it (seconds): the slack
#: on top of the stamp gap while a provisional partner waits to be bettered.
SETTLE_SLACK = 0.01


@dataclass(frozen=True)
class Stamped:
    """A message's content with its header stamp (seconds) and arrival time (time.monotonic)."""

    stamp: float
    value: Any
    arrival: float
    header: Any = None


@dataclass(frozen=True)
class Observation:
    """Everything one forward needs; `primary` carries the header the chunk will answer."""

    primary: Stamped  # value: uint8 [H, W, 3]
    images: np.ndarray  # uint8 [n_cams, H, W, 3]
    proprio: np.ndarray  # float32 [P]
    instruction: str


@dataclass(frozen=True)
class Dropped:
    """A primary frame given up on: `kind` names the missing part, `message` says it in words."""

    kind: str
    message: str


class ObservationSync:
    """See the module docstring. Thread-safe: callbacks call put_*, one worker calls next()."""

    def __init__(self, n_cams: int, tolerance: float = 0.05, timeout: float = 0.5):
        if n_cams < 1:
            raise ValueError(f"n_cams must be >= 1, got {n_cams}")
        self.n_cams = n_cams
        self.tolerance = tolerance
        self.timeout = timeout
        self._cond = threading.Condition()
        self._primary: Stamped | None = None
        self._seq = 0  # primary frames accepted so far
        self._taken = 0  # seq of the last primary frame handed out or given up on
        self.dropped = 0  # primary frames replaced before the worker took them
        self._cameras = [collections.deque(maxlen=4) for _ in range(n_cams - 1)]
        self._proprio: collections.deque[Stamped] = collections.deque(maxlen=_HISTORY)
        self._instruction: str | None = None
        self._stopped = False

    # Producers (executor callbacks) ------------------------------------------------------------
    def put_image(self, cam: int, frame: Stamped) -> None:
        with self._cond:
            if cam == 0:
                self._primary = frame
                self._seq += 1
            else:
                self._cameras[cam - 1].append(frame)
            self._cond.notify_all()

    def put_proprio(self, sample: Stamped) -> None:
        with self._cond:
            self._proprio.append(sample)
            self._cond.notify_all()

    def clear_proprio(self) -> None:
        """Forget every state sample (the last one was invalid: none older may stand in for it)."""
        with self._cond:
            self._proprio.clear()

    def put_instruction(self, text: str) -> None:
        with self._cond:
            self._instruction = text
            self._cond.notify_all()

    @property
    def instruction(self) -> str | None:
        return self._instruction

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def wake(self) -> None:
        """Let a waiting next() re-read its deadline (after a trigger change)."""
        with self._cond:
            self._cond.notify_all()

    # Consumer (the worker) ----------------------------------------------------------------------
    def next(self, not_before: float = 0.0) -> Observation | Dropped | None:
        """Block until a primary frame newer than the last one taken exists and time.monotonic()
        >= not_before; then wait for its partners. Returns the Observation, a Dropped naming what
        was missing after `timeout`, or None once stop() was called."""
        with self._cond:
            while True:
                while not self._stopped:
                    if self._seq != self._taken:
                        wait = not_before - time.monotonic()
                        if wait <= 0:
                            break
                    else:
                        wait = None
                    self._cond.wait(wait)
                if self._stopped:
                    return None
                self.dropped += self._seq - self._taken - 1
                self._taken = self._seq
                frame = self._primary
                deadline = time.monotonic() + self.timeout
                while True:
                    result, settle_by = self._assemble(frame)
                    if self._stopped:
                        return None
                    now = time.monotonic()
                    if isinstance(result, Observation) and (settle_by is None or now >= settle_by):
                        return result
                    if self._seq != self._taken:
                        self.dropped += 1  # a newer frame arrived while waiting: serve that one
                        break
                    until = deadline if settle_by is None else min(settle_by, deadline)
                    if until - now <= 0:
                        return result
                    self._cond.wait(until - now)

    def _assemble(self, frame: Stamped) -> tuple[Observation | Dropped, float | None]:
        """(the observation or what is missing, the monotonic time until which a provisional
        partner may still be bettered; None when every partner is final)."""
        if self._instruction is None:
            return Dropped("no_instruction", "no instruction received yet"), None
        images = [frame.value]
        settle_by = None
        for cam, history in enumerate(self._cameras, start=2):
            match = self._closest(history, frame.stamp)
            if match is None:
                return Dropped(f"no_image{cam}", self._missing(f"image{cam}", history, frame)), None
            images.append(match.value)
            settle_by = self._settle_by(history, match, frame, settle_by)
        proprio = self._closest(self._proprio, frame.stamp)
        if proprio is None:
            return Dropped("no_proprio", self._missing("proprio", self._proprio, frame)), None
        settle_by = self._settle_by(self._proprio, proprio, frame, settle_by)
        shapes = {im.shape for im in images}
        if len(shapes) != 1:
            return Dropped("camera_sizes", f"cameras differ in size: {sorted(shapes)}"), None
        return Observation(primary=frame, images=np.stack(images), proprio=proprio.value,
                           instruction=self._instruction), settle_by

    def _settle_by(self, history, match: Stamped, frame: Stamped, settle_by: float | None) -> float | None:
        """settle_by, later if `match` is provisional: nothing in its stream is stamped at or after
        the frame yet, so a closer sample (stamped less than the gap after the frame) may be in
        flight; it would arrive by the frame's arrival plus that gap, give or take SETTLE_SLACK."""
        gap = frame.stamp - match.stamp
        if self.tolerance < 0 or gap <= 0 or max(s.stamp for s in history) >= frame.stamp:
            return settle_by
        until = frame.arrival + gap + SETTLE_SLACK
        return until if settle_by is None else max(settle_by, until)

    def _closest(self, history, stamp: float) -> Stamped | None:
        if not history:
            return None
        if self.tolerance < 0:
            return history[-1]
        best = min(history, key=lambda s: abs(s.stamp - stamp))
        return best if abs(best.stamp - stamp) <= self.tolerance else None

    def _missing(self, what: str, history, frame: Stamped) -> str:
        if not history:
            return f"no valid {what} received yet"
        nearest = min(history, key=lambda s: abs(s.stamp - frame.stamp))
        return (f"no {what} stamped within {self.tolerance:g} s of the image "
                f"({frame.stamp:.3f} s; nearest {nearest.stamp:.3f} s) after waiting "
                f"{self.timeout:g} s")
