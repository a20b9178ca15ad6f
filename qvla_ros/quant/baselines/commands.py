"""`qvla compare`: QVLA against the baselines on one policy and benchmark, one table + plot.

    qvla compare --data data/demos --out bench/compare/tiny --episodes-per-task 50 --workers 16
    qvla compare --methods rtn-w4,sq-w8a8,qvla@rtn-w4 --data data/demos --episodes-per-task 2 --out /tmp/c
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .methods import DEFAULT_METHODS, MethodError, resolve_order


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _alphas(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(a) for a in text.split(",") if a.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"alphas are comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 <= a <= 1 for a in values):
        raise argparse.ArgumentTypeError(f"alphas must be in [0, 1], got {text!r}")
    return values


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="QVLA vs. RTN / SmoothQuant / GPTQ / AWQ at equal measured memory, closed loop",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated methods (default: all); forms: fp, rtn-w{8,4,3,2}, "
                        "rtn-g{G}-w{4,3,2}, sq-w{8,4}a8, gptq-w{4,3}, awq-w{4,3}, qvla@METHOD, "
                        "qvla-a8@METHOD, qvla-b{X}")
    p.add_argument("--policy", default="default",
                   help="float policy checkpoint directory, or 'default' (the shipped one)")
    p.add_argument("--data", default=None,
                   help="demonstration folder (qvla demos): calibration ('train') and offline ('val') frames")
    p.add_argument("--synthetic", action="store_true",
                   help="random calibration frames instead of --data (smoke runs; no offline metrics)")
    p.add_argument("--frames", type=_positive, default=64, help="calibration frames, shared by all methods")
    p.add_argument("--estimator", choices=("jacobian", "exact"), default="jacobian",
                   help="QVLA's action-sensitivity estimator")
    p.add_argument("--projections", type=_positive, default=None,
                   help="jacobian estimator: random action projections per frame (default: one per "
                        "action number, exact first order; 8 is ~4x faster on a 32-number chunk)")
    p.add_argument("--alphas", type=_alphas, default=None,
                   help="SmoothQuant alpha candidates (default 0.5,0.6,0.7,0.8,0.9)")
    p.add_argument("--episodes-per-task", type=_non_negative, default=50,
                   help="closed-loop episodes per task (0: offline metrics only)")
    p.add_argument("--workers", type=_non_negative, default=2, help="rollout worker processes")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: the suite)")
    p.add_argument("--max-steps", type=_positive, default=None, help="steps before an episode fails")
    p.add_argument("--offline-frames", type=_positive, default=512, help="held-out frames for offline metrics")
    p.add_argument("--seed", type=_non_negative, default=0)
    p.add_argument("--out", required=True, help="output folder (reused: finished work is not redone)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=compare_command)


def compare_command(args) -> int:
    from .compare import CompareSettings, Comparison
    from .smoothquant import DEFAULT_ALPHAS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        resolve_order(methods)
    except MethodError as exc:
        print(f"qvla compare: {exc}", file=sys.stderr)
        return 2
    if not args.data and not args.synthetic:
        print("qvla compare: give --data DEMO_DIR (or --synthetic for a smoke run)", file=sys.stderr)
        return 2
    try:
        settings = CompareSettings(
            methods=methods, policy=None if args.policy == "default" else args.policy,
            data=args.data, synthetic=args.synthetic, frames=args.frames, estimator=args.estimator, projections=args.projections,
            episodes_per_task=args.episodes_per_task, workers=args.workers, tasks=args.tasks,
            max_steps=args.max_steps, offline_frames=args.offline_frames,
            alphas=args.alphas or DEFAULT_ALPHAS, seed=args.seed)
    except ValueError as exc:
        print(f"qvla compare: {exc}", file=sys.stderr)
        return 2
    comparison = Comparison(settings, args.out, progress=not args.quiet)
    try:
        comparison.prepare()
    except (ValueError, OSError) as exc:  # missing/damaged checkpoint or demonstration folder
        print(f"qvla compare: {exc}", file=sys.stderr)
        return 2
    doc = comparison.run()
    print((Path(args.out) / "compare.md").read_text())
    print(f"qvla compare: {len(doc['rows'])} methods -> {args.out}/compare.md, compare.json, compare.png")
    return 0
