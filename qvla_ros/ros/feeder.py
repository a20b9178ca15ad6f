"""An in-process node that plays a robot to a policy node: publishes camera frames, proprio and
the instruction, collects the action chunks that come back, and calls `~/reload_plan`. The tests
and bench/ros drive qvla_policy_node with it.

Spin it in a background executor (`Feeder.spin_in_background()`): publishing and receiving then
happen while the caller waits.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import rclpy
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String

from qvla_ros.msg import ActionChunk
from qvla_ros.ros.background_spin import SpinsInBackground
from qvla_ros.ros.image_conversion import array_to_image
from qvla_ros.ros.topics import CHUNK_QOS, INSTRUCTION_QOS, PROPRIO_NAMES
from qvla_ros.srv import ReloadPlan

@dataclass(frozen=True)
class Received:
    """An action chunk and when it arrived (time.monotonic)."""

    chunk: ActionChunk
    arrival: float

    @property
    def stamp(self) -> tuple[int, int]:
        return self.chunk.header.stamp.sec, self.chunk.header.stamp.nanosec

    @property
    def actions(self) -> np.ndarray:
        return np.asarray(self.chunk.actions, np.float32).reshape(self.chunk.horizon,
                                                                   self.chunk.action_dim)


class Feeder(SpinsInBackground, Node):
    """See the module docstring. `policy_node` is the policy node's name, for its service."""

    def __init__(self, policy_node: str = "qvla_policy_node", name: str = "qvla_feeder"):
        super().__init__(name)
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.image_pubs = [self.create_publisher(Image, topic, reliable)
                           for topic in ("image", "image2")]
        self.proprio_pub = self.create_publisher(JointState, "proprio", reliable)
        self.instruction_pub = self.create_publisher(String, "instruction", INSTRUCTION_QOS)
        self.received: list[Received] = []
        self._cond = threading.Condition()
        self.create_subscription(ActionChunk, "action_chunk", self._on_chunk, CHUNK_QOS)
        self.reload_client = self.create_client(ReloadPlan, f"/{policy_node}/reload_plan")

    def _on_chunk(self, msg: ActionChunk) -> None:
        with self._cond:
            self.received.append(Received(msg, time.monotonic()))
            self._cond.notify_all()


    # Publishing ---------------------------------------------------------------------------------
    def wait_for_policy_node(self, timeout: float = 60.0) -> None:
        """Until the policy node subscribes to our topics and publishes chunks (DDS discovery)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.image_pubs[0].get_subscription_count() > 0
                    and self.proprio_pub.get_subscription_count() > 0
                    and self.count_publishers("action_chunk") > 0):
                return
            time.sleep(0.05)
        raise TimeoutError(f"no policy node on image/proprio/action_chunk within {timeout} s")

    def send_instruction(self, text: str) -> None:
        self.instruction_pub.publish(String(data=text))

    def send_proprio(self, values, stamp, names=PROPRIO_NAMES) -> None:
        msg = JointState()
        msg.header.stamp = stamp
        msg.name = list(names)
        msg.position = [float(v) for v in values]
        self.proprio_pub.publish(msg)

    def send_image(self, pixels_or_msg, stamp, cam: int = 0, encoding: str = "rgb8",
                   frame_id: str = "camera") -> None:
        msg = pixels_or_msg if isinstance(pixels_or_msg, Image) else array_to_image(
            pixels_or_msg, encoding)
        msg.header.stamp = stamp
        msg.header.frame_id = frame_id
        self.image_pubs[cam].publish(msg)

    def send_observation(self, images: np.ndarray, proprio, stamp=None):
        """Proprio, then every camera but the first, then the first (which triggers the forward),
        all with one stamp (now by default). Returns the stamp."""
        stamp = stamp if stamp is not None else self.get_clock().now().to_msg()
        self.send_proprio(proprio, stamp)
        for cam in range(len(images) - 1, -1, -1):
            self.send_image(images[cam], stamp, cam=cam)
        return stamp

    # Receiving ----------------------------------------------------------------------------------
    def wait_chunks(self, count: int, timeout: float = 30.0, since: int = 0,
                    predicate=None) -> list[Received]:
        """Chunks received from index `since` on (those that satisfy `predicate`), once there are
        at least `count` of them; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = [r for r in self.received[since:] if predicate is None or predicate(r)]
                if len(got) >= count:
                    return got
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(got)} of {count} chunks within {timeout} s")
                self._cond.wait(remaining)

    def reload(self, plan_path: str, timeout: float = 60.0) -> ReloadPlan.Response:
        if not self.reload_client.wait_for_service(timeout_sec=timeout):
            raise TimeoutError(f"{self.reload_client.srv_name} not available within {timeout} s")
        future = self.reload_client.call_async(ReloadPlan.Request(plan_path=str(plan_path)))
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        if not done.wait(timeout):
            raise TimeoutError(f"no answer from {self.reload_client.srv_name} within {timeout} s")
        return future.result()


def init_rclpy() -> None:
    if not rclpy.ok():
        rclpy.init()
