"""A node that spins itself in the background: the helper nodes that drive or watch the policy
node from a script or a test (feeder.Feeder, demo_monitor.DemoMonitor) while the caller's thread
waits on what they receive."""
from __future__ import annotations

import threading
from typing import TypeVar

from rclpy.executors import SingleThreadedExecutor

S = TypeVar("S", bound="SpinsInBackground")


class SpinsInBackground:
    """Mixed into an rclpy Node (before it: `class Feeder(SpinsInBackground, Node)`)."""

    _executor: SingleThreadedExecutor | None = None
    _thread: threading.Thread | None = None

    def spin_in_background(self: S) -> S:
        """Spins the node on its own executor in a daemon thread; returns the node."""
        self._executor = SingleThreadedExecutor()
        self._executor.add_node(self)
        self._thread = threading.Thread(target=self._executor.spin, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stops the executor (if spinning), waits up to 5 s for its thread, destroys the node."""
        if self._executor is not None:
            self._executor.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self.destroy_node()
