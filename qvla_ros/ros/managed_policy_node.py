"""qvla_managed_policy_node: the policy node as a ROS 2 managed (lifecycle) node. Same topics,
service and parameters as qvla_policy_node (qvla_ros/ros/policy_node.py); what it does depends
on its lifecycle state, driven through the standard services ~/change_state, ~/get_state
(lifecycle_msgs) by launch/qvla_managed.launch.py, a robot's lifecycle manager or
`ros2 lifecycle set`:

    unconfigured  parameters only (they may still be set); no policy in memory, no topics
    configure     loads and checks the policy and plan (the probe forward; a plan refused, a bad
                  parameter or checkpoint: the transition fails with the reason logged and the
                  node stays unconfigured), creates the topics, service and worker
    inactive      subscribed, instruction and proprio kept, camera frames ignored; nothing
                  published on action_chunk / action (lifecycle publishers); diagnostics WARN
    activate      serves: frames in, chunks (and actions at control_rate_hz) out
    deactivate    stops serving and publishing; the control queue is emptied
    cleanup       destroys topics, service and worker and frees the policy (its weights, and the
                  CUDA cache on a GPU); back to unconfigured
    shutdown      from any state: releases everything; the process then exits

The plain qvla_policy_node stays for simple use: it serves from start to stop.
"""
from __future__ import annotations

import faulthandler
import gc
import os
import sys
import threading
import time
import weakref

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from qvla_ros.ros.policy_node import NODE_NAME, PolicyNodeCore, _shut_down
from qvla_ros.ros.policy_server import PlanRejected


class SpinThreadCalls:
    """Runs calls on the thread that spins the executor, between two of its spin_once() calls.

    The transitions run in executor callbacks, on MultiThreadedExecutor's pool threads, while the
    spinning thread builds the next wait set from the node's entity lists. rclpy enters each
    entity's handle, then enters an event handler (the QoS events every publisher and subscription
    has) a second time to add it to the wait set; destroying the entity from another thread in
    between (cleanup, shutdown, a failed configure) makes that second enter raise InvalidHandle
    ("cannot use Destroyable because destruction was requested") out of spin_once(), and the node
    process dies: no more get_state or change_state answers (ros2/rclpy#1142, #1206 report the
    same race). On the spinning thread itself, between two spin_once() calls, nothing builds a
    wait set: destroying there is safe (an entity still entered in a suspended wait is destroyed
    when the executor lets it go).

    Until bind() and after close() (no thread spins), calls run at once on the caller's thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: list = []
        self._thread: int | None = None

    def bind(self) -> None:
        """The calling thread spins from now on and calls run_pending() between spin_once()s."""
        with self._lock:
            self._thread = threading.get_ident()

    def call(self, fn, *args):
        """fn(*args) on the spinning thread; waits for it and returns its result (or raises)."""
        done = threading.Event()
        outcome: dict = {}
        with self._lock:
            here = self._thread is None or self._thread == threading.get_ident()
            if not here:
                self._pending.append((fn, args, outcome, done))
        if here:
            return fn(*args)
        done.wait()
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("result")

    def run_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for fn, args, outcome, done in pending:
            try:
                outcome["result"] = fn(*args)
            except BaseException as exc:  # handed to the waiting caller
                outcome["error"] = exc
            finally:
                done.set()

    def close(self) -> None:
        """No thread spins any more: run what is queued; later calls run on their caller."""
        with self._lock:
            self._thread = None
        self.run_pending()


class ManagedPolicyNode(PolicyNodeCore, LifecycleNode):
    """See the module docstring. Its entities are destroyed on the spinning thread (main() binds
    `spin_thread`): see SpinThreadCalls."""

    _serving = False

    def __init__(self, **kwargs):
        self.spin_thread = SpinThreadCalls()
        LifecycleNode.__init__(self, NODE_NAME, **kwargs)
        self._setup_parameters()
        self.finalized = False
        self.get_logger().info("unconfigured: waiting for the configure transition "
                               f"({self.get_fully_qualified_name()}/change_state)")

    def _publisher(self, msg_type, topic: str, qos):
        return self.create_lifecycle_publisher(msg_type, topic, qos)

    def _ready_word(self) -> str:
        return "configured (inactive): loaded"

    def _release(self) -> None:
        # Called from the transitions (executor callbacks): destroy on the spinning thread.
        self.spin_thread.call(super()._release)

    # Transitions --------------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._configure()
        except (PlanRejected, ValueError, FileNotFoundError) as exc:
            self._release()
            self.get_logger().error(f"configure failed: {exc}; still unconfigured")
            return TransitionCallbackReturn.FAILURE
        # What the policy built stays until cleanup: keep full collections off it (see main()
        # of policy_node), unfrozen again at cleanup so that it can be freed.
        gc.freeze()
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self.action_queue is not None:
            self.action_queue.clear()
        self._serving = True
        self.get_logger().info(f"active: serving {self.server.active.label}")
        # Enables the lifecycle publishers.
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._serving = False
        if self.action_queue is not None:
            self.action_queue.clear()
        self.get_logger().info("inactive: not serving (frames ignored, nothing published)")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._free("cleanup")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._serving = False
        if self.server is not None:
            self._free("shutdown")
        self.finalized = True
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._serving = False
        self._free("error")
        return TransitionCallbackReturn.SUCCESS

    def _free(self, why: str) -> None:
        """Release everything _configure made and check that the policy's weights are gone."""
        self._serving = False
        server = self.server
        device = self.get_parameter("device").value
        policy = weakref.ref(server.active.policy) if server is not None else None
        del server
        self._release()
        gc.unfreeze()
        gc.collect()
        cuda = ""
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
            cuda = f"; {torch.cuda.memory_allocated(device) / 2 ** 20:.0f} MiB allocated on {device}"
        if policy is None:
            self.get_logger().info(f"{why}: nothing was loaded")
        elif policy() is None:
            self.get_logger().info(f"{why}: policy freed{cuda}; unconfigured")
        else:
            self.get_logger().warning(f"{why}: the policy is still referenced ({len(gc.get_referrers(policy()))} referrer(s)); its memory is not freed{cuda}")


def main(args: list[str] | None = None) -> int:
    faulthandler.enable()
    sys.setswitchinterval(0.0005)  # see policy_node.main
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(2 ** 26))
    rclpy.init(args=args if args is not None else sys.argv)
    node = executor = None
    try:
        executor = MultiThreadedExecutor(num_threads=4)
        node = ManagedPolicyNode()
        executor.add_node(node)
        node.spin_thread.bind()
        # Until the shutdown transition (or SIGINT): then the process exits. Between two turns,
        # what the transitions asked to run here (destroying entities; see SpinThreadCalls).
        while rclpy.ok() and not node.finalized:
            executor.spin_once(timeout_sec=0.2)
            node.spin_thread.run_pending()
        if node.finalized:
            time.sleep(0.2)  # the change_state answer on its way out
            node.get_logger().info("finalized: exiting")
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.spin_thread.close()
            if node.server is not None:
                node._release()
        _shut_down(executor, node)
    return 0


if __name__ == "__main__":
    sys.exit(main())
