"""A second ROS process for the interface test: publishes one known ActionChunk per 50 ms on
`chunk` and serves `reload_plan`, accepting paths that exist and refusing the rest."""
import os
import sys

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node

from qvla_ros.msg import ActionChunk
from qvla_ros.srv import ReloadPlan


class InterfacePeer(Node):
    def __init__(self):
        super().__init__("interface_peer")
        self.active_plan_id = "initial"
        self.publisher = self.create_publisher(ActionChunk, "chunk", 10)
        self.create_service(ReloadPlan, "reload_plan", self.on_reload)
        self.create_timer(0.05, self.publish_chunk)

    def publish_chunk(self):
        msg = ActionChunk()
        msg.header.stamp.sec = 1234
        msg.header.stamp.nanosec = 5678
        msg.header.frame_id = "camera"
        msg.horizon, msg.action_dim = 2, 3
        msg.actions = [0.5, -0.25, 1.0, 0.0, 0.125, -1.0]
        msg.instruction = "open the drawer"
        msg.plan_id = self.active_plan_id
        msg.inference_time = 0.01
        self.publisher.publish(msg)

    def on_reload(self, request, response):
        if os.path.isfile(request.plan_path):
            self.active_plan_id = os.path.basename(request.plan_path)
            response.success = True
            response.message = "loaded"
        else:
            response.success = False
            response.message = f"no plan file at {request.plan_path!r}"
        response.active_plan_id = self.active_plan_id
        return response


def main():
    rclpy.init()
    node = InterfacePeer()
    print("peer ready", flush=True)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
