"""What the policy node knows of one camera topic's traffic, for its silent-camera check. No ROS.

A camera topic that has publishers but delivers nothing is a fault the node must report (a QoS
mismatch, frames too large for the DDS transport, a stalled driver). How long "nothing" is depends
on the camera: a 30 Hz camera that stops is silent after a fraction of a second, while a 2 Hz
overview camera or a 0.2 Hz inspection camera is not silent between two of its frames. So until
a camera has delivered two frames, it is silent after `timeout` (the node's image_timeout); from
then on after
    max(timeout, SILENT_PERIODS * the median of its recent frame intervals),
and the check follows a camera that changes its rate within RECENT frames.
"""
from __future__ import annotations

import collections
import statistics

__all__ = ["CameraWatch", "SILENT_PERIODS"]

SILENT_PERIODS = 5  # frame periods of its own a camera may miss before it is silent
RECENT = 20  # frame intervals the period is the median of


class CameraWatch:
    """arrived(now) from the input callback at each message; update(publishers, now) from the
    periodic graph check, which returns what changed: "silent", "again" (messages after a
    silence), "gone" (no publisher any more) or None. Times are time.monotonic() seconds."""

    def __init__(self, timeout: float):
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 s, got {timeout}")
        self.timeout = timeout
        self._intervals: collections.deque[float] = collections.deque(maxlen=RECENT)
        self.last_arrival: float | None = None
        self.since: float | None = None  # when publishers were (again) first seen
        self.publishers = 0
        self.silent = False
        self.quiet = 0.0  # s without a message, as of the last update

    def arrived(self, now: float) -> None:
        if self.last_arrival is not None:
            self._intervals.append(now - self.last_arrival)
        self.last_arrival = now

    @property
    def period(self) -> float | None:
        """Median of the recent frame intervals (s); None before two frames."""
        intervals = list(self._intervals)  # a copy: the input thread appends meanwhile
        return statistics.median(intervals) if intervals else None

    @property
    def rate_hz(self) -> float:
        period = self.period
        return 1.0 / period if period else 0.0

    @property
    def limit(self) -> float:
        """Seconds without a message after which the camera is silent."""
        period = self.period
        return self.timeout if period is None else max(self.timeout, SILENT_PERIODS * period)

    def update(self, publishers: int, now: float) -> str | None:
        self.publishers = publishers
        if publishers == 0:
            was_silent = self.silent
            # A camera that comes back is a new camera: its rate is learnt anew.
            self.since, self.silent, self.quiet = None, False, 0.0
            self._intervals.clear()
            self.last_arrival = None
            return "gone" if was_silent else None
        if self.since is None:
            self.since = now
        last = self.last_arrival
        self.quiet = now - (self.since if last is None else max(self.since, last))
        silent = self.quiet > self.limit
        change = ("silent" if silent and not self.silent else
                  "again" if self.silent and not silent else None)
        self.silent = silent
        return change
