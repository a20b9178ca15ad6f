"""Closed-loop success of the shipped policy quantized by the shipped QVLA plans (`qvla eval`'s
harness: 10 tasks, held-out seeds, whole chunks executed before re-planning).

    .venv/bin/python bench/quant/closed_loop.py --plans config/plans/tiny_qvla_4.0.json,config/plans/tiny_qvla_3.0.json \
        [--float] [--episodes-per-task 50] [--workers 2] [--out bench/quant/closed_loop.json]

Each configuration's result is stored as soon as it finishes (keyed by plan id), so an interrupted
run resumes where it stopped. The quantized layers keep a dequantized copy for speed (the packed
buffers are what memory figures count).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


class QuantizedFactory:
    """Picklable: each evaluation worker loads the shipped policy and applies the plan itself."""

    def __init__(self, plan: str | None):
        self.plan = plan

    def __call__(self):
        import torch

        from qvla_ros.quant.api import load_quantized_policy

        torch.set_num_threads(1)
        return load_quantized_policy(None, self.plan, cache_dequantized=True)


def main() -> int:
    from qvla_ros.quant.plan import BitPlan
    from qvla_ros.sim.evaluate import evaluate

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plans", default="config/plans/tiny_qvla_4.0.json,config/plans/tiny_qvla_3.0.json")
    ap.add_argument("--float", action="store_true", help="also evaluate the float policy")
    ap.add_argument("--uniform", default="", help="also uniform round-to-nearest at these widths, e.g. 3,4")
    ap.add_argument("--episodes-per-task", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "quant" / "closed_loop.json"))
    args = ap.parse_args()
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.is_file() else {}
    plans = [p for p in args.plans.split(",") if p]
    if args.uniform:
        from qvla_ros.policy import load_policy
        from qvla_ros.quant.plan import plan_from_bits
        from qvla_ros.quant.targets import quantizable_linears

        policy = load_policy(None)
        for bits in (int(b) for b in args.uniform.split(",")):
            plan = plan_from_bits(policy, {n: bits for n in quantizable_linears(policy)},
                                  provenance={"method": f"uniform RTN W{bits}"})
            plans.append(str(plan.save(out.parent / f"uniform_rtn_w{bits}.json")))
    configs = ([("float", None)] if args.float else []) + [(BitPlan.load(p).plan_id, p) for p in plans]
    for key, plan in configs:
        tag = f"{key}@{args.episodes_per_task}"
        if tag in done:
            print(f"{tag}: cached")
            continue
        started = time.time()
        results = evaluate(QuantizedFactory(plan), episodes_per_task=args.episodes_per_task, workers=args.workers,
                           describe={"plan": plan})
        summary = results.to_dict() if hasattr(results, "to_dict") else json.loads(json.dumps(results, default=vars))
        done[tag] = {"plan": plan, "plan_id": key, "seconds": round(time.time() - started, 1), "results": summary}
        if plan is not None:
            p = BitPlan.load(plan)
            done[tag].update(bits_per_param=p.bits_per_param(), weight_bytes=p.weight_nbytes(),
                             method=p.provenance.get("method", "qvla"))
        out.write_text(json.dumps(done, indent=1, default=str) + "\n")
        print(f"{tag}: {done[tag]['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
