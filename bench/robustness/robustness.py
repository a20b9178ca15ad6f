"""Robustness of a policy and its QVLA plans (issue #19 item 4): each plan under each perturbation,
every run on the same held-out seeds, each perturbed run paired with the same plan's plain run
(exact McNemar + paired bootstrap, qvla_ros.sim.paired).

    .venv/bin/python bench/robustness/robustness.py --episodes 10 --out bench/robustness/tiny.json
    .venv/bin/python bench/robustness/robustness.py --smoke --out /tmp/robust.json   # 1 task, 2 episodes

Writes JSON: per plan ("float" or the plan file) and condition ("plain", "brightness=1.2", ...):
success, Wilson interval and, for perturbed conditions, the paired comparison with plain; plus
the same plan-vs-float pairs under each condition. Shows progress per run. A run cut short keeps
what it measured (the JSON is rewritten after every run).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from qvla_ros.io import atomic_write_text  # noqa: E402
from qvla_ros.sim.evaluate import cpu_model, evaluate  # noqa: E402
from qvla_ros.sim.factories import make_factory  # noqa: E402
from qvla_ros.sim.paired import compare_paired, outcomes_of  # noqa: E402
from qvla_ros.sim.perturb import Perturbation  # noqa: E402

CONDITIONS = ("plain", "brightness=1.2", "brightness=0.8", "shift=2", "rephrase")
PLANS = ("float", "config/plans/tiny_qvla_4.0.json", "config/plans/tiny_qvla_3.0.json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--policy", default=str(REPO / "qvla_ros" / "assets" / "policy_tiny"))
    ap.add_argument("--plans", default=",".join(PLANS), help="comma-separated: float and/or plan files")
    ap.add_argument("--conditions", default=",".join(CONDITIONS))
    ap.add_argument("--tasks", default=None, help="default: the whole suite")
    ap.add_argument("--episodes", type=int, default=10, help="per task")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="1 task, 2 episodes, float and one condition")
    args = ap.parse_args(argv)
    plans = [p.strip() for p in args.plans.split(",") if p.strip()]
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    if args.smoke:
        args.tasks, args.episodes, plans, conditions = "drawer-open", 2, ["float"], ["plain", "brightness=1.2"]
    if conditions[0] != "plain":
        ap.error("the first condition must be 'plain' (every other is paired with it)")
    perturbations = {c: None if c == "plain" else Perturbation.parse(c) for c in conditions}  # bad spellings fail here
    result = {"policy": args.policy, "tasks": args.tasks or "all", "episodes_per_task": args.episodes,
              "cpu": cpu_model(), "runs": {}, "vs_plain": {}, "vs_float": {},
              "command": "bench/robustness/robustness.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    outcomes = {}
    started = time.perf_counter()
    for plan in plans:
        factory = make_factory(args.policy, None if plan == "float" else str(REPO / plan), "cpu")
        for cond in conditions:
            print(f"== {plan} / {cond}", flush=True)
            run = evaluate(factory, tasks=args.tasks, episodes_per_task=args.episodes, workers=args.workers,
                           perturbation=perturbations[cond], progress=True)
            key = f"{plan} | {cond}"
            outcomes[(plan, cond)] = outcomes_of(run.episodes)
            result["runs"][key] = {"success": run.overall["rate"], "ci95": run.overall["ci95"],
                                   "episodes": run.overall["episodes"], "wall_time_s": run.settings["wall_time_s"]}
            if cond != "plain":
                result["vs_plain"][key] = compare_paired(outcomes[(plan, cond)], outcomes[(plan, "plain")])
            if plan != "float" and ("float", cond) in outcomes:
                result["vs_float"][key] = compare_paired(outcomes[(plan, cond)], outcomes[("float", cond)])
            result["total_s"] = round(time.perf_counter() - started, 1)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
            print(json.dumps({key: result["runs"][key]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
