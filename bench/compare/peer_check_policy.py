"""Our group-wise RTN against torchao's, ON THE POLICY (issue #19 item 2): the same quantizable Linears
of a trained policy quantized both ways, compared weight by weight and by the action error each
causes (quant/action_error.py) on the same frames.

torchao is NOT a dependency of the project. Put it beside the venv and run from the checkout's root:

    .venv/bin/python -m pip install --no-deps --target /tmp/torchao_site torchao==0.18.0
    PYTHONPATH=.:/tmp/torchao_site .venv/bin/python bench/compare/peer_check_policy.py \
        --out bench/compare/peer_check_policy.json

What is compared, per width (4, 3, 2 bits) and group size: ours is `rtn-g{G}-w{b}` as `qvla compare`
runs it (quantize_baseline -> GroupWiseLinear: asymmetric min/max grid, fp16 scale and zero);
torchao's is `quantize_(model, IntxWeightOnlyConfig(weight_dtype=int{b}, granularity=PerGroup(G),
mapping_type=ASYMMETRIC))` on a copy of the same float policy. Reported: the share of weights the
two put on the same grid point (code minus zero-point), the largest difference between the
dequantized weights in steps, and each side's action error against the float policy on the frames (--data: held-out
frames of a demonstration folder; otherwise synthetic frames, said so in the output).
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
from qvla_ros.quant.baselines.api import quantize_baseline
from qvla_ros.quant.baselines.calibration import batches_from_frames, calibration_actions
from qvla_ros.quant.calibration import frames_from_demos, synthetic_frames
from qvla_ros.quant.packing import unpack_codes
from qvla_ros.quant.targets import quantizable_linears


def torchao_quantize(policy, names, bits: int, group_size: int):
    """torchao's int{bits} group-wise weight-only quantization of the named Linears, in place."""
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, quantize_
    from torchao.quantization.granularity import PerGroup

    config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(group_size),
                                  mapping_type=MappingType.ASYMMETRIC)
    wanted = set(names)
    quantize_(policy, config, filter_fn=lambda module, fqn: fqn in wanted and isinstance(module, torch.nn.Linear))
    return policy


def weight_agreement(ours, theirs, names, bits: int, group_size: int) -> dict:
    """How the two quantizations agree: the share of weights on the same grid point (code minus
    zero-point, an integer on both sides), and how far apart the dequantized weights are, in units
    of each group's step (ours keeps scales in fp16, torchao in fp32)."""
    same_code = total = 0
    worst = 0.0
    for name in names:
        mine, other = ours.get_submodule(name), theirs.get_submodule(name).weight
        n, k = mine.out_features, mine.in_features
        if k % group_size:
            raise ValueError(f"{name}: {k} inputs are not whole groups of {group_size}")
        codes = unpack_codes(mine.qweight, mine.qweight_hi, bits).reshape(n, -1, group_size)[:, : k // group_size]
        ours_rel = codes.float() - mine.zero.float()[..., None]
        theirs_rel = other.qdata.reshape(n, -1, group_size).float() - other.zero_point.float()[..., None]
        same_code += int((ours_rel == theirs_rel).sum())
        total += ours_rel.numel()
        step = mine.scale.float()[..., None]
        diff = (mine.dequantize(torch.float32) - other.dequantize().float()).abs().reshape(n, -1, group_size) / step
        worst = max(worst, float(diff.max()))
    return {"weights": total, "same_grid_point_share": same_code / total, "max_difference_in_steps": worst}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default=None, help="float checkpoint (default: the shipped tiny policy)")
    ap.add_argument("--data", default=None, help="demonstration folder: its held-out frames score the actions")
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--group-sizes", default="32,64")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    import torchao

    started = time.perf_counter()
    policy = load_policy(args.policy).eval()
    names = list(quantizable_linears(policy))
    if args.data:
        frames, source = frames_from_demos(args.data, args.frames, split="val", seed=1), f"{args.data} (val)"
    else:
        frames, source = synthetic_frames(policy.config, args.frames, seed=1), "synthetic frames"
    batches = batches_from_frames(frames, 16)
    with torch.no_grad():
        reference = calibration_actions(policy, batches)
    rows = []
    for group_size in (int(g) for g in args.group_sizes.split(",")):
        for bits in (int(b) for b in args.bits.split(",")):
            ours = quantize_baseline(copy.deepcopy(policy), f"rtn-g{group_size}-w{bits}", progress=False).policy
            theirs = torchao_quantize(copy.deepcopy(policy), names, bits, group_size)
            with torch.no_grad():
                err_ours = action_error(calibration_actions(ours, batches), reference)
                err_theirs = action_error(calibration_actions(theirs, batches), reference)
            row = {"bits": bits, "group_size": group_size, **weight_agreement(ours, theirs, names, bits, group_size),
                   "action_error_ours": err_ours, "action_error_torchao": err_theirs}
            print(json.dumps(row), flush=True)
            rows.append(row)
    doc = {"policy": args.policy or "shipped tiny", "layers": len(names), "frames": len(frames), "frames_from": source,
           "torchao": torchao.__version__, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
           "seconds": round(time.perf_counter() - started, 1), "rows": rows}
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
