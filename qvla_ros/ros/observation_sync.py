"""Assembles one policy observation from separately arriving messages: the primary camera's
newest frame, the other cameras' and the proprio sample stamped closest to it, and the
instruction in force. No ROS here; the node feeds it from its callbacks and its worker thread
takes observations out.

Why stamps: the cameras and the state travel on separate topics, so the message of camera 2 (or
the proprio) that belongs to a frame can arrive just after it. Taking "the newest" would then pair
the frame with the previous state. The worker instead waits (up to `timeout`) for partners
stamped within `tolerance` of the primary frame; a negative tolerance turns this off and takes
the newest of each (for sources that do not stamp their messages).

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
                    result = self._assemble(frame)
                    if isinstance(result, Observation) or self._stopped:
                        return result if not self._stopped else None
                    if self._seq != self._taken:
                        self.dropped += 1  # a newer frame arrived while waiting: serve that one
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return result
                    self._cond.wait(remaining)

    def _assemble(self, frame: Stamped) -> Observation | Dropped:
        if self._instruction is None:
            return Dropped("no_instruction", "no instruction received yet")
        images = [frame.value]
        for cam, history in enumerate(self._cameras, start=2):
            match = self._closest(history, frame.stamp)
            if match is None:
                return Dropped(f"no_image{cam}", self._missing(f"image{cam}", history, frame))
            images.append(match.value)
        proprio = self._closest(self._proprio, frame.stamp)
        if proprio is None:
            return Dropped("no_proprio", self._missing("proprio", self._proprio, frame))
        shapes = {im.shape for im in images}
        if len(shapes) != 1:
            return Dropped("camera_sizes", f"cameras differ in size: {sorted(shapes)}")
        return Observation(primary=frame, images=np.stack(images), proprio=proprio.value,
                           instruction=self._instruction)

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
