"""Forward latency of the shipped tiny policy on the CPU at batch 1 (two 128 px cameras), the
contract call `policy(images, instruction, proprio)` end to end (tokenizing and normalizing
included). Writes bench/policy/cpu_forward.json.

    python bench/policy/cpu_forward.py [--threads 2] [--iters 100]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "cpu_forward.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from qvla_ros.policy import load_policy
    from qvla_ros.sim.evaluate import cpu_model

    policy = load_policy()
    cfg = policy.config
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (1, cfg.n_cams, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8, generator=g)
    proprio = torch.randn(1, cfg.proprio_dim, generator=g)
    times = []
    with torch.inference_mode():
        for _ in range(10):
            policy(images, ["pull the drawer open"], proprio)
        for _ in range(args.iters):
            t = time.perf_counter()
            policy(images, ["pull the drawer open"], proprio)
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    record = {"policy": "shipped tiny", "parameters": policy.num_parameters(), "tokens": cfg.sequence_length,
              "threads": args.threads, "iters": args.iters, "median_ms": round(statistics.median(times), 2),
              "p10_ms": round(times[len(times) // 10], 2), "p90_ms": round(times[9 * len(times) // 10], 2),
              "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
              "python": platform.python_version(),
              "note": "shared development VM: other jobs ran at the same time, so p90 is noisy"}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
