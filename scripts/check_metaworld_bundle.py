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

from bundle_check import (CHILD_PRELUDE, add_frame_args, add_source_args, frame_cfg,  # scripts/bundle_check.py
                          run_check)

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
expert_ok = 0
for name in (cfg["tasks"] or TASK_NAMES):
    def task():
        global expert_ok
        with SuiteEnv(name, image_size=cfg["image_size"]) as env:
            obs = env.reset(eval_seed(cfg["seed"]))
            extra = first_frame(name, obs["images"], pixels=False)
            for _ in range(cfg["steps"]):
                obs, _ = env.step([0.3, -0.2, 0.1, 1.0])
            check_frames(obs)
            expert = ENV_POLICY_MAP[get_task(name).env_name]()
            env.reset(eval_seed(cfg["seed"]), render=False)
            success = False
            while not success and not env.done_by_time:
                _, success = env.step(expert.get_action(env.state), render=False)
            expert_ok += success
            extra += f" | expert {'succeeded' if success else 'FAILED'} in {env.steps} steps"
        return f"{get_task(name).instruction}{extra}"
    run_task(name, task)

report_outside()
report_diffs(pixels=False)
print(f"expert succeeded on {expert_ok}/{len(results)} tasks (seed {cfg['seed']} of the evaluation range)")
finish()
'''


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_source_args(parser, "no bundle: the interpreter's own MetaWorld (reference images)")
    parser.add_argument("--tasks", nargs="*", default=None, help="task names (default: the ten)")
    parser.add_argument("--seed", type=int, default=0, help="index into the evaluation seeds")
    add_frame_args(parser, image_size=128)
    args = parser.parse_args(argv)
    cfg = {"tasks": args.tasks, "seed": args.seed, **frame_cfg(args)}
    return run_check(args, CHILD, BUNDLED, SHOW, "metaworld-bundle-check-", lambda tmp: cfg)


if __name__ == "__main__":
    raise SystemExit(main())
