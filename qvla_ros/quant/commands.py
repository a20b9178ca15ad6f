"""`qvla calibrate`, `qvla allocate`, `qvla quantize`: the QVLA stages on the command line.

    qvla calibrate --policy default --data demos/ --frames 64 --estimator jacobian --out S.safetensors
    qvla allocate  --sensitivity S.safetensors --budget 4.0 --out plan.json      (+ plan.png)
                   (4.0 bits per parameter of the WHOLE policy; --budget-scope planned: of the
                   quantized layers only; --layout kernel: priced as the GPU kernels hold it)
    qvla quantize  --policy default --plan plan.json --out tiny_q4/
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_BITS = "0,2,3,4,8,16"


def _bits(text: str) -> tuple[int, ...]:
    from .quantizer import check_bits

    try:
        return tuple(check_bits(int(b)) for b in text.split(",") if b.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean bad input (a file, a budget), reported as one line instead of a traceback."""
    from ..policy import CheckpointError
    from ..dataset import DemoFileError
    from .allocate import BudgetError
    from .plan import PlanError
    from .sensitivity import SensitivityError

    return (CheckpointError, DemoFileError, BudgetError, PlanError, SensitivityError, FileNotFoundError)


def _reporting(verb: str, handler):
    def run(args) -> int:
        try:
            return handler(args)
        except _user_errors() as exc:
            print(f"qvla {verb}: {exc}", file=sys.stderr)
            return 2
    return run


def _policy_path(text: str):
    return None if text in ("default", "") else text


def register(subparsers) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = subparsers.add_parser("calibrate", help="action-space sensitivity table of a policy", formatter_class=fmt,
                              description="S[layer][channel][bits] = E ||A(channel at bits) - A*||^2 over calibration frames.")
    p.add_argument("--policy", default="default", help="policy checkpoint directory, or 'default' (the shipped one)")
    p.add_argument("--data", help="demonstration folder (qvla demos) to take calibration frames from")
    p.add_argument("--synthetic", action="store_true", help="random frames instead of --data (smoke runs only)")
    p.add_argument("--split", default="train", choices=("train", "val", "all"), help="demonstration split")
    p.add_argument("--frames", type=int, default=32, help="calibration frames")
    p.add_argument("--estimator", choices=("exact", "jacobian", "hybrid"), default="jacobian",
                   help="hybrid: jacobian for every channel, rescaled per layer and width by an exact sample "
                        "of --max-channels channels per layer (default 8) on the first --exact-frames frames")
    p.add_argument("--exact-frames", type=int, default=8, help="hybrid only: frames of the exact sample")
    p.add_argument("--bits", type=_bits, default=DEFAULT_BITS, help="widths to measure")
    p.add_argument("--max-channels", type=int, default=None,
                   help="exact: measure this many random channels per layer (others NaN); hybrid: the sample size")
    p.add_argument("--projections", type=int, default=None,
                   help="jacobian only: random projections per frame (default: exact unit vectors for small chunks)")
    p.add_argument("--exclude", action="append", default=None,
                   help="regex of module names kept 16-bit (repeatable; default: action head and projectors)")
    p.add_argument("--rounding", choices=("rtn", "gptq"), default="rtn",
                   help="measure rows rounded to nearest, or by GPTQ (jacobian estimator; then "
                        "quantize with --rounding gptq)")
    p.add_argument("--replicas", type=int, default=None,
                   help="jacobian: projections per backward pass (default: all, up to 64; a 7B policy takes 1-4); "
                        "exact: perturbations per forward")
    p.add_argument("--device", default="cpu", help="where to calibrate: cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="run the policy in this dtype (default: as stored; bfloat16 halves a large policy's memory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="sensitivity table (.safetensors)")
    p.set_defaults(func=_reporting("calibrate", calibrate_command))

    a = subparsers.add_parser("allocate", help="bit plan under a memory budget, from a sensitivity table",
                              formatter_class=fmt)
    a.add_argument("--sensitivity", required=True, help="table written by qvla calibrate")
    a.add_argument("--budget", type=float, required=True,
                   help="bits per parameter of the WHOLE policy: the quantized layers packed (scales, zeros, "
                        "row indices included) plus every other weight (unquantized layers, embeddings, norms, "
                        "biases, action head) at its stored width, over all its parameters; with "
                        "--budget-scope planned: bits per weight parameter of the quantized layers only")
    a.add_argument("--budget-scope", choices=("whole", "planned"), default="whole",
                   help="what --budget counts: the whole policy, or only the quantized layers "
                        "(how plans of version 1, e.g. config/plans/, were budgeted)")
    a.add_argument("--layout", choices=("packed", "kernel"), default="packed",
                   help="how a row is priced: as the packed buffers of the checkpoint and the CPU path hold it "
                        "(packed), or as the GPU kernels keep it resident (kernel: K padded to the kernel's "
                        "k-block, per-row scale/zero/index words, per-layer slot tables; writes a version 3 "
                        "plan). Use kernel when the budget is the robot GPU's memory")
    a.add_argument("--policy", default=None,
                   help="the float policy the table was measured on ('default' or a checkpoint directory): "
                        "only needed for a whole-policy budget from a table calibrated before the policy's "
                        "storage was recorded in it")
    a.add_argument("--bits", type=_bits, default=DEFAULT_BITS, help="candidate widths")
    a.add_argument("--row-tile", type=int, default=16, help="row groups are multiples of this (kernel tile)")
    a.add_argument("--max-prune", type=float, default=0.5, help="largest share of a layer's rows that may be pruned")
    a.add_argument("--act-bits", type=int, choices=(16, 8), default=16, help="activation bits of every layer")
    a.add_argument("--out", required=True, help="plan file (.json)")
    a.add_argument("--plot", default=None, help="per-layer allocation figure (default: next to the plan, .png)")
    a.set_defaults(func=_reporting("allocate", allocate_command))

    q = subparsers.add_parser("quantize", help="apply a bit plan: packed mixed-bit checkpoint", formatter_class=fmt)
    q.add_argument("--policy", default="default", help="float policy checkpoint directory, or 'default'")
    q.add_argument("--plan", required=True, help="plan file (qvla allocate)")
    q.add_argument("--out", required=True, help="directory for the quantized checkpoint")
    q.add_argument("--rounding", choices=("rtn", "gptq"), default="rtn",
                   help="how each row is rounded at its planned width: to nearest (what the plan "
                        "alone reproduces, e.g. on a node's plan reload) or by GPTQ's error feedback "
                        "(lower action error at the same bytes; needs calibration frames)")
    q.add_argument("--data", help="gptq only: demonstration folder to take calibration frames from")
    q.add_argument("--frames", type=int, default=128, help="gptq only: calibration frames")
    q.add_argument("--seed", type=int, default=0, help="gptq only: frame sampling seed")
    q.set_defaults(func=_reporting("quantize", quantize_command))


def calibrate_command(args) -> int:
    """qvla calibrate; a GPU running out of memory part-way is a one-line error, and the table is
    only ever written whole (SensitivityTable.save replaces the file atomically at the end)."""
    import torch

    try:
        return _calibrate(args)
    except torch.OutOfMemoryError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
        print(f"qvla calibrate: ran out of device memory while calibrating ({first}); nothing was written "
              f"to {args.out}. Try --replicas 1 and --dtype bfloat16.", file=sys.stderr)
        return 2


def _check_frames_fit(frames, config) -> None:
    from .sensitivity import SensitivityError

    got = tuple(frames.images.shape[1:])
    if frames.images.shape[1] != config.n_cams or frames.images.shape[-1] != 3:
        raise SensitivityError(f"calibration frames hold images of shape {got} per frame; the policy takes "
                               f"{config.n_cams} RGB cameras")
    if frames.proprio.shape[1] != config.proprio_dim:
        raise SensitivityError(f"calibration frames hold {frames.proprio.shape[1]}-d proprio; the policy "
                               f"takes {config.proprio_dim}")


def _calibrate(args) -> int:
    from ..policy import load_policy
    from .calibration import frames_from_demos, synthetic_frames
    from .sensitivity import exact_sensitivity, jacobian_sensitivity, rescale_to_exact
    from .targets import DEFAULT_EXCLUDE, QuantTargets

    if args.frames < 1:
        print("qvla calibrate: --frames must be >= 1", file=sys.stderr)
        return 2
    if not args.data and not args.synthetic:
        print("qvla calibrate: give --data DEMO_DIR (or --synthetic for a smoke run)", file=sys.stderr)
        return 2
    import torch

    from .sensitivity import check_device

    if args.replicas is not None and args.replicas < 1:
        print("qvla calibrate: --replicas must be >= 1", file=sys.stderr)
        return 2
    device = check_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    policy = load_policy(_policy_path(args.policy), device=device, dtype=dtype)
    on = {"replicas": args.replicas}
    if args.synthetic:
        frames = synthetic_frames(policy.config, args.frames, seed=args.seed)
    else:
        frames = frames_from_demos(args.data, args.frames, split=args.split, seed=args.seed)
    _check_frames_fit(frames, policy.config)
    targets = QuantTargets(exclude=tuple(args.exclude) if args.exclude else DEFAULT_EXCLUDE)
    if args.rounding == "gptq":
        if args.estimator != "jacobian":
            print("qvla calibrate: --rounding gptq needs --estimator jacobian", file=sys.stderr)
            return 2
        from .baselines.gptq import gptq_weight_deltas
        from .sensitivity import SensitivityError
        from .targets import quantizable_linears

        try:
            modules = quantizable_linears(policy, targets)
        except ValueError as exc:
            raise SensitivityError(f"no quantizable Linear layer: {exc}") from None
        deltas = gptq_weight_deltas(policy, modules, frames, args.bits)
        table = jacobian_sensitivity(policy, frames, bits=args.bits, layers=list(modules), deltas=deltas,
                                     projections=args.projections, seed=args.seed, **on)
        table.meta["rounding"] = "gptq"
    elif args.estimator == "exact":
        table = exact_sensitivity(policy, frames, bits=args.bits, targets=targets, max_channels=args.max_channels,
                                  seed=args.seed, **on)
    else:
        table = jacobian_sensitivity(policy, frames, bits=args.bits, targets=targets,
                                     projections=args.projections, seed=args.seed, **on)
        if args.estimator == "hybrid":
            sample = frames.select(range(min(args.exact_frames, len(frames))))
            exact = exact_sensitivity(policy, sample, bits=args.bits, targets=targets,
                                      max_channels=args.max_channels or 8, seed=args.seed)
            same = jacobian_sensitivity(policy, sample, bits=args.bits, targets=targets,
                                        projections=args.projections, seed=args.seed, progress=False, **on)
            seconds = table.meta["seconds"] + exact.meta["seconds"] + same.meta["seconds"]
            table = rescale_to_exact(table, exact, same)
            table.meta["seconds"] = seconds
    table.meta["policy_path"] = args.policy
    path = table.save(args.out)
    n = sum(c.shape[0] for c in table.costs.values())
    print(f"qvla calibrate: {args.estimator} sensitivity of {n} channels in {len(table.costs)} layers over "
          f"{len(frames)} frames ({table.meta['seconds']:.1f} s) -> {path}")
    return 0


def allocate_command(args) -> int:
    from .allocate import allocate
    from .plots import plot_allocation
    from .sensitivity import SensitivityTable

    table = SensitivityTable.load(args.sensitivity)
    storage = None
    if args.policy is not None:
        from ..policy import load_policy
        from .accounting import policy_storage
        from .plan import PlanError, model_fingerprint

        policy = load_policy(_policy_path(args.policy))
        fingerprint = model_fingerprint(policy)
        if fingerprint["architecture"] != (table.meta.get("policy") or {}).get("architecture", fingerprint["architecture"]):
            raise PlanError(f"--policy {args.policy} is not the policy the sensitivity table was measured on")
        storage = policy_storage(policy)
    result = allocate(table, args.budget, candidate_bits=args.bits, row_tile=args.row_tile,
                      max_prune_fraction=args.max_prune, scope=args.budget_scope, storage=storage,
                      layout=args.layout)
    plan = result.to_plan(table, act_bits=args.act_bits,
                          provenance={"sensitivity_file": str(args.sensitivity)})
    path = plan.save(args.out)
    plot = plot_allocation(plan, args.plot or Path(args.out).with_suffix(".png"))
    report = result.report()
    print(plan.summary())
    print(f"qvla allocate: duality gap {report['duality_gap']:.4g} ({100 * report['relative_gap']:.2f}% of the cost), "
          f"{report['seconds']:.2f} s -> {path}, {plot}")
    return 0


def quantize_command(args) -> int:
    from ..policy import load_policy
    from .accounting import resident_nbytes
    from .api import quantize_, quantized_weight_nbytes
    from .checkpoint import WEIGHTS_FILE, disk_weight_nbytes, safetensors_tensor_nbytes, save_quantized
    from .plan import BitPlan

    if args.rounding == "gptq" and not args.data:
        print("qvla quantize: --rounding gptq needs --data DEMO_DIR (calibration frames)", file=sys.stderr)
        return 2
    if args.frames < 1:
        print("qvla quantize: --frames must be >= 1", file=sys.stderr)
        return 2
    policy = load_policy(_policy_path(args.policy))
    plan = BitPlan.load(args.plan, model=policy)
    whole = plan.whole_record(policy)  # version 1 plans: measured on the float policy
    summary = plan.summary(policy)
    if args.rounding == "gptq":
        plan = _round_rows_with_gptq(policy, plan, args)
        quantize_(policy, plan, check_weights=False)  # the weights are GPTQ's now, on the plan's grid
    else:
        quantize_(policy, plan)
    out = save_quantized(policy, plan, args.out)
    predicted = plan.weight_nbytes()
    memory = quantized_weight_nbytes(policy)
    disk = disk_weight_nbytes(out, plan)
    memory_policy = resident_nbytes(policy)
    disk_policy = sum(safetensors_tensor_nbytes(out / WEIGHTS_FILE).values())
    print(summary)
    print(json.dumps({"plan_id": plan.plan_id, "rounding": args.rounding, "predicted_weight_bytes": predicted, "memory_weight_bytes": memory,
                      "disk_weight_bytes": disk,
                      "planned_params": plan.params, "planned_bits_per_param": round(plan.bits_per_param(), 6),
                      "whole_params": whole["params"],
                      "predicted_policy_bytes": (plan.weight_bits() + whole["rest_bits"] + 7) // 8,
                      "memory_policy_bytes": memory_policy, "disk_policy_bytes": disk_policy,
                      "whole_bits_per_param": round(8 * memory_policy / whole["params"], 6),
                      "out": str(out)}))
    return 0


def _round_rows_with_gptq(policy, plan, args):
    """GPTQ the planned Linears in place at the plan's widths; returns the plan under a new id
    whose provenance says so (the packed codes differ from what the plan alone reproduces)."""
    import dataclasses

    from .baselines.gptq import apply_gptq
    from .calibration import frames_from_demos

    frames = frames_from_demos(args.data, args.frames, split="train", seed=args.seed)
    modules = {name: policy.get_submodule(name) for name in plan.layers}
    rel = apply_gptq(policy, modules, frames, plan.row_bits())
    provenance = {**plan.provenance, "rounding": {
        "method": "gptq", "base_plan_id": plan.plan_id, "data": str(args.data), "frames": len(frames),
        "seed": args.seed, "mean_relative_layer_error": sum(rel.values()) / len(rel)}}
    return dataclasses.replace(plan, provenance=provenance, created="")
