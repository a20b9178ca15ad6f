"""Closed-loop success of the shipped policy quantized by the shipped QVLA plans (`qvla eval`'s
harness: 10 tasks, held-out seeds, whole chunks executed before re-planning).

    .venv/bin/python bench/quant/closed_loop.py --plans config/plans/tiny_qvla_4.0.json,config/plans/tiny_qvla_3.0.json \
        [--float] [--uniform 3,4] [--episodes-per-task 50] [--workers 2] [--out bench/quant/closed_loop.json]

writes closed_loop.json, closed_loop.md (table) and closed_loop.png (success vs bits/param).

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
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md table and .png plot from --out")
    args = ap.parse_args()
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.is_file() else {}
    if args.report_only:
        write_report(done, out.with_suffix(".md"), out.with_suffix(".png"))
        return 0
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
    if done:
        write_report(done, out.with_suffix(".md"), out.with_suffix(".png"))
    return 0


def write_report(done: dict, table_path: Path, plot_path: Path) -> None:
    """A table (success per task, % of the float policy's success) and a success-vs-bits plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(done.values(), key=lambda r: -(r.get("bits_per_param") or 16.0))
    floats = [r for r in runs if r["plan"] is None]
    fp_rate = floats[0]["results"]["overall"]["rate"] if floats else None
    tasks = list(runs[0]["results"]["per_task"])
    settings = runs[0]["results"]["settings"]
    lines = [
        "# Closed loop: the shipped policy under the shipped QVLA plans",
        "",
        f"`bench/quant/closed_loop.py` (`qvla eval`'s harness): {settings['episodes_per_task']} held-out "
        f"episodes per task (seeds {settings['seeds'][0]}-{settings['seeds'][1]}), at most "
        f"{settings['max_steps']} steps, whole chunks executed before re-planning, policy on the CPU, "
        f"{settings['workers']} workers on {settings['cpu']}. Every configuration uses the same seeds.",
        "",
        "| configuration | bits/param | " + " | ".join(tasks) + " | success [95% CI] | % of float |",
        "|---" * (len(tasks) + 4) + "|",
    ]
    for r in runs:
        res = r["results"]
        name = "float" if r["plan"] is None else f"{r.get('method', 'qvla')} (`{Path(r['plan']).name}`)"
        bits = "16" if r["plan"] is None else f"{r['bits_per_param']:.3f}"
        o = res["overall"]
        rel = "" if fp_rate is None else f"{100 * o['rate'] / fp_rate:.1f}"
        lines.append(f"| {name} | {bits} | " + " | ".join(str(res["per_task"][t]["successes"]) for t in tasks)
                     + f" | {o['successes']}/{o['episodes']} = {100 * o['rate']:.1f}% "
                       f"[{100 * o['ci95'][0]:.1f}, {100 * o['ci95'][1]:.1f}] | {rel} |")
    table_path.write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for family, marker in (("qvla", "o"), ("uniform", "s")):
        pts = sorted((r["bits_per_param"], r["results"]["overall"]) for r in runs
                     if r["plan"] is not None and r.get("method", "qvla").lower().startswith(family))
        if pts:
            x = [b for b, _ in pts]
            y = [100 * o["rate"] for _, o in pts]
            err = [[100 * (o["rate"] - o["ci95"][0]) for _, o in pts], [100 * (o["ci95"][1] - o["rate"]) for _, o in pts]]
            ax.errorbar(x, y, yerr=err, marker=marker, capsize=3,
                        label="QVLA (shipped plans)" if family == "qvla" else "uniform RTN")
    if floats:
        o = floats[0]["results"]["overall"]
        ax.axhline(100 * o["rate"], color="k", lw=1, label="float policy")
        ax.axhspan(100 * o["ci95"][0], 100 * o["ci95"][1], color="k", alpha=0.08)
    ax.set_xlabel("weight bits per parameter (scales and zero-points included)")
    ax.set_ylabel("closed-loop success, %")
    ax.set_title(f"{settings['episodes_per_task']} episodes x {len(tasks)} tasks, 95% Wilson intervals")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(plot_path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
