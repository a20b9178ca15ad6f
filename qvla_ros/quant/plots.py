"""Figures of bit plans (matplotlib, Agg)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .packing import GROUP_ORDER
from .plan import BitPlan

_COLOURS = {16: "#1b4f72", 8: "#2e86c1", 4: "#48c9b0", 3: "#f4d03f", 2: "#e67e22", 0: "#cb4335"}


def _short(name: str) -> str:
    return (name.replace("vision.0.encoder.layers.", "vit.").replace("decoder.layers.", "dec.")
            .replace("self_attn.", "").replace("mlp.", ""))


def plot_allocation(plan: BitPlan, path: str | Path, title: str | None = None) -> Path:
    """Per layer: share of rows at each width (stacked bars) and the layer's bits/param (line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(plan.layers.values())
    names = [_short(l.name) for l in layers]
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(8, 0.22 * len(layers) + 3), 4.8))
    bottom = np.zeros(len(layers))
    for b in (*GROUP_ORDER, 0):
        share = np.array([l.counts[b] / l.out_features for l in layers])
        if share.any():
            ax.bar(x, share, bottom=bottom, color=_COLOURS[b], width=0.85, label="pruned" if b == 0 else f"{b} bit")
            bottom += share
    ax.set_ylabel("share of output channels")
    ax.set_ylim(0, 1)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    twin = ax.twinx()
    twin.plot(x, [l.weight_bits() / l.params for l in layers], "k.-", lw=1, ms=3, label="bits/param")
    twin.set_ylabel("bits per parameter (scales, zeros, indices included)")
    twin.set_ylim(0, 17)
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = twin.get_legend_handles_labels()
    ax.legend(handles + h2, labels + l2, loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=8, fontsize=7,
              frameon=False)
    budget = "" if plan.budget_bits_per_param is None else f" (budget {plan.budget_bits_per_param:g})"
    ax.set_title(title or f"plan {plan.plan_id}: {plan.bits_per_param():.3f} bits/param{budget}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
