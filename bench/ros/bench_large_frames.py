"""Large camera frames between two processes over Fast DDS: delivered fraction and latency.

A publisher process sends rgb8 frames at 30 Hz, best effort (sensor-data QoS, as a camera
driver does), to a best-effort subscriber in another process; per transport configuration and
resolution, the subscriber counts what arrives and the latency from the stamp (this host's wall
clock, set at publish) to the subscriber's callback (after deserialization).

    .venv/bin/python bench/ros/bench_large_frames.py            # writes bench/ros/large_frames.json
    .venv/bin/python bench/ros/bench_large_frames.py --frames 90 --out /tmp/x.json

Transports: Fast DDS's builtin default (UDPv4 + SHM with 512 KiB segments; no variable set),
FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA, and the shipped config/fastdds_large_frames.xml.
"""
from __future__ import annotations

import argparse
import array
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
RESOLUTIONS = ((640, 480), (1280, 720))


def _qos():
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

    return QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                      reliability=ReliabilityPolicy.BEST_EFFORT)


def subscriber(seconds: float) -> None:
    import rclpy
    from sensor_msgs.msg import Image

    rclpy.init()
    node = rclpy.create_node("large_frames_sub")
    latencies, ids = [], []

    def on_image(msg):
        now = time.time()
        latencies.append(now - (msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9))
        ids.append(int(msg.header.frame_id))

    node.create_subscription(Image, "frames", on_image, _qos())
    print("subscribed", flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        rclpy.spin_once(node, timeout_sec=0.05)
    print(json.dumps({"latencies": latencies, "ids": ids}), flush=True)
    node.destroy_node()
    rclpy.shutdown()


def publisher(width: int, height: int, frames: int, rate: float) -> None:
    import rclpy
    from sensor_msgs.msg import Image

    rclpy.init()
    node = rclpy.create_node("large_frames_pub")
    pub = node.create_publisher(Image, "frames", _qos())
    deadline = time.monotonic() + 30
    while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # discovery settles both ways
    msg = Image()
    msg.height, msg.width, msg.encoding, msg.step = height, width, "rgb8", width * 3
    pixels = np.random.default_rng(0).integers(0, 256, height * width * 3, np.uint8)
    msg.data = array.array("B", pixels.tobytes())
    start = time.monotonic()
    for i in range(frames):
        now = time.time()
        msg.header.stamp.sec, msg.header.stamp.nanosec = int(now), int((now % 1) * 1e9)
        msg.header.frame_id = str(i)
        pub.publish(msg)
        time.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))
    time.sleep(0.5)
    node.destroy_node()
    rclpy.shutdown()


def measure(env: dict, width: int, height: int, frames: int, rate: float) -> dict:
    me = [sys.executable, str(Path(__file__).resolve())]
    seconds = frames / rate + 12.0
    sub = subprocess.Popen(me + ["--role", "sub", "--seconds", str(seconds)], env=env,
                           stdout=subprocess.PIPE, text=True)
    assert sub.stdout.readline().strip() == "subscribed"
    subprocess.run(me + ["--role", "pub", "--size", f"{width}x{height}", "--frames", str(frames),
                         "--rate", str(rate)], env=env, check=True)
    out, _ = sub.communicate(timeout=seconds + 30)
    got = json.loads(out.strip().splitlines()[-1])
    lat = np.array(got["latencies"]) * 1e3
    return {"delivered": round(len(set(got["ids"])) / frames, 4),
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
            "frame_bytes": width * height * 3}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", choices=("bench", "sub", "pub"), default="bench")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--rate", type=float, default=30.0)
    ap.add_argument("--domain-id", type=int, default=61)
    ap.add_argument("--out", default=str(REPO / "bench" / "ros" / "large_frames.json"))
    args = ap.parse_args()
    if args.role == "sub":
        subscriber(args.seconds)
        return 0
    if args.role == "pub":
        width, height = (int(n) for n in args.size.split("x"))
        publisher(width, height, args.frames, args.rate)
        return 0

    sys.path.insert(0, str(REPO))
    from qvla_ros.ros.transport import TRANSPORT_VARIABLES, describe_transport, profile_path

    base = {k: v for k, v in os.environ.items() if k not in TRANSPORT_VARIABLES}
    base.update({"ROS_DOMAIN_ID": str(args.domain_id), "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
                 "RMW_IMPLEMENTATION": "rmw_fastrtps_cpp", "PYTHONUNBUFFERED": "1",
                 "ROS_LOG_DIR": os.environ.get("ROS_LOG_DIR", "/tmp/qvla_bench_ros_log")})
    configs = {
        "fastdds_default": {},
        "fastdds_large_data": {"FASTDDS_BUILTIN_TRANSPORTS": "LARGE_DATA"},
        "shipped_profile": {"FASTDDS_DEFAULT_PROFILES_FILE": profile_path()},
    }
    result = {"card": "bench/ros/bench_large_frames.py", "cpu": cpu_name(),
              "cores": os.cpu_count(), "load_average_start": round(os.getloadavg()[0], 2),
              "rate_hz": args.rate, "frames_per_run": args.frames, "encoding": "rgb8",
              "qos": "best effort, keep last 1, both sides", "between": "two processes, one host",
              "transports": {}}
    for name, extra in configs.items():
        env = {**base, **extra}
        entry = {"transport": describe_transport(env),
                 "variables": {k: (os.path.relpath(v, REPO) if os.path.isabs(v) else v)
                               for k, v in extra.items()}}
        for width, height in RESOLUTIONS:
            entry[f"{width}x{height}"] = measure(env, width, height, args.frames, args.rate)
            print(name, f"{width}x{height}", entry[f"{width}x{height}"], flush=True)
        result["transports"][name] = entry
    result["load_average_end"] = round(os.getloadavg()[0], 2)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
