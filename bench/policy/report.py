"""Summarizes the shipped tiny policy's training runs (bench/policy/run1, run2) into
bench/policy/results.json and bench/policy/policy_tiny.png (success per task with Wilson 95%
intervals, the training loss of both runs, and the language-swap test).

    python bench/policy/report.py
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
RUNS = {"run1": "from scratch", "run2": "continued from run1 (shipped)"}


def load(run: str) -> dict:
    d = HERE / run
    return {"eval": json.loads((d / "eval_results.json").read_text()),
            "swap": json.loads((d / "language_swap.json").read_text()),
            "train": json.loads((d / "training.json").read_text()),
            "demos": json.loads((d / "demos_manifest.json").read_text())}


def main() -> None:
    runs = {r: load(r) for r in RUNS}
    summary = {"card": runs["run2"]["train"]["device"], "runs": {}}
    for name, r in runs.items():
        t, e, s = r["train"], r["eval"], r["swap"]
        summary["runs"][name] = {
            "what": RUNS[name], "steps": t["steps_done"], "batch_size": t["train_config"]["batch_size"],
            "lr": t["train_config"]["lr"], "seed": t["seed"], "wall_s": t["wall_s"], "device": t["device"],
            "train_episodes": t["episodes"], "train_frames": t["frames"], "val_l1": t["val_l1"],
            "manifest_sha256": t["manifest_sha256"], "init_from": t.get("init_from"),
            "success_overall": e["overall"], "success_per_task": {k: {"rate": v["rate"], "ci95": v["ci95"]}
                                                                 for k, v in e["per_task"].items()},
            "eval_settings": {k: e["settings"].get(k) for k in ("episodes_per_task", "seeds", "replan_steps",
                                                               "max_steps", "workers", "wall_time_s", "cpu")},
            "language_swap": {k: {"told": v["told"], "did_A_anyway": v["did_A_anyway"]}
                              for k, v in s["per_task"].items()},
            "language_swap_episodes_per_task": s["episodes_per_task"],
        }
    (HERE / "results.json").write_text(json.dumps(summary, indent=1) + "\n")

    tasks = list(runs["run2"]["eval"]["per_task"])
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [2.2, 1.2, 2.2]})
    width = 0.38
    for i, (name, r) in enumerate(runs.items()):
        pt = r["eval"]["per_task"]
        rates = [pt[t]["rate"] for t in tasks]
        err = [[pt[t]["rate"] - pt[t]["ci95"][0] for t in tasks], [pt[t]["ci95"][1] - pt[t]["rate"] for t in tasks]]
        xs = [k + (i - 0.5) * width for k in range(len(tasks))]
        ax1.bar(xs, rates, width, yerr=err, capsize=2,
                label=f"{name}: {RUNS[name]} ({r['eval']['overall']['rate']:.1%})")
    ax1.axhline(0.85, color="k", ls="--", lw=0.8, label="gate 85%")
    ax1.set_xticks(range(len(tasks)), tasks, rotation=40, ha="right")
    ax1.set_ylim(0, 1.05)
    ax1.set_ylabel("success (50 held-out episodes, Wilson 95% CI)")
    ax1.legend(fontsize=8, loc="lower left")
    ax1.set_title("tiny policy, closed loop, qvla eval")

    offset = 0
    for name, r in runs.items():
        steps, loss = zip(*r["train"]["losses"])
        ax2.plot([s + offset for s in steps], loss, label=name)
        offset += r["train"]["steps_done"]
    ax2.set_yscale("log")
    ax2.set_xlabel("optimizer step (batch 512)")
    ax2.set_ylabel("train L1 (normalized actions)")
    ax2.legend(fontsize=8)
    ax2.set_title(f"training on {summary['card']}")

    sw = runs["run2"]["swap"]["per_task"]
    normal = [runs["run2"]["eval"]["per_task"][t]["rate"] for t in tasks]
    anyway = [sw[t]["did_A_anyway"] for t in tasks]
    xs = range(len(tasks))
    ax3.bar([x - 0.2 for x in xs], normal, 0.4, label="task A, told A")
    ax3.bar([x + 0.2 for x in xs], anyway, 0.4, label="task A done anyway, told its pair's B")
    ax3.set_xticks(list(xs), tasks, rotation=40, ha="right")
    ax3.set_ylim(0, 1.05)
    ax3.legend(fontsize=8, loc="lower left")
    ax3.set_title("language swap (shipped policy)")
    fig.tight_layout()
    fig.savefig(HERE / "policy_tiny.png", dpi=110)
    print(json.dumps({n: v["success_overall"] for n, v in summary["runs"].items()}, indent=1))


if __name__ == "__main__":
    main()
