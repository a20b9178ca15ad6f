"""Cost of the benchmark's pieces on this machine, for planning evaluations.

    PYTHONPATH=. python bench/sim/measure_step.py [--out bench/sim/step_timing.json]

Measures (per process, CPU time and wall time; the machine may be shared, so the load average is
recorded with the figures): building one environment, a physics step without rendering, a step
with one and with two cameras at 128 and 224 px, and writing one scripted-expert demonstration
episode (rollout + compressed .npz).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

import qvla_ros.sim  # noqa: E402,F401  (chooses the GL backend before mujoco loads)
from qvla_ros.sim.env import SuiteEnv  # noqa: E402
from qvla_ros.sim.evaluate import cpu_model  # noqa: E402


def _timed(fn, repeats: int) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    return {"wall_ms": 1e3 * (time.perf_counter() - wall) / repeats,
            "cpu_ms": 1e3 * (time.process_time() - cpu) / repeats}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("step_timing.json"))
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    task = "drawer-open"
    rng = np.random.default_rng(0)
    out = {"cpu": cpu_model(), "cores": os.cpu_count(), "mujoco_gl": os.environ.get("MUJOCO_GL"),
           "load_average_before": os.getloadavg(), "task": task}

    t = time.perf_counter()
    env = SuiteEnv(task)
    out["build_env_s"] = time.perf_counter() - t
    env.reset(1_000_000)
    env.max_steps = 500
    step = lambda render: env.step(rng.uniform(-0.2, 0.2, 4), render=render)  # noqa: E731
    out["physics_step"] = _timed(lambda: step(False), args.steps)
    env.reset(1_000_000)
    out["step_render_2cams_128"] = _timed(lambda: step(True), args.steps)
    env.close()
    for size in (128, 224):
        for cams in (("corner",), ("corner", "gripper_follow")):
            e = SuiteEnv(task, image_size=size, cameras=cams)
            e.reset(1_000_001)
            out[f"render_{len(cams)}cam_{size}"] = _timed(e.render, args.steps // 2)
            e.close()

    from qvla_ros.sim.demos import generate_demos
    with tempfile.TemporaryDirectory() as tmp:
        wall, cpu = time.perf_counter(), time.process_time()
        manifest = generate_demos(tmp, tasks=task, episodes_per_task=1, workers=0, batch_size=1,
                                  progress=False)
        out["demo_episode"] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                               "frames": manifest["frames"],
                               "npz_bytes": sum(p.stat().st_size for p in Path(tmp).glob("*/*.npz")),
                               "includes": "building 1 env + rollout with 2 cameras + compressed write"}
    out["load_average_after"] = os.getloadavg()
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
