#!/usr/bin/env python3
"""Check the MetaWorld bundle (scripts/make_metaworld_bundle.sh) alone runs the suite: every one
of the ten tasks (qvla_ros/sim/suite.py) built through the project's SuiteEnv, reset, stepped and
both cameras rendered, then the scripted expert run to success (unrendered), with MetaWorld, its
assets, MuJoCo, gymnasium, language_world, glfw and PyOpenGL taken from the bundle and nowhere
else.

    python3 scripts/check_metaworld_bundle.py --archive .mwbundle/metaworld312.tar.xz
    python3 scripts/check_metaworld_bundle.py --bundle /tmp/metaworld312     # already unpacked
    # rendered frames against the full install's:
    python3 scripts/check_metaworld_bundle.py --installed --save-images /tmp/mwref
    python3 scripts/check_metaworld_bundle.py --archive ... --compare-images /tmp/mwref
    # the project's 3.11 venv: MuJoCo from a cp311 wheel of the same version, unpacked
    .venv/bin/python scripts/check_metaworld_bundle.py --archive ... --extra-path /tmp/mj311

The child interpreter is set up as scripts/check_libero_bundle.py's (scripts/bundle_check.py):
`python -I`, the bundle first on sys.path, BUNDLED resolvable only there (or in --extra-path
folders). It prints where each package came from, the modules taken from outside the bundle
(those the GPU machine must have), and per task OK or FAIL. Exit status 0 when every task passed
(the expert's success is reported, not required).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from bundle_check import CHILD_PRELUDE, add_source_args, run_check  # scripts/bundle_check.py

# Top-level modules the bundle provides: found there (or in --extra-path) or not at all.
BUNDLED = ("metaworld", "mujoco", "gymnasium", "farama_notifications", "language_world", "glfw",
           "OpenGL")
SHOW = ("mujoco", "metaworld", "gymnasium", "language_world", "glfw", "OpenGL", "numpy", "scipy")

CHILD = CHILD_PRELUDE + r'''
import numpy as np
import qvla_ros.sim                       # picks MUJOCO_GL before mujoco is imported
from qvla_ros.sim.env import SuiteEnv
from qvla_ros.sim.suite import TASK_NAMES, eval_seed, get_task
from metaworld.policies import ENV_POLICY_MAP

show_modules()
results, diffs, expert_ok = [], [], 0
for name in (cfg["tasks"] or TASK_NAMES):
    t0 = time.time()
    try:
        with SuiteEnv(name, image_size=cfg["image_size"]) as env:
            obs = env.reset(eval_seed(cfg["seed"]))
            first, extra = obs["images"], ""
            if cfg["save_images"]:
                np.save(os.path.join(cfg["save_images"], f"{name}.npy"), first)
            if cfg["compare_images"]:
                ref = np.load(os.path.join(cfg["compare_images"], f"{name}.npy")).astype(np.int16)
                d = np.abs(first.astype(np.int16) - ref)
                diffs.append(d)
                extra = f" | vs reference: mean |diff| {d.mean():.3f}, max {d.max()}"
            for _ in range(cfg["steps"]):
                obs, _ = env.step([0.3, -0.2, 0.1, 1.0])
            img = obs["images"]
            assert img.shape == (2, cfg["image_size"], cfg["image_size"], 3), img.shape
            assert all(float(im.std()) > 1.0 for im in img), "a camera image is flat"
            assert np.all(np.isfinite(obs["proprio"])), "proprio not finite"
            expert = ENV_POLICY_MAP[get_task(name).env_name]()
            env.reset(eval_seed(cfg["seed"]), render=False)
            success = False
            while not success and not env.done_by_time:
                _, success = env.step(expert.get_action(env.state), render=False)
            expert_ok += success
            extra += f" | expert {'succeeded' if success else 'FAILED'} in {env.steps} steps"
        line = f"OK   {name} ({time.time() - t0:.1f} s) {get_task(name).instruction}{extra}"
        results.append(True)
    except Exception as exc:
        line = f"FAIL {name} ({time.time() - t0:.1f} s) {type(exc).__name__}: {exc}"
        traceback.print_exc(limit=4)
        results.append(False)
    print(line, flush=True)

report_outside()
if diffs:
    d = np.stack(diffs)
    print(f"images vs reference over {len(diffs)} tasks: mean |diff| {d.mean():.3f} (0-255), max {d.max()}")
print(f"expert succeeded on {expert_ok}/{len(results)} tasks (seed {cfg['seed']} of the evaluation range)")
print(f"{sum(results)}/{len(results)} tasks OK")
sys.exit(0 if results and all(results) else 1)
'''


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_source_args(parser, "no bundle: the interpreter's own MetaWorld (reference images)")
    parser.add_argument("--tasks", nargs="*", default=None, help="task names (default: the ten)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="index into the evaluation seeds")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--save-images", type=Path, help="save each task's first frame (.npy) here")
    parser.add_argument("--compare-images", type=Path,
                        help="compare each task's first frame with those saved here (e.g. --installed's)")
    args = parser.parse_args(argv)
    if args.save_images:
        args.save_images.mkdir(parents=True, exist_ok=True)
    cfg = {"tasks": args.tasks, "steps": args.steps, "seed": args.seed, "image_size": args.image_size,
           "save_images": str(args.save_images.resolve()) if args.save_images else None,
           "compare_images": str(args.compare_images.resolve()) if args.compare_images else None}
    return run_check(args, CHILD, BUNDLED, SHOW, "metaworld-bundle-check-", lambda tmp: cfg)


if __name__ == "__main__":
    raise SystemExit(main())
