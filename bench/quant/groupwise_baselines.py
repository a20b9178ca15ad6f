"""Offline action error of the LLM baselines as users run them (group-wise g128) against their
per-channel forms, on the shipped tiny policy.

    .venv/bin/python bench/quant/groupwise_baselines.py --data DEMO_DIR [--out bench/quant/groupwise_baselines.json]
    .venv/bin/python bench/quant/groupwise_baselines.py --synthetic     # no demonstrations at hand

Each method quantizes a fresh copy of the float policy on the same calibration frames (train
split) through `quantize_baselines` and is scored by the one action-error metric
(quant.action_error: ||A_q - A_fp||^2 summed over the chunk, mean over frames) against the float
policy on held-out frames (val split). Memory is measured from the stored tensors, over the
quantized Linears and over the whole policy.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qvla_ros.io import atomic_write_text  # noqa: E402
from qvla_ros.policy import load_policy  # noqa: E402
from qvla_ros.quant.action_error import action_error_per_frame  # noqa: E402
from qvla_ros.quant.baselines import quantize_baseline  # noqa: E402
from qvla_ros.quant.baselines.calibration import batches_from_frames, calibration_actions  # noqa: E402
from qvla_ros.quant.calibration import frames_from_demos, synthetic_frames  # noqa: E402
from qvla_ros.sim.compare import machine  # noqa: E402

METHODS = ("rtn-w4", "rtn-g128-w4", "gptq-w4", "gptq-g128-w4", "awq-w4", "awq-g128-w4",
           "rtn-w3", "rtn-g128-w3", "gptq-w3", "gptq-g128-w3", "awq-w3", "awq-g128-w3")


def summarize(per_frame: torch.Tensor) -> dict:
    return {"mean": float(per_frame.mean()), "median": float(per_frame.median()),
            "p90": float(per_frame.quantile(0.9))}


def calibration_and_held_out(policy, args):
    """(calibration frames, held-out frames): from --data's train/val splits, or --synthetic."""
    if args.synthetic:
        return (synthetic_frames(policy.config, args.calib_frames, seed=args.seed),
                synthetic_frames(policy.config, args.eval_frames, seed=args.seed + 1))
    return (frames_from_demos(args.data, args.calib_frames, split="train", seed=args.seed),
            frames_from_demos(args.data, args.eval_frames, split="val", seed=args.seed + 1))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="demonstration folder (train: calibration, val: evaluation)")
    ap.add_argument("--synthetic", action="store_true", help="random smooth frames instead of --data")
    ap.add_argument("--policy", default=None, help="float policy folder (default: the shipped tiny one)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--calib-frames", type=int, default=64)
    ap.add_argument("--eval-frames", type=int, default=256)
    ap.add_argument("--awq-grid", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).with_name("groupwise_baselines.json")))
    args = ap.parse_args(argv)
    if (args.data is None) == (not args.synthetic):
        ap.error("give exactly one of --data and --synthetic")
    policy = load_policy(args.policy).eval()
    calib, held_out = calibration_and_held_out(policy, args)
    batches = batches_from_frames(calib)
    eval_batches = batches_from_frames(held_out, 32)
    with torch.no_grad():
        reference = calibration_actions(policy, eval_batches)
    rows = []
    for method in args.methods.split(","):
        q = copy.deepcopy(policy)
        start = time.perf_counter()
        result = quantize_baseline(q, method, batches, awq_grid=args.awq_grid, progress=False)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            per_frame = action_error_per_frame(calibration_actions(q, eval_batches), reference)
        row = {"method": method, "action_error": summarize(per_frame),
               "bits_per_param": result.memory.bits_per_param,
               "policy_bits_per_param": result.memory.policy_bits_per_param,
               "weight_nbytes": result.memory.nbytes, "quantize_seconds": round(seconds, 2),
               "info": {k: v for k, v in result.info.items() if k != "unscaled"}}
        rows.append(row)
        print(f"{method:14s} e={row['action_error']['mean']:.4e} median={row['action_error']['median']:.3e} "
              f"bits/param={row['bits_per_param']:.3f} (policy {row['policy_bits_per_param']:.3f}) "
              f"{seconds:.1f}s", flush=True)
    doc = {"format": "qvla-groupwise-baselines", "version": 1,
           "command": "python bench/quant/groupwise_baselines.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "policy": args.policy or "shipped tiny (qvla_ros/assets/policy_tiny)",
           "calibration": calib.source, "evaluation": held_out.source,
           "metric": "quant.action_error vs the float policy on the evaluation frames: sum over the "
                     "8x4 chunk of squared differences, mean/median/p90 over frames",
           "float_action_norm": float(reference.pow(2).sum(dim=(1, 2)).mean()),
           "machine": machine(), "rows": rows}
    atomic_write_text(Path(args.out), json.dumps(doc, indent=1, default=str))
    return doc


if __name__ == "__main__":
    main()
