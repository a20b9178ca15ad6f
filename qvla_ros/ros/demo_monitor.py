"""The node `qvla demo` watches the run with: reads the bridge's episode results and the policy
node's chunks (for latency), and holds the client of `~/reload_plan`."""
from __future__ import annotations

import json
import threading

from rclpy.node import Node
from std_msgs.msg import String

from qvla_ros.msg import ActionChunk
from qvla_ros.ros.background_spin import SpinsInBackground
from qvla_ros.ros.topics import CHUNK_QOS, RESULTS_QOS
from qvla_ros.srv import ReloadPlan


class DemoMonitor(SpinsInBackground, Node):
    """Collects `episode_result` (episodes, then the summary) and chunk timings."""

    def __init__(self, policy_node: str = "qvla_policy_node"):
        super().__init__("qvla_demo")
        self.episodes: list[dict] = []
        self.summary: dict | None = None
        self._lock = threading.Lock()
        self._latency: list[float] = []
        self._inference: list[float] = []
        self.create_subscription(String, "episode_result", self._on_result, RESULTS_QOS)
        self.create_subscription(ActionChunk, "action_chunk", self._on_chunk, CHUNK_QOS)
        self.reload_client = self.create_client(ReloadPlan, f"/{policy_node}/reload_plan")

    @staticmethod
    def reload_request(plan_path: str) -> ReloadPlan.Request:
        return ReloadPlan.Request(plan_path=plan_path)

    def _on_result(self, msg: String) -> None:
        try:
            result = json.loads(msg.data)
        except json.JSONDecodeError:
            self.get_logger().warning(f"episode_result is not JSON: {msg.data[:80]!r}")
            return
        if result.get("type") == "summary":
            self.summary = result
        elif result.get("type") == "episode":
            self.episodes.append(result)

    def _on_chunk(self, msg: ActionChunk) -> None:
        with self._lock:
            self._latency.append(msg.latency)
            self._inference.append(msg.inference_time)

    def chunk_stats(self) -> dict:
        with self._lock:
            return {"latency": list(self._latency), "inference": list(self._inference)}

