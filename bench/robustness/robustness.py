"""Robustness of a policy and its QVLA plans (issue #19 item 4): each plan under each perturbation,
every run on the same held-out seeds, each perturbed run paired with the same plan's plain run
(exact McNemar + paired bootstrap, qvla_ros.sim.paired).

    .venv/bin/python bench/robustness/robustness.py --episodes 10 --out bench/robustness/tiny.json
    .venv/bin/python bench/robustness/robustness.py --smoke --out /tmp/robust.json   # 1 task, 2 episodes
    # on a GPU, the float policy and a quantized checkpoint (e.g. a `qvla compare` run's policy/):
    python bench/robustness/robustness.py --policy P --plans float,RUN/policy --device cuda --workers 16 --out r.json
    # pair `qvla eval [--perturb ...]` results made elsewhere (no rollouts):
    python bench/robustness/robustness.py --from-results plain/results.json bright/results.json --out r.json

A plan is "float", a BitPlan file (applied to --policy), a quantized checkpoint directory (a
`qvla compare` run's policy/, which keeps the dtype the comparison ran in) or a float checkpoint. Writes
JSON: per plan and condition ("plain", "brightness=1.2", ...): success, Wilson interval and, for
perturbed conditions, the paired comparison with plain; plus each plan paired with the reference
(--reference, float by default) under each condition ("vs_float"). Shows progress per run. A run cut short keeps what it measured (the JSON is
rewritten after every run).
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
from qvla_ros.quant.checkpoint import is_quantized_checkpoint  # noqa: E402
from qvla_ros.sim.compare import SavedPolicyFactory  # noqa: E402
from qvla_ros.sim.evaluate import EvalResults, cpu_model, evaluate  # noqa: E402
from qvla_ros.sim.factories import make_factory  # noqa: E402
from qvla_ros.sim.paired import compare_paired, outcomes_of  # noqa: E402
from qvla_ros.sim.perturb import Perturbation  # noqa: E402

CONDITIONS = ("plain", "brightness=1.2", "brightness=0.8", "shift=2", "rephrase")
PLANS = ("float", "config/plans/tiny_qvla_4.0.json", "config/plans/tiny_qvla_3.0.json")


class Robustness:
    """The result document, built one run at a time: after each run, every perturbed run is paired
    with its plan's plain run and every plan's run with float's under the same condition, as far
    as both sides have run."""

    def __init__(self, header: dict, out: Path, reference: str = "float"):
        self.doc = {**header, "reference": reference, "runs": {}, "vs_plain": {}, "vs_float": {}, "outcomes": {}}
        self.out, self.outcomes, self.started = out, {}, time.perf_counter()
        self.reference = reference

    def resume(self) -> None:
        """Take the runs an earlier, interrupted invocation with the same header wrote to `out`."""
        if not self.out.is_file():
            return
        old = json.loads(self.out.read_text())
        same = all(old.get(k) == v for k, v in self.doc.items() if k not in ("runs", "vs_plain", "vs_float", "outcomes", "command"))
        if not same:
            raise SystemExit(f"{self.out} holds another robustness run (other policy, plans' reference, "
                             f"episodes or suite); give another --out")
        for key, outcome in old.get("outcomes", {}).items():
            plan, cond = key.rsplit(" | ", 1)
            self.outcomes[(plan, cond)] = {t: {int(seed): ok for seed, ok in per.items()} for t, per in outcome.items()}
            self.doc["runs"][key] = old["runs"][key]
            self.doc["outcomes"][key] = outcome

    def has(self, plan: str, cond: str) -> bool:
        return (plan, cond) in self.outcomes

    def add(self, plan: str, cond: str, run: EvalResults) -> None:
        key = f"{plan} | {cond}"
        if (plan, cond) in self.outcomes:
            raise ValueError(f"two runs of {key}")
        self.outcomes[(plan, cond)] = outcomes_of(run.episodes)
        self.doc["outcomes"][key] = self.outcomes[(plan, cond)]
        self.doc["runs"][key] = {"success": run.overall["rate"], "ci95": run.overall["ci95"],
                                 "episodes": run.overall["episodes"],
                                 "wall_time_s": run.settings.get("wall_time_s")}
        for (p, c), outcome in self.outcomes.items():
            if c != "plain" and (p, "plain") in self.outcomes:
                self.doc["vs_plain"][f"{p} | {c}"] = compare_paired(outcome, self.outcomes[(p, "plain")])
            if p != self.reference and (self.reference, c) in self.outcomes:
                self.doc["vs_float"][f"{p} | {c}"] = compare_paired(outcome, self.outcomes[(self.reference, c)])
        self.doc["total_s"] = round(time.perf_counter() - self.started, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out, json.dumps(self.doc, indent=1) + "\n")


def from_results(paths: list[Path], out: Path, command: str) -> dict:
    """Pair saved `qvla eval` results: each file's plan from its settings (no plan: "float") and
    its condition from its perturbation."""
    runs = [(p, EvalResults.load(p)) for p in paths]
    first = runs[0][1].settings
    book = Robustness({"policy": first.get("policy", {}).get("path"), "suite": first.get("suite"),
                       "episodes_per_task": first.get("episodes_per_task"), "cpu": first.get("cpu"),
                       "from_results": [str(p) for p in paths], "command": command}, out)
    for path, run in runs:
        pol = run.settings.get("policy", {})
        plan = pol.get("plan") or "float"
        pert = run.settings.get("perturbation")
        cond = Perturbation(**pert).spec if pert else "plain"
        print(f"== {path}: {plan} / {cond} {run.overall['rate']:.1%}", flush=True)
        book.add(plan, cond, run)
    return book.doc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--policy", default=str(REPO / "qvla_ros" / "assets" / "policy_tiny"))
    ap.add_argument("--plans", default=",".join(PLANS),
                    help="comma-separated: float, BitPlan files and/or quantized checkpoint directories")
    ap.add_argument("--conditions", default=",".join(CONDITIONS))
    ap.add_argument("--tasks", default=None, help="default: the whole suite")
    ap.add_argument("--episodes", type=int, default=10, help="per task")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--suite", default="metaworld", help="benchmark (LIBERO has no held-out phrasings)")
    ap.add_argument("--max-steps", type=int, default=None, help="default: the suite's")
    ap.add_argument("--device", default="cpu", help="torch device of the policy (cuda: CUDA-graphed)")
    ap.add_argument("--reference", default="float",
                    help="the plan the others are paired with under each condition (vs_float), e.g. a "
                         "`qvla compare` run's fp policy/ (default: float)")
    ap.add_argument("--from-results", type=Path, nargs="+", default=None, metavar="RESULTS_JSON",
                    help="pair these `qvla eval` results.json files instead of running anything")
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs an interrupted invocation with the same settings wrote to --out")
    ap.add_argument("--smoke", action="store_true", help="1 task, 2 episodes, float and one condition")
    args = ap.parse_args(argv)
    command = "bench/robustness/robustness.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.from_results:
        from_results(args.from_results, args.out, command)
        return 0
    plans = [p.strip() for p in args.plans.split(",") if p.strip()]
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    if args.smoke:
        args.tasks, args.episodes, plans, conditions = "drawer-open", 2, ["float"], ["plain", "brightness=1.2"]
    if conditions[0] != "plain":
        ap.error("the first condition must be 'plain' (every other is paired with it)")
    perturbations = {c: None if c == "plain" else Perturbation.parse(c) for c in conditions}  # bad spellings fail here
    if args.reference not in plans:
        ap.error(f"--reference {args.reference!r} is not one of --plans")
    book = Robustness({"policy": args.policy, "tasks": args.tasks or "all", "episodes_per_task": args.episodes,
                       "cpu": cpu_model(), "device": args.device, "suite": args.suite, "command": command},
                      args.out, reference=args.reference)
    if args.resume:
        book.resume()
    for plan in plans:
        path = None if plan == "float" else REPO / plan   # an absolute path stays itself
        if path is not None and is_quantized_checkpoint(path):   # e.g. a `qvla compare` run's policy/
            factory = SavedPolicyFactory(path, {"plan": plan}, device=args.device)
        elif path is not None and path.is_dir():          # a float checkpoint
            factory = make_factory(str(path), None, args.device, suite=args.suite)
        else:
            factory = make_factory(args.policy, None if path is None else str(path), args.device, suite=args.suite)
        for cond in conditions:
            if book.has(plan, cond):
                continue
            print(f"== {plan} / {cond}", flush=True)
            run = evaluate(factory, tasks=args.tasks, episodes_per_task=args.episodes, workers=args.workers,
                           perturbation=perturbations[cond], progress=True, suite=args.suite,
                           max_steps=args.max_steps)
            book.add(plan, cond, run)
            print(json.dumps({f"{plan} | {cond}": book.doc["runs"][f"{plan} | {cond}"]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
