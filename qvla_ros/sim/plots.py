"""Plot of evaluation results: success rate per task with Wilson 95% intervals."""
from __future__ import annotations

from pathlib import Path

__all__ = ["plot_success"]


def plot_success(results, path: str | Path, title: str | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [*results.per_task.items(), ("overall", results.overall)]
    names = [n for n, _ in rows]
    rates = [r["rate"] for _, r in rows]
    err = [[r["rate"] - r["ci95"][0] for _, r in rows], [r["ci95"][1] - r["rate"] for _, r in rows]]
    colors = ["tab:blue"] * len(results.per_task) + ["tab:orange"]

    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(rows) + 2), 4.0))
    ax.bar(range(len(rows)), rates, yerr=err, capsize=3, color=colors)
    for i, (_, r) in enumerate(rows):
        ax.text(i, 0.02, f"{r['successes']}/{r['episodes']}", ha="center", va="bottom",
                fontsize=7, color="white", rotation=90)
    ax.set_xticks(range(len(rows)), names, rotation=45, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate (95% Wilson CI)")
    policy = results.settings.get("policy", {})
    ax.set_title(title or f"closed-loop success: {policy.get('kind', '')} {policy.get('path', '')}".strip())
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
