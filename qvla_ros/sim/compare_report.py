"""The comparison table (markdown) and plot (success vs. bits/param, one line per method)."""
from __future__ import annotations

from pathlib import Path

from ..io import atomic_write, atomic_write_text
from .paired import compare_paired

#: offline metrics' key for quant.action_error against the float policy (the chunk's summed squared
#: difference, averaged over frames). Tables written before it recorded "action_mse_vs_fp", the
#: per-element mean (smaller by horizon x action_dim); those rows show no deviation here.
DEVIATION_KEY = "action_error_vs_fp"


#: a baseline "at the same memory" as a QVLA row may hold this many more bits per parameter (QVLA is
#: allocated to the baseline's measured bits; padding makes the two differ by a few thousandths)
SAME_MEMORY_SLACK = 0.02


def add_paired_tests(rows: list[dict]) -> None:
    """row["paired"] for every row with closed-loop outcomes: the paired comparison (same tasks and
    seeds; sim.paired: success difference with a 95% bootstrap interval, exact McNemar p) against
    the float policy ("vs_fp") and, for QVLA rows, against the best baseline at no more memory
    ("vs_best_baseline": the non-QVLA quantized method with the highest success whose bits/param
    is at most the row's + SAME_MEMORY_SLACK)."""
    def outcomes(row):
        return ((row.get("closed_loop") or {}).get("outcomes")) or None

    def bits(row):
        return row["memory"]["bits_per_param"]

    fp = next((r for r in rows if r["method"]["family"] == "fp" and outcomes(r)), None)
    baselines = [r for r in rows if r["method"]["family"] not in ("fp", "qvla") and outcomes(r)]
    for row in rows:
        mine = outcomes(row)
        if mine is None or row["method"]["family"] == "fp":
            continue
        paired = {}
        if fp is not None:
            paired["vs_fp"] = {"method": fp["method"]["name"], **compare_paired(mine, outcomes(fp))}
        if row["method"]["family"] == "qvla":
            peers = [r for r in baselines if bits(r) <= bits(row) + SAME_MEMORY_SLACK]
            if peers:
                best = max(peers, key=lambda r: r["closed_loop"]["overall"]["rate"])
                paired["vs_best_baseline"] = {"method": best["method"]["name"],
                                              **compare_paired(mine, outcomes(best))}
        row["paired"] = paired


def _paired_cell(p: dict | None) -> str:
    if not p:
        return "–"
    lo, hi = p["ci"]
    return f"{100 * p['difference']:+.0f} [{100 * lo:+.0f}, {100 * hi:+.0f}], p={p['p_value']:.2g}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}"


def _ci(r: dict | None) -> str:
    if not r:
        return "–"
    lo, hi = r["ci95"]
    return f"{100 * r['rate']:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def _sci(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def write_markdown(doc: dict, path: str | Path) -> Path:
    """compare.md: one row per method; per-task success (%), average with its Wilson 95% CI,
    measured weight memory (% of bf16, bits/param), offline action errors."""
    rows = doc["rows"]
    tasks: list[str] = []
    for row in rows:
        for t in (row.get("closed_loop") or {}).get("per_task", {}):
            if t not in tasks:
                tasks.append(t)
    s = doc["settings"]
    m = doc["machine"]
    lines = [
        "# QVLA vs. baselines",
        "",
        f"Policy `{doc['policy'].get('config')}` (weights {doc['policy']['weights'][:12]}), "
        f"{doc['calibration'].get('frames', s['frames'])} calibration frames "
        f"({doc['calibration'].get('data')}, split {doc['calibration'].get('split', '-')}), "
        f"{s['episodes_per_task']} episodes per task of {s.get('suite', 'metaworld')} (held-out seeds), "
        f"max {s['max_steps']} steps, "
        f"QVLA sensitivity: {s['estimator']}.",
        f"Ran on: {m['cpu']} ({m['cores']} cores), torch {m['torch']}, {s['workers']} rollout workers, "
        f"device {s.get('device', 'cpu')}, float policy in {s.get('dtype', 'float32')}.",
        "",
        "Success in %; the average carries its Wilson 95% interval. Memory is measured from the "
        "stored tensors of the quantized Linears (codes, scales, zero-points, row indices, group "
        "scales, explicit input scales), relative to the same weights in bf16; 'bits/param' counts "
        "those Linears' weights, 'whole bits/param' every weight of the policy (the rest at its "
        "stored width). Paired columns compare episode by episode on the same seeds: the "
        "difference in success points with a 95% bootstrap interval and the exact McNemar p; a "
        "QVLA row's best baseline is the most successful baseline at no more memory.",
        "",
    ]
    head = (["method", "W/A", "bits/param", "whole bits/param", "mem % bf16", "offline L1", "dev. from fp (action error)"]
            + tasks + ["average [95% CI]", "vs fp: points [95% CI], McNemar p", "vs best baseline"])
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * len(head)) + "|")
    for row in rows:
        spec = row["method"]
        mem = row["memory"]
        off = row.get("offline") or {}
        cl = row.get("closed_loop") or {}
        per_task = cl.get("per_task", {})
        wa = ("fp" if spec["family"] == "fp" else
              f"{'mixed' if spec['wbits'] is None else spec['wbits']}/{spec['abits']}")
        whole = mem.get("policy_bits_per_param")
        cells = [spec["name"], wa, f"{mem['bits_per_param']:.3f}", "–" if whole is None else f"{whole:.3f}",
                 f"{mem['percent_of_bf16']:.1f}",
                 _sci(off.get("l1")), _sci(off.get(DEVIATION_KEY))]
        cells += [_pct(per_task[t]["rate"]) if t in per_task else "–" for t in tasks]
        cells.append(_ci(cl.get("overall")))
        paired = row.get("paired") or {}
        best = paired.get("vs_best_baseline")
        cells += [_paired_cell(paired.get("vs_fp")),
                  "–" if best is None else f"{best['method']}: {_paired_cell(best)}"]
        lines.append("| " + " | ".join(cells) + " |")
    return atomic_write_text(path, "\n".join(lines) + "\n")


def plot_comparison(doc: dict, path: str | Path) -> Path:
    """compare.png: closed-loop success (left) and offline deviation from fp (right) against
    measured bits/param, one line per method (a method's points at its bit-widths)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[dict]] = {}
    for row in doc["rows"]:
        lines.setdefault(row["label"], []).append(row)
    fig, (ax_s, ax_e) = plt.subplots(1, 2, figsize=(12, 4.6))
    for label, rows in lines.items():
        rows = sorted(rows, key=lambda r: r["memory"]["bits_per_param"])
        if label == "fp":
            # The float policy is the reference: a level (with its CI band) to reach, not a curve;
            # its deviation from itself is 0 and has no place on a log axis.
            overall = (rows[0].get("closed_loop") or {}).get("overall")
            if overall:
                ax_s.axhline(100 * overall["rate"], color="black", linestyle="--", label="fp (bf16 = 16)")
                ax_s.axhspan(100 * overall["ci95"][0], 100 * overall["ci95"][1], color="black", alpha=0.08)
            continue
        x = [r["memory"]["bits_per_param"] for r in rows]
        style = dict(marker="o", linestyle="-", label=label)
        if label.startswith("QVLA"):
            style.update(linewidth=2.5, marker="s")
        succ = [(r.get("closed_loop") or {}).get("overall") for r in rows]
        if all(succ):
            y = [100 * s["rate"] for s in succ]
            err = [[100 * (s["rate"] - s["ci95"][0]) for s in succ],
                   [100 * (s["ci95"][1] - s["rate"]) for s in succ]]
            ax_s.errorbar(x, y, yerr=err, capsize=3, **style)
        dev = [(r.get("offline") or {}).get(DEVIATION_KEY) for r in rows]
        if all(d is not None for d in dev):
            ax_e.plot(x, [max(d, 1e-12) for d in dev], **style)
    ax_s.set_xlabel("measured weight memory (bits / param)")
    ax_s.set_ylabel("closed-loop success (%) with 95% CI")
    ax_s.set_ylim(-2, 102)
    ax_s.grid(alpha=0.3)
    ax_e.set_xlabel("measured weight memory (bits / param)")
    ax_e.set_ylabel("action error vs. float policy (held-out frames)")
    ax_e.set_yscale("log")
    ax_e.grid(alpha=0.3)
    handles, labels = ax_s.get_legend_handles_labels()
    if len(handles) < len(lines):
        handles, labels = ax_e.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 8), fontsize=8)
    s = doc["settings"]
    fig.suptitle(f"{s['episodes_per_task']} episodes/task, {doc['machine']['cpu']}", y=0.02, fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 0.9))
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
