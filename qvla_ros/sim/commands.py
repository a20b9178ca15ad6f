"""`qvla demos`, `qvla eval` and `qvla compare`: the benchmark's verbs (registered by qvla_ros/cli.py).

    qvla compare --data data/demos --out bench/compare/tiny --episodes-per-task 50 --workers 16
    qvla compare --methods rtn-w4,sq-w8a8,qvla@rtn-w4 --data data/demos --episodes-per-task 2 --out /tmp/c
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: `qvla compare --dtype`: the widths a float policy can be loaded in (sim/compare.py's DTYPES)
COMPARE_DTYPES = ("float32", "bfloat16")

__all__ = ["register"]

_COMPARE_HELP = ("QVLA against RTN, SmoothQuant, GPTQ and AWQ on one policy and benchmark at equal "
                 "measured memory: one table (compare.md, compare.json) + plot (compare.png).\n\n"
                 + __doc__.split("\n\n", 1)[1])


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _alphas(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(a) for a in text.split(",") if a.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"alphas are comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 <= a <= 1 for a in values):
        raise argparse.ArgumentTypeError(f"alphas must be in [0, 1], got {text!r}")
    return values


def _add_common(p: argparse.ArgumentParser, episodes: str) -> None:
    from .benchmarks import DEFAULT_SUITE, SUITES
    from .suite import TASK_NAMES
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--suite", choices=SUITES, default=DEFAULT_SUITE,
                   help="benchmark: the 10-task MetaWorld suite (default) or a LIBERO suite (7-d "
                        "actions, 8-d proprio, two cameras; initial states 0-29 for "
                        "demonstrations, 30-49 for evaluation)")
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated task names (default: every task of the suite; MetaWorld: "
                        f"{','.join(TASK_NAMES)}; LIBERO: indices 0-9 or libero_object/3 ...)")
    p.add_argument("--episodes-per-task", type=_positive, default=None,
                   help=f"default: the suite's ({episodes})")
    p.add_argument("--workers", type=_non_negative, default=2,
                   help="worker processes (0: run in this process)")
    p.add_argument("--max-steps", type=_positive, default=None,
                   help="steps before an episode counts as failed (default: the suite's: MetaWorld "
                        "300, libero-object 280, libero-spatial 220)")
    p.add_argument("--cameras", default=None,
                   help="comma-separated camera names (default: the suite's: corner,gripper_follow; "
                        "LIBERO agentview,robot0_eye_in_hand)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(subparsers) -> None:
    from .benchmarks import DEFAULT_SUITE, SUITES

    demos = subparsers.add_parser(
        "demos", help="scripted-expert demonstrations for the benchmark suite",
        description="Scripted-expert demonstrations: one .npz per successful episode + manifest.json. "
                    "Re-running the same command on the same folder resumes it.")
    _add_common(demos, "MetaWorld 50; LIBERO 30, every demonstration initial state")
    demos.add_argument("--image-size", type=_positive, default=None,
                       help="camera image side (default: the suite's: MetaWorld 128, LIBERO 224)")
    demos.add_argument("--batch-size", type=_positive, default=4,
                       help="environments each worker steps together")
    demos.add_argument("--smoke", action="store_true",
                       help="plumbing check in seconds: the first task (or --tasks) only, 1 episode "
                            "in this process, capped at --max-steps (default 8) and written even "
                            "unfinished; the folder is marked smoke and incomplete")
    demos.set_defaults(func=_demos)

    ev = subparsers.add_parser(
        "eval", help="closed-loop success of a policy (optionally quantized by a plan)",
        description="Closed-loop rollouts on held-out seeds: success per task and overall with "
                    "Wilson 95%% intervals, written as results.json + success.png.")
    _add_common(ev, "MetaWorld 50; LIBERO 20, every evaluation initial state")
    ev.add_argument("--policy", required=True, help="'expert' or a policy checkpoint directory")
    ev.add_argument("--plan", default=None, help="BitPlan file: evaluate the policy quantized by it")
    ev.add_argument("--replan-steps", type=_positive, default=None,
                    help="actions executed from each chunk before re-planning (default: whole chunk)")
    ev.add_argument("--batch-size", type=_positive, default=8,
                    help="environments each worker steps in lockstep (one batched policy call)")
    ev.add_argument("--image-size", type=_positive, default=None,
                    help="camera image size (default: the policy's config.image_size)")
    ev.add_argument("--seed-offset", type=_non_negative, default=0,
                    help="use another block of held-out seeds")
    ev.add_argument("--device", default="cpu", help="torch device of the policy")
    ev.add_argument("--eager", action="store_true",
                    help="on a CUDA device, run the forward eagerly (default: as CUDA graphs, one "
                         "per batch size, eager with a logged reason where capture fails)")
    ev.add_argument("--perturb", default=None, metavar="SPEC",
                    help="robustness run: brightness=FACTOR, shift=PIXELS and/or rephrase (held-out "
                         "instructions), comma-separated; same seeds as an unperturbed run")
    ev.add_argument("--ray", default=None, metavar="ADDRESS",
                    help="run the --workers as Ray actors: 'local' (a Ray instance here), 'auto' or a "
                         "cluster address; every node needs this package installed")
    ev.add_argument("--force", action="store_true", help="overwrite results already in --out")
    ev.set_defaults(func=_eval)

    p = subparsers.add_parser(
        "compare", help="QVLA vs. RTN / SmoothQuant / GPTQ / AWQ at equal measured memory, closed loop",
        description=_COMPARE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=None,
                   help="comma-separated methods (default: all); forms: fp, rtn-w{8,4,3,2}, "
                        "rtn-g{G}-w{4,3,2}, sq-w{8,4}a8, gptq-w{4,3}, gptq-g{G}-w{4,3}, awq-w{4,3}, "
                        "awq-g{G}-w{4,3}, qvla@METHOD, "
                        "qvla-a8@METHOD, qvla-b{X}, qvla-b{X}-whole")
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
    p.add_argument("--device", default="cpu",
                   help="torch device for quantization, offline metrics and the rollout workers' "
                        "policies (each worker on a CUDA device makes its own context)")
    p.add_argument("--dtype", choices=COMPARE_DTYPES, default="float32",
                   help="width the float policy is loaded in, and with it every weight no method "
                        "quantizes (bfloat16: as a robot deploys it; whole-policy bits then count "
                        "the rest at 16)")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run the --workers as Ray actors ('local', 'auto' or a cluster address)")
    p.add_argument("--suite", choices=SUITES, default=DEFAULT_SUITE,
                   help="benchmark of the closed loop (the policy must fit it: LIBERO takes OFT-shaped "
                        "policies); --data should hold that suite's demonstrations")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: the suite)")
    p.add_argument("--max-steps", type=_positive, default=None, help="steps before an episode fails")
    p.add_argument("--offline-frames", type=_non_negative, default=512,
                   help="held-out frames for offline metrics (0: none)")
    p.add_argument("--seed", type=_non_negative, default=0)
    p.add_argument("--out", required=True, help="output folder (reused: finished work is not redone)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_compare)


def _cameras(args):
    return None if args.cameras is None else tuple(c for c in args.cameras.split(",") if c)


def _demos(args) -> int:
    from ..dataset import DemoFileError
    from .benchmarks import get_benchmark
    from .demos import generate_demos
    try:
        bench = get_benchmark(args.suite)
        tasks, episodes, workers, max_steps = args.tasks, args.episodes_per_task, args.workers, args.max_steps
        if args.smoke:
            tasks = tasks or bench.resolve_tasks()[0].name
            episodes, workers, max_steps = 1, 0, max_steps or 8
        bench.resolve_tasks(tasks)     # unknown task names fail before anything starts
        manifest = generate_demos(args.out, tasks=tasks, episodes_per_task=episodes,
                                  workers=workers, batch_size=args.batch_size,
                                  image_size=args.image_size, cameras=_cameras(args),
                                  max_steps=max_steps, progress=not args.quiet,
                                  suite=bench.name, smoke=args.smoke)
    except (ValueError, DemoFileError) as exc:
        print(f"qvla demos: {exc}", file=sys.stderr)
        return 2
    run = manifest["runs"][-1]
    what = "smoke episode(s), not demonstrations" if args.smoke else "episodes"
    print(f"{len(manifest['episodes'])} {what} ({manifest['frames']} frames) in {args.out}; "
          f"this run wrote {run['episodes_written']} in {run['wall_time_s']:.0f} s")
    return 0


def _eval(args) -> int:
    from .benchmarks import get_benchmark
    from .evaluate import evaluate
    from .factories import make_factory
    from .perturb import Perturbation

    results_path = args.out / "results.json"
    try:
        bench = get_benchmark(args.suite)
        bench.resolve_tasks(args.tasks)  # unknown task names fail before anything starts
        if results_path.exists() and not args.force:
            raise ValueError(f"{results_path} exists; pass --force to overwrite or pick another --out")
        perturbation = Perturbation.parse(args.perturb)
        factory = make_factory(args.policy, args.plan, args.device, cuda_graph=not args.eager,
                               suite=bench.name)
        if args.plan is not None:
            import qvla_ros.quant as quant
            try:
                getattr(quant, "load_quantized_policy")
            except (AttributeError, ImportError) as exc:
                raise ValueError(f"--plan needs qvla_ros.quant.load_quantized_policy ({exc})") from exc
    except ValueError as exc:
        print(f"qvla eval: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "episodes.jsonl"
    if log.exists():  # an earlier (perhaps crashed) run's episodes: keep them aside, not lost
        import time
        log.rename(log.with_name(f"episodes.{time.strftime('%Y%m%d-%H%M%S', time.localtime(log.stat().st_mtime))}.jsonl"))
    try:
        results = evaluate(factory, tasks=args.tasks, episodes_per_task=args.episodes_per_task,
                           workers=args.workers, batch_size=args.batch_size,
                           replan_steps=args.replan_steps, max_steps=args.max_steps,
                           image_size=args.image_size, cameras=_cameras(args),
                           seed_offset=args.seed_offset, progress=not args.quiet, episode_log=log,
                           perturbation=perturbation, ray_address=args.ray, suite=bench.name)
    except ValueError as exc:   # e.g. a Ray cluster that cannot be reached
        print(f"qvla eval: {exc}", file=sys.stderr)
        return 2
    results.save(args.out)
    print(results.table())
    if results.settings.get("forward_modes"):
        print(f"policy forward: {'; '.join(results.settings['forward_modes'])}")
    print(f"wall time {results.settings['wall_time_s']:.0f} s on {results.settings['cpu']} "
          f"({args.workers} workers); results in {results_path}")
    return 0


def _compare(args) -> int:
    from ..quant.baselines.methods import DEFAULT_METHODS, MethodError, resolve_order
    from ..quant.baselines.smoothquant import DEFAULT_ALPHAS
    from .compare import CompareSettings, Comparison

    methods = ([m.strip() for m in args.methods.split(",") if m.strip()] if args.methods is not None
               else list(DEFAULT_METHODS))
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
            episodes_per_task=args.episodes_per_task, workers=args.workers, device=args.device,
            dtype=args.dtype, ray=args.ray, suite=args.suite, tasks=args.tasks,
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
