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
import time
import weakref

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from qvla_ros.ros.policy_node import NODE_NAME, PolicyNodeCore, _shut_down
from qvla_ros.ros.policy_server import PlanRejected


class ManagedPolicyNode(PolicyNodeCore, LifecycleNode):
    """See the module docstring."""

    _serving = False

    def __init__(self, **kwargs):
        LifecycleNode.__init__(self, NODE_NAME, **kwargs)
        self._setup_parameters()
        self.finalized = False
        self.get_logger().info("unconfigured: waiting for the configure transition "
                               f"({self.get_fully_qualified_name()}/change_state)")

    def _publisher(self, msg_type, topic: str, qos):
        return self.create_lifecycle_publisher(msg_type, topic, qos)

    def _ready_word(self) -> str:
        return "configured (inactive): loaded"

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
        # Until the shutdown transition (or SIGINT): then the process exits.
        while rclpy.ok() and not node.finalized:
            executor.spin_once(timeout_sec=0.2)
        if node.finalized:
            time.sleep(0.2)  # the change_state answer on its way out
            node.get_logger().info("finalized: exiting")
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None and node.server is not None:
            node._release()
        _shut_down(executor, node)
    return 0


if __name__ == "__main__":
    sys.exit(main())
