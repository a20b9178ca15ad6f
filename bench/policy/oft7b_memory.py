"""Builds the `oft-7b` policy (the published OpenVLA-OFT architecture) with random weights
directly on a GPU in bf16 and measures it: parameter count, weight bytes (sum of every parameter's
and buffer's storage), CUDA memory after the build, build time, and the mean wall time of a full
forward (synchronized) (two 224 px images, instruction, proprio, 56 action placeholders: 618
tokens) at batch 1 in eager PyTorch.

    PYTHONPATH=. python bench/policy/oft7b_memory.py --out oft7b.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--config", default="oft-7b", help="preset to build (oft-micro: a CPU dry run of this script)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("oft7b_memory: no CUDA device", file=sys.stderr)
        return 2
    from qvla_ros.policy import make_policy

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    policy = make_policy(args.config, seed=0, device=dev, dtype=torch.bfloat16)
    sync()
    build_s = time.perf_counter() - t0
    cfg = policy.config
    params = policy.num_parameters()
    weight_bytes = sum(t.numel() * t.element_size() for t in policy.parameters())
    buffer_bytes = sum(t.numel() * t.element_size() for t in policy.buffers())
    by_part = Counter()
    for name, t in policy.named_parameters():
        by_part[name.split(".")[0]] += t.numel()
    allocated = torch.cuda.memory_allocated(dev) if cuda else None

    images = torch.randint(0, 256, (1, cfg.n_cams, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8, device=dev)
    proprio = torch.randn(1, cfg.proprio_dim, device=dev)
    instr = ["put both the alphabet soup and the tomato sauce in the basket"]
    with torch.inference_mode():
        out = policy(images, instr, proprio)
        sync()
        t1 = time.perf_counter()
        for _ in range(args.iters):
            policy(images, instr, proprio)
        sync()
        forward_ms = (time.perf_counter() - t1) / args.iters * 1e3
    record = {
        "config": args.config, "device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
        "dtype": "bfloat16", "parameters": params, "parameters_by_part": dict(by_part),
        "weight_bytes": weight_bytes, "weight_GB": round(weight_bytes / 1e9, 3),
        "weight_GiB": round(weight_bytes / 2**30, 3), "buffer_bytes": buffer_bytes,
        "cuda_allocated_after_build_bytes": allocated,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated(dev) if cuda else None,
        "build_s": round(build_s, 2), "tokens": cfg.sequence_length,
        "output_shape": list(out.shape), "forward_ms_batch1_eager": round(forward_ms, 2),
        "built_on": str(dev),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
