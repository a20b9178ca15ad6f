"""Our GPTQ against llmcompressor's, ON THE POLICY (issue #19 item 2): every quantizable Linear of a
trained policy rounded by both implementations from the same Hessian and the same grid, compared
weight by weight and by the action error each causes (quant/action_error.py) on held-out frames.

llmcompressor is NOT a dependency of the project. Run this in an environment that has it beside the
project's requirements (bench/compare/peer_check.py says how to make one), from the checkout's root:

    PYTHONPATH=. /tmp/peer-venv/bin/python bench/compare/peer_check_gptq_policy.py --data DEMOS \
        --out bench/compare/peer_check_gptq_policy.json

What is held equal, so that only the two column loops differ: each Linear's Hessian H = 2/n X^T X
from its inputs in the float policy on the calibration frames (layer-wise, every layer on float
inputs), the grid (per output channel, asymmetric min/max: our quantize_rows' fp16 scale and
integer zero, handed to llmcompressor as its scale and zero-point, shifted to its signed code
range), 1% damping, blocks of 128 columns, columns in order of decreasing Hessian diagonal
(llmcompressor's actorder "static"; ours act_order=True). One difference stays, by design: ours pins
each row's min and max entries to codes 0 and 2^b - 1 (so the packer's min/max recomputes the same
grid from GPTQ's output); llmcompressor rounds them like any other entry after the error feedback.

Reported per width: the share of weights both put on the same grid point, the largest difference
in grid steps, the layer objective tr((W - Q) H (W - Q)^T) summed over layers for each side, and
each side's action error against the float policy on the evaluation frames (--data: the folder's
held-out frames; calibration uses its training frames). Writes JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from qvla_ros.policy import load_policy
from qvla_ros.quant.action_error import action_error
from qvla_ros.quant.baselines.calibration import batches_from_frames, calibration_actions, input_rows
from qvla_ros.quant.baselines.gptq import gptq_quantize_weight, layer_objective
from qvla_ros.quant.calibration import frames_from_demos, synthetic_frames
from qvla_ros.quant.quantizer import quantize_rows
from qvla_ros.quant.targets import quantizable_linears


def hessians(policy, names, batches) -> dict[str, torch.Tensor]:
    """H = 2/n X^T X of each named Linear's inputs over the batches (llmcompressor's normalization)."""
    modules = dict(policy.named_modules())
    sums = {n: torch.zeros(modules[n].in_features, modules[n].in_features, dtype=torch.float64) for n in names}
    counts = dict.fromkeys(names, 0)

    def hook(name):
        def record(_module, inputs, _output):
            x = input_rows(inputs[0]).double()
            sums[name] += x.T @ x
            counts[name] += x.shape[0]
        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            calibration_actions(policy, batches)
    finally:
        for h in handles:
            h.remove()
    return {n: (2.0 * sums[n] / max(counts[n], 1)).float() for n in names}


def llmcompressor_gptq(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                       bits: int) -> torch.Tensor:
    """llmcompressor's GPTQ column loop on one Linear, per-channel asymmetric, on the given grid."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy=QuantizationStrategy.CHANNEL,
                            actorder="static")
    # compressed-tensors' asymmetric codes are signed, [-2^(b-1), 2^(b-1) - 1]: the same grid with
    # the zero-point shifted by 2^(b-1)
    zp = (zero.float() - 2 ** (bits - 1)).round().to(torch.int8)[:, None]
    # quantize_weight works in its arguments' storage (a float32 weight is its working buffer): copies
    q, _, fallback = quantize_weight(weight.float()[None].clone(), hessian.float()[None].clone(),
                                     scale.float()[:, None][None], zp[None], None, args, blocksize=128, percdamp=0.01)
    if bool(fallback.any()):
        raise RuntimeError("llmcompressor fell back to RTN (Hessian not positive definite)")
    return q[0]


def compare_width(policy, names, hs, bits: int, eval_batches, reference) -> dict:
    ours_policy, theirs_policy = copy.deepcopy(policy), copy.deepcopy(policy)
    ours_mods, theirs_mods = dict(ours_policy.named_modules()), dict(theirs_policy.named_modules())
    same = total = 0
    max_steps = 0.0
    objective = {"ours": 0.0, "llmcompressor": 0.0}
    float_mods = dict(policy.named_modules())
    for name in names:
        w = float_mods[name].weight.detach().float().clone()
        _, scale, zero = quantize_rows(w, bits)
        s = scale.float()[:, None]
        ours = gptq_quantize_weight(w, hs[name], bits, damp=0.01, block=128, act_order=True)
        theirs = llmcompressor_gptq(w, hs[name], scale, zero, bits)
        # grid points as integers (w / s is an integer plus float error on both sides)
        steps = ((ours - theirs) / s).abs()
        same += int((steps < 0.5).sum())
        total += steps.numel()
        max_steps = max(max_steps, float(steps.max()))
        objective["ours"] += layer_objective(w, ours, hs[name])
        objective["llmcompressor"] += layer_objective(w, theirs, hs[name])
        ours_mods[name].weight.data.copy_(ours.to(ours_mods[name].weight.dtype))
        theirs_mods[name].weight.data.copy_(theirs.to(theirs_mods[name].weight.dtype))
    with torch.no_grad():
        err_ours = action_error(calibration_actions(ours_policy, eval_batches), reference)
        err_theirs = action_error(calibration_actions(theirs_policy, eval_batches), reference)
    return {"bits": bits, "weights": total, "same_grid_point_share": same / total,
            "max_difference_in_steps": round(max_steps, 3), "layer_objective_sum": objective,
            "action_error_ours": err_ours, "action_error_llmcompressor": err_theirs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default=None, help="float checkpoint (default: the shipped tiny policy)")
    ap.add_argument("--data", default=None, help="demonstration folder: training frames calibrate, held-out "
                                                 "frames score the actions (default: synthetic frames)")
    ap.add_argument("--calibration-frames", type=int, default=128)
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    import llmcompressor

    started = time.perf_counter()
    torch.manual_seed(0)
    policy = load_policy(args.policy).eval()
    names = list(quantizable_linears(policy))
    if args.data:
        calib = frames_from_demos(args.data, args.calibration_frames, split="train", seed=0)
        held_out = frames_from_demos(args.data, args.frames, split="val", seed=1)
        source = f"{args.data} (train for the Hessians, val for the action error)"
    else:
        calib = synthetic_frames(policy.config, args.calibration_frames, seed=0)
        held_out = synthetic_frames(policy.config, args.frames, seed=1)
        source = "synthetic frames"
    hs = hessians(policy, names, batches_from_frames(calib, 16))
    eval_batches = batches_from_frames(held_out, 16)
    with torch.no_grad():
        reference = calibration_actions(policy, eval_batches)
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        row = compare_width(policy, names, hs, bits, eval_batches, reference)
        print(json.dumps(row), flush=True)
        rows.append(row)
    doc = {"policy": args.policy or "shipped tiny", "layers": len(names), "calibration_frames": len(calib),
           "frames": len(held_out), "frames_from": source, "llmcompressor": llmcompressor.__version__,
           "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
           "seconds": round(time.perf_counter() - started, 1), "rows": rows}
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
