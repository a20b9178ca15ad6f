"""A camera driver in its own process: publishes one fixed frame (seeded noise, or an image file
given as .npy) as sensor_msgs/Image rgb8 or CompressedImage (png/jpeg) at a rate, best effort
(sensor-data QoS, as camera drivers publish), stamped now, on the topics given.

    python camera.py --size 640x480 --rate 30 --seconds 20 --format raw image image2
"""
import argparse
import array
import sys
import time

import numpy as np
import rclpy
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image


def frame(width: int, height: int, seed: int) -> np.ndarray:
    """The frame camera.py publishes (smooth enough that JPEG keeps it close)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, height // 16), max(1, width // 16), 3), np.uint8)
    return np.ascontiguousarray(np.repeat(np.repeat(small, 16, 0), 16, 1)[:height, :width])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("topics", nargs="+")
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--rate", type=float, default=30.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--format", choices=("raw", "png", "jpeg"), default="raw")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    width, height = (int(n) for n in args.size.split("x"))
    rclpy.init()
    node = rclpy.create_node("test_camera")
    qos = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                     reliability=ReliabilityPolicy.BEST_EFFORT)
    pixels = frame(width, height, args.seed)
    if args.format == "raw":
        msg = Image()
        msg.height, msg.width, msg.encoding, msg.step = height, width, "rgb8", width * 3
        msg.data = array.array("B", pixels.tobytes())
        kind = Image
    else:
        import cv2

        ok, encoded = cv2.imencode(".png" if args.format == "png" else ".jpg",
                                   pixels[..., ::-1].copy())
        assert ok
        msg = CompressedImage()
        msg.format = f"rgb8; {args.format} compressed bgr8"
        msg.data = array.array("B", encoded.tobytes())
        kind = CompressedImage
    pubs = [node.create_publisher(kind, topic, qos) for topic in args.topics]
    msg.header.frame_id = "camera"
    print("publishing", flush=True)
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < args.seconds:
        msg.header.stamp = node.get_clock().now().to_msg()
        for pub in reversed(pubs):  # the first topic last: it triggers the forward
            pub.publish(msg)
        i += 1
        time.sleep(max(0.0, start + i / args.rate - time.monotonic()))
    node.destroy_node()
    rclpy.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
