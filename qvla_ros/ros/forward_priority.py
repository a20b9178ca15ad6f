"""Forwards first: a plan reload's build steps aside while a forward runs.

A reload builds the new policy in Python (checkpoint, plan, quantization, packing) on a thread
beside the inference worker. Each torch op of a forward gives the GIL up and must win it back from
that build, so a forward of a few hundred ops beside a build stalls for tens to hundreds of ms:
several frames of a 30 Hz stream go without a chunk. Here the build thread carries a profile hook
(sys.setprofile acts on the calling thread only) that, at its next Python call, waits while a
forward is running, so a forward runs as if no reload were happening and the build uses the time
between forwards.

A policy slower than its frame rate runs forwards back to back; a build that always waited would
then never finish. After waiting MAX_WAIT for one forward the build runs unyielding for
FREE_SLICE, so it progresses at least FREE_SLICE / (MAX_WAIT + FREE_SLICE) of the time.
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager

__all__ = ["ForwardPriority"]

MAX_WAIT = 0.25  # s: longest a build waits for one forward to end
FREE_SLICE = 0.05  # s: then the build runs this long without yielding


class ForwardPriority:
    """`with priority.forward():` around each forward; `with priority.background():` around work
    that must not slow forwards down (on the thread that does it)."""

    def __init__(self, max_wait: float = MAX_WAIT, free_slice: float = FREE_SLICE):
        self.max_wait = max_wait
        self.free_slice = free_slice
        self._idle = threading.Condition()
        self._running = 0  # forwards in progress
        self.waited = 0.0  # s the background work has spent waiting, over its lifetime

    @contextmanager
    def forward(self):
        with self._idle:
            self._running += 1
        try:
            yield
        finally:
            with self._idle:
                self._running -= 1
                if not self._running:
                    self._idle.notify_all()

    @contextmanager
    def background(self):
        free_until = 0.0

        def step_aside(frame, event, arg):  # not itself profiled: hooks do not nest
            nonlocal free_until
            if not self._running or event != "call":
                return
            now = time.monotonic()
            if now < free_until:
                return
            with self._idle:
                if not self._idle.wait_for(lambda: not self._running, timeout=self.max_wait):
                    free_until = time.monotonic() + self.free_slice
            self.waited += time.monotonic() - now

        previous = sys.getprofile()
        sys.setprofile(step_aside)
        try:
            yield
        finally:
            sys.setprofile(previous)
