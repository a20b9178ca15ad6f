"""Forwards and a plan reload's build take turns: the build runs between forwards, not beside them.

A reload builds the new policy in Python (checkpoint, plan, quantization, packing, probe forward)
on a thread beside the inference worker. Run freely beside a forward, each of the forward's torch
ops must win the GIL back from the build: on the 2-core CPU the shipped tiny policy's forward went
from 36 to 115-120 ms (three frames of a 30 Hz stream without a chunk). Stepping aside for the
whole of every forward (the previous scheme: wait up to 0.25 s for a forward to end, then run
0.05 s) starves the build whenever forwards run back to back, which they do as soon as the
forward is slower than the frame period: the build got ~1/6 of the time and a reload under a
30 Hz stream took 2.4-5.7 s here, 15-22 s on a loaded machine, against 0.3-0.4 s idle.

So the two alternate. When a forward ends, the build gets a turn of
    max(min_turn, share * the median of the last forwards' durations)
and the next forward waits for the turn to end (or for the build to finish). During its turn
the build runs alone; when the turn is over, at its next Python call (a profile hook on the
build's thread only: sys.setprofile acts on the calling thread), it yields to a forward that runs
or waits. With none (the worker waits for a frame, or is between two forwards) it goes on in
`poll`-long steps, so a forward that comes then waits no longer than one step. A chunk is thus
delayed by at most one turn (a median, so one slow forward does not earn a long turn), and the
build progresses at least share / (1 + share) of the time even when forwards run back to back.
A forward longer than max_wait does not hold the build up longer than that. One C call inside
the build (a large tensor op) cannot be interrupted; in the tiny policy's build none lasts 2 ms.
"""
from __future__ import annotations

import collections
import statistics
import sys
import threading
import time
from contextlib import contextmanager

__all__ = ["ForwardPriority"]

MIN_TURN = 0.005  # s: the shortest turn the build gets after a forward
SHARE = 0.5  # a turn lasts this fraction of a typical forward, if that is longer
POLL = 0.002  # s: steps of the build while no forward runs or waits
MAX_WAIT = 0.25  # s: longest the build waits for one forward before it takes a turn anyway
RECENT = 8  # forwards whose median duration is the typical forward


class ForwardPriority:
    """`with priority.forward():` around each forward; `with priority.background():` around work
    that must not slow forwards down (on the thread that does it). Counters for reports:
    `waited` (s the background spent waiting for forwards), `turns` (turns it was given),
    `forward_delay_max` (s, the longest a forward waited for a turn to end)."""

    def __init__(self, min_turn: float = MIN_TURN, share: float = SHARE, poll: float = POLL,
                 max_wait: float = MAX_WAIT):
        if min_turn <= 0 or share < 0 or poll <= 0 or max_wait <= 0:
            raise ValueError(f"min_turn {min_turn}, poll {poll} and max_wait {max_wait} must be "
                             f"> 0, share {share} >= 0")
        self.min_turn = min_turn
        self.share = share
        self.poll = poll
        self.max_wait = max_wait
        self._cond = threading.Condition()
        self._running = 0  # forwards in progress
        self._queued = 0  # forwards waiting for the background's turn to end
        self._background = 0  # threads inside background()
        self._recent = collections.deque(maxlen=RECENT)  # s, the last forwards' durations
        # monotonic time at which the background's current turn ends; 0 = not in a turn. Read
        # without the lock on the hook's fast path (a float attribute: one atomic load).
        self._turn_end = 0.0
        self.waited = 0.0
        self.turns = 0
        self.forward_delay_max = 0.0

    def _turn(self) -> float:
        return max(self.min_turn, self.share * statistics.median(self._recent))

    @contextmanager
    def forward(self):
        with self._cond:
            queued_at = time.monotonic()
            self._queued += 1
            # The background's turn ends at its deadline (earlier if it finishes or yields).
            while self._turn_end > time.monotonic():
                self._cond.wait(self._turn_end - time.monotonic())
            self._queued -= 1
            self._running += 1
            self.forward_delay_max = max(self.forward_delay_max, time.monotonic() - queued_at)
        start = time.monotonic()
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._recent.append(time.monotonic() - start)
                if not self._running and self._background:
                    # Hand the next turn to the background here, not when its thread wakes: by
                    # then the worker has started the next forward.
                    self._turn_end = time.monotonic() + self._turn()
                    self.turns += 1
                self._cond.notify_all()

    @contextmanager
    def background(self):
        def take_turns(frame, event, arg):  # not itself profiled: hooks do not nest
            if event != "call" or time.monotonic() < self._turn_end:
                return
            with self._cond:
                now = time.monotonic()
                if now < self._turn_end:
                    return  # a forward's end handed a new turn meanwhile
                if not self._running and not self._queued:
                    self._turn_end = now + self.poll  # nobody to yield to: one more step
                    return
                self._turn_end = 0.0  # yield: a queued forward starts now
                self._cond.notify_all()
                if not self._cond.wait_for(lambda: self._turn_end > time.monotonic(),
                                           timeout=self.max_wait):
                    # A forward longer than max_wait: a turn beside it, so the build ends.
                    self._turn_end = time.monotonic() + self.min_turn
                    self.turns += 1
                self.waited += time.monotonic() - now

        with self._cond:
            self._background += 1  # its first call yields to a forward that runs or waits
        previous = sys.getprofile()
        sys.setprofile(take_turns)
        try:
            yield
        finally:
            sys.setprofile(previous)
            with self._cond:
                self._background -= 1
                self._turn_end = 0.0  # done: a forward waiting for this turn starts now
                self._cond.notify_all()
