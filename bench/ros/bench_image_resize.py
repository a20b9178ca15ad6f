"""Cost per camera frame of bringing it to the policy's input: image_conversion.image_to_rgb8
(raw Image) and compressed_to_rgb8 (JPEG, PNG) with image_resize fit / crop and OFT's 0.9 centre
crop, at 640x480 and 1280x720, to 128x128 (the shipped policy) and 224x224 (OpenVLA-OFT).

    .venv/bin/python bench/ros/bench_image_resize.py     # writes bench/ros/image_resize.json
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_large_frames import cpu_name  # noqa: E402
from sensor_msgs.msg import CompressedImage  # noqa: E402

from qvla_ros.ros.image_conversion import (  # noqa: E402
    array_to_image,
    compressed_to_rgb8,
    image_to_rgb8,
)


def per_frame_ms(fn, repeats: int = 200) -> dict:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    t = np.array(times) * 1e3
    return {"p50_ms": round(float(np.median(t)), 3), "p99_ms": round(float(np.percentile(t, 99)), 3)}


def main() -> int:
    rng = np.random.default_rng(0)
    out = {"card": "bench/ros/bench_image_resize.py", "cpu": cpu_name(), "cores": os.cpu_count(),
           "opencv": cv2.__version__, "cv2_threads": cv2.getNumThreads(),
           "load_average": round(os.getloadavg()[0], 2), "results": {}}
    for width, height in ((640, 480), (1280, 720)):
        small = rng.integers(0, 256, (height // 8, width // 8, 3), np.uint8)
        pixels = np.ascontiguousarray(np.repeat(np.repeat(small, 8, 0), 8, 1))
        for target in (128, 224):
            size = (target, target)
            row = {}
            for enc in ("rgb8", "bgr8"):
                msg = array_to_image(pixels, enc)
                for mode, crop in (("fit", 1.0), ("crop", 1.0), ("fit", 0.9)):
                    key = f"{enc} {mode}" + (f" center_crop_scale {crop}" if crop < 1 else "")
                    row[key] = per_frame_ms(lambda: image_to_rgb8(msg, None, size, mode, crop))
            for fmt, ext in (("jpeg", ".jpg"), ("png", ".png")):
                ok, data = cv2.imencode(ext, pixels[..., ::-1].copy())
                msg = CompressedImage(format=fmt)
                msg.data = data.tobytes()
                row[f"{fmt} ({data.size} bytes) fit"] = per_frame_ms(
                    lambda: compressed_to_rgb8(msg, size, "fit"), repeats=50)
            out["results"][f"{width}x{height} -> {target}x{target}"] = row
            print(width, height, target, row, flush=True)
    path = REPO / "bench" / "ros" / "image_resize.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
