"""QVLA on the shipped policy, offline: sensitivity estimators, action error vs budget, bytes.

    .venv/bin/python bench/quant/run_quant_bench.py --data DEMO_DIR [--policy default] [--out bench/quant]

1. Calibration frames (demonstrations, "train" split) and held-out frames ("val" split).
2. Sensitivity: the jacobian estimator over every channel; the exact estimator on a seeded sample
   of channels per layer (same frames); Spearman agreement per layer, per width and overall; the
   hybrid table (jacobian rescaled per layer and width by the exact sample).
3. For each budget (bits/param, scales/zeros/indices included): allocate with each table, quantize
   the policy for real (packed MixedBitLinear), measure the action error on held-out frames:
   E ||A_q - A_fp||^2 over the chunk (the quantity the allocation minimises) and the L1 of the
   first action against the demonstration's.
4. Uniform round-to-nearest (every channel at 2/3/4/8 bits, same quantizer) and QVLA at the same
   measured bits/param.
5. Bytes: packed weight bytes in memory and on disk vs the plan's prediction.
Writes results.json, README.md (tables, the CPU) and plots into --out.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from qvla_ros.policy import load_policy  # noqa: E402
from qvla_ros.quant.allocate import allocate, assignment_cost, uniform_bits  # noqa: E402
from qvla_ros.quant.api import quantize_, quantized_weight_nbytes, set_dequant_cache  # noqa: E402
from qvla_ros.quant.checkpoint import disk_weight_nbytes, save_quantized  # noqa: E402
from qvla_ros.quant.action_error import action_error_per_frame  # noqa: E402
from qvla_ros.quant.refine import DEFAULT_VARIANTS, predict_actions, select_allocation  # noqa: E402
from qvla_ros.quant.calibration import frames_from_demos  # noqa: E402
from qvla_ros.quant.plan import plan_from_bits  # noqa: E402
from qvla_ros.quant.plots import plot_allocation  # noqa: E402
from qvla_ros.quant.sensitivity import (SensitivityTable, compare_tables, exact_sensitivity,  # noqa: E402
                                        jacobian_sensitivity, layer_local_sensitivity, rescale_to_exact)
from qvla_ros.sim.evaluate import cpu_model  # noqa: E402


def action_errors(policy, frames, reference: torch.Tensor) -> dict:
    pred = predict_actions(policy, frames)
    per_frame = action_error_per_frame(pred, reference).numpy()
    kept = np.sort(per_frame)[: int(np.ceil(0.99 * len(per_frame)))]
    # The mean is dominated by a few frames where the policy sits on a decision boundary (a tiny
    # change flips the chunk); the median, p90 and the 1%-trimmed mean show the typical frame.
    out = {"mse_chunk_vs_fp": float(per_frame.mean()), "median_chunk_vs_fp": float(np.median(per_frame)),
           "p90_chunk_vs_fp": float(np.quantile(per_frame, 0.9)), "trimmed_mean_chunk_vs_fp": float(kept.mean()),
           "top5_share": float(np.sort(per_frame)[-5:].sum() / max(per_frame.sum(), 1e-30))}
    if frames.actions is not None:
        out["l1_first_vs_demo"] = float((pred[:, 0] - frames.actions).abs().mean())
    return out


def evaluate_plan(float_policy, plan, held_out, reference, workdir: Path) -> dict:
    q = copy.deepcopy(float_policy)
    quantize_(q, plan)
    set_dequant_cache(q, True)  # speed only: the memory figures count the packed buffers
    row = {"plan_id": plan.plan_id, "bits_per_param": plan.bits_per_param(),
           "predicted_weight_bytes": plan.weight_nbytes(), "memory_weight_bytes": quantized_weight_nbytes(q)}
    directory = save_quantized(q, plan, workdir / plan.plan_id)
    row["disk_weight_bytes"] = disk_weight_nbytes(directory, plan)
    row["bytes_rel_diff_memory"] = row["memory_weight_bytes"] / row["predicted_weight_bytes"] - 1
    row["bytes_rel_diff_disk"] = row["disk_weight_bytes"] / row["predicted_weight_bytes"] - 1
    row.update(action_errors(q, held_out, reference))
    row["totals"] = {str(k): v for k, v in plan.totals().items()}
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default="default")
    ap.add_argument("--data", required=True, help="demonstration folder")
    ap.add_argument("--out", default=str(REPO / "bench" / "quant"))
    ap.add_argument("--calib-frames", type=int, default=256)
    ap.add_argument("--projections", type=int, default=8, help="jacobian: random projections per frame")
    ap.add_argument("--select-frames", type=int, default=128,
                    help="train-split frames (not the calibration ones) on which the allocation variants are compared")
    ap.add_argument("--exact-frames", type=int, default=4)
    ap.add_argument("--exact-channels", type=int, default=8, help="sampled channels per layer for the exact estimator")
    ap.add_argument("--held-out-frames", type=int, default=100000, help="held-out frames (default: all)")
    ap.add_argument("--budgets", default="2.5,3,4,6,8")
    ap.add_argument("--plans-dir", default=None, help="also write the plans at these budgets here (config/plans)")
    ap.add_argument("--ship-budgets", default="2.5,3,4,6")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse", action="store_true", help="load the sensitivity tables already in --out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    policy = load_policy(None if args.policy == "default" else args.policy)
    calib = frames_from_demos(args.data, args.calib_frames, split="train", seed=args.seed)
    held_out = frames_from_demos(args.data, args.held_out_frames, split="val", seed=args.seed + 1)
    select_frames = frames_from_demos(args.data, args.select_frames, split="train", seed=args.seed + 3)
    reference = predict_actions(policy, held_out)
    results: dict = {"cpu": cpu_model(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                     "policy": args.policy, "data": args.data, "calib_frames": len(calib),
                     "held_out_frames": len(held_out), "select_frames": len(select_frames),
                     "projections": args.projections, "float_policy": {}}
    if held_out.actions is not None:
        results["float_policy"]["l1_first_vs_demo"] = float((reference[:, 0] - held_out.actions).abs().mean())

    # ---- sensitivity ---------------------------------------------------------------------------
    exact_frames = frames_from_demos(args.data, args.exact_frames, split="train", seed=args.seed + 2)
    jac_path, exact_path = out / "sensitivity_jacobian.safetensors", out / "sensitivity_exact_sample.safetensors"
    if args.reuse and jac_path.is_file():
        jac = SensitivityTable.load(jac_path)
    else:
        jac = jacobian_sensitivity(policy, calib, projections=args.projections, seed=args.seed)
        jac.save(jac_path)
    if args.reuse and exact_path.is_file():
        exact = SensitivityTable.load(exact_path)
    else:
        exact = exact_sensitivity(policy, exact_frames, max_channels=args.exact_channels, seed=args.seed)
        exact.save(exact_path)
    jac_same = jacobian_sensitivity(policy, exact_frames, seed=args.seed, progress=False)
    local = layer_local_sensitivity(policy, calib)
    agreement = compare_tables(exact, jac_same)
    hybrid = rescale_to_exact(jac, exact, jac_same)
    results["sensitivity"] = {
        "jacobian_seconds": jac.meta["seconds"], "exact_seconds_sample": exact.meta["seconds"],
        "exact_perturbations": int(sum(np.isfinite(c).all(axis=1).sum() for c in exact.costs.values()) * 5),
        "exact_replay_max_abs_error": exact.meta["replay_max_abs_error"],
        "channels": int(sum(c.shape[0] for c in jac.costs.values())),
        "spearman_jacobian_vs_exact_same_frames": agreement,
        "spearman_hybrid_vs_exact": compare_tables(exact, hybrid)["overall"],
        "spearman_layer_local_vs_exact": compare_tables(exact, local)["overall"],
        "layer_local_within_layer_median_per_bits": compare_tables(exact, local)["within_layer_median_per_bits"],
    }
    _plot_spearman(exact, jac_same, agreement, out / "spearman_jacobian_vs_exact.png")

    # ---- allocation at each budget -------------------------------------------------------------
    rows = []
    work = Path(tempfile.mkdtemp(prefix="qvla_bench_"))
    select_reference = predict_actions(policy, select_frames)
    selected_plans = {}

    def qvla_rows(budget, label, extra):
        """QVLA at `budget`: both variants evaluated, the one chosen on train frames marked."""
        name, chosen, measured = select_allocation(policy, select_frames, jac, budget, reference=select_reference)
        out = []
        for variant, kwargs in DEFAULT_VARIANTS.items():
            a = chosen if variant == name else allocate(jac, budget, **kwargs)
            plan = a.to_plan(jac, provenance={"selection": {"variant": variant, "selected": variant == name,
                                                            "measured_on_select_frames": measured}})
            row = {"method": f"qvla ({variant})", "selected": variant == name, "budget": budget,
                   "predicted_cost": a.cost, "select_frames_error": measured[variant],
                   "relative_duality_gap": a.relative_gap, "allocate_seconds": a.seconds, **extra}
            row.update(evaluate_plan(policy, plan, held_out, reference, work))
            out.append(row)
            if variant == name:
                selected_plans[(label, budget)] = plan
        return out

    budgets = [float(b) for b in args.budgets.split(",")]
    for budget in budgets:
        rows += qvla_rows(budget, "budget", {})
        a = allocate(local, budget)
        row = {"method": "layer-local proxy", "budget": budget, "predicted_cost": assignment_cost(jac, a.bits)}
        row.update(evaluate_plan(policy, a.to_plan(local), held_out, reference, work))
        rows.append(row)
        print(json.dumps({k: r.get(k) for r in rows[-3:] for k in ("method", "budget", "mse_chunk_vs_fp")}), flush=True)
    if (("budget", 4.0)) in selected_plans:
        plot_allocation(selected_plans[("budget", 4.0)], out / "allocation_4.0.png")
    # uniform RTN and QVLA at its measured bits/param
    for bits in (2, 3, 4, 8):
        ub = uniform_bits(jac, bits)
        plan = plan_from_bits(policy, ub, provenance={"method": f"uniform RTN W{bits}"})
        row = {"method": "uniform RTN", "budget": None, "weight_bits": bits, "predicted_cost": assignment_cost(jac, ub)}
        row.update(evaluate_plan(policy, plan, held_out, reference, work))
        rows.append(row)
        rows += qvla_rows(plan.bits_per_param(), "rtn", {"matches_weight_bits": bits})
        print(json.dumps({"uniform": bits, "bpp": plan.bits_per_param(), "mse": row["mse_chunk_vs_fp"]}), flush=True)
    results["rows"] = rows
    results["max_bytes_rel_diff"] = max(max(abs(r["bytes_rel_diff_memory"]), abs(r["bytes_rel_diff_disk"])) for r in rows)
    results["wall_seconds"] = round(time.time() - started, 1)
    _plot_error_vs_budget(rows, out / "action_error_vs_budget.png")

    # ---- shipped plans -------------------------------------------------------------------------
    if args.plans_dir:
        plans_dir = Path(args.plans_dir)
        shipped = {}
        for budget in [float(b) for b in args.ship_budgets.split(",")]:
            plan = selected_plans.get(("budget", budget))
            if plan is None:
                name, a, measured = select_allocation(policy, select_frames, jac, budget, reference=select_reference)
                plan = a.to_plan(jac, provenance={"selection": {"variant": name, "measured_on_select_frames": measured}})
            plan.provenance["made_by"] = "bench/quant/run_quant_bench.py"
            path = plan.save(plans_dir / f"tiny_qvla_{budget:.1f}.json")
            plot_allocation(plan, plans_dir / f"tiny_qvla_{budget:.1f}.png")
            shipped[path.name] = {"plan_id": plan.plan_id, "bits_per_param": plan.bits_per_param(),
                                  "weight_bytes": plan.weight_nbytes(), "variant": plan.provenance["selection"]["variant"]}
        results["shipped_plans"] = shipped
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    _write_readme(results, out / "README.md")
    print(f"done in {results['wall_seconds']} s -> {out}")
    return 0


def _plot_spearman(exact: SensitivityTable, jac: SensitivityTable, agreement: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    colours = {0: "#cb4335", 2: "#e67e22", 3: "#f4d03f", 4: "#48c9b0", 8: "#2e86c1"}
    for b, colour in colours.items():
        xs, ys = [], []
        for name, table in exact.costs.items():
            keep = exact.measured(name)
            xs.append(table[keep, exact.column(b)])
            ys.append(jac.costs[name][keep, jac.column(b)])
        x, y = np.concatenate(xs), np.concatenate(ys)
        ok = (x > 0) & (y > 0)
        ax.loglog(x[ok], y[ok], ".", ms=3, color=colour, label=f"{'pruned' if b == 0 else f'{b} bit'} "
                  f"(rho {agreement['per_bits'].get(b, float('nan')):.3f})")
    lo, hi = ax.get_xlim()
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel("exact: E||A(q) - A*||^2")
    ax.set_ylabel("jacobian (first order)")
    ax.set_title(f"sensitivity, sampled channels: Spearman {agreement['overall']:.3f}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _plot_error_vs_budget(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    styles = {"qvla (all widths)": ("o-", "#2e86c1"), "qvla (no pruning)": ("s-", "#1b4f72"),
              "layer-local proxy": ("d:", "#7d3c98"), "uniform RTN": ("^--", "#cb4335")}
    for ax, key, label in ((axes[0], "mse_chunk_vs_fp", "mean"), (axes[1], "median_chunk_vs_fp", "median")):
        for method, (style, colour) in styles.items():
            pts = sorted((r["bits_per_param"], r[key]) for r in rows if r["method"] == method)
            if pts:
                ax.semilogy(*zip(*pts), style, color=colour, label=method, ms=4)
        sel = sorted((r["bits_per_param"], r[key]) for r in rows if r.get("selected"))
        if sel:
            ax.semilogy(*zip(*sel), "o", mfc="none", mec="k", ms=9, label="qvla: variant chosen on train frames")
        ax.set_xlabel("bits per parameter (scales, zeros, row indices included)")
        ax.set_ylabel(f"held-out ||A_q - A_fp||^2 per frame ({label})")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _write_readme(results: dict, path: Path) -> None:
    s = results["sensitivity"]
    ag = s["spearman_jacobian_vs_exact_same_frames"]
    lines = [
        "# QVLA offline benchmark (shipped tiny policy)",
        "",
        f"Produced by `bench/quant/run_quant_bench.py` on **{results['cpu']}** "
        f"({results['torch_threads']} torch threads, torch {results['torch']}), {results['wall_seconds']} s wall.",
        f"Calibration: {results['calib_frames']} demonstration frames (train split, jacobian with "
        f"{results['projections']} random projections each); variant selection: {results['select_frames']} other "
        f"train-split frames; evaluation: {results['held_out_frames']} held-out frames (val split, every frame "
        "of the held-out episodes).",
        "",
        "## Sensitivity estimators",
        "",
        f"- jacobian (all {s['channels']} channels, every width): {s['jacobian_seconds']:.1f} s",
        f"- exact (sampled channels, {s['exact_perturbations']} perturbations): {s['exact_seconds_sample']:.1f} s; "
        f"replayed-prefix check max |dA| {s['exact_replay_max_abs_error']:.2e}",
        f"- Spearman jacobian vs exact (same frames, {ag['entries']} entries): overall **{ag['overall']:.4f}**; "
        "per width " + ", ".join(f"{b}: {v:.3f}" for b, v in ag["per_bits"].items()),
        f"- within-layer channel order, median over layers: "
        + ", ".join(f"{b}: {v:.3f}" for b, v in ag["within_layer_median_per_bits"].items()),
        f"- per layer: min {min(ag['per_layer'].values()):.3f}, median {np.median(list(ag['per_layer'].values())):.3f}",
        f"- hybrid (jacobian rescaled per layer and width by the exact sample) vs exact: {s['spearman_hybrid_vs_exact']:.4f}",
        f"- layer-local proxy (||x dW_c||^2, what LLM quantizers rank by) vs exact: {s['spearman_layer_local_vs_exact']:.4f}; "
        "within-layer median per width " + ", ".join(f"{b}: {v:.3f}" for b, v in s["layer_local_within_layer_median_per_bits"].items()),
        "",
        "## Action error vs budget (held-out frames)",
        "",
        "Per held-out frame e = ||A_q - A_fp||^2 summed over the 8x4 chunk; mean, 1%-trimmed mean, median, p90 over frames.",
        "`*` marks the QVLA variant chosen automatically (lower measured error on separate train-split frames).",
        "",
        "| method | budget | bits/param | mean e | trimmed | median e | p90 e | L1 first action vs demo | predicted (table) | weight bytes pred / mem / disk |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        budget = "" if r.get("budget") is None else f"{r['budget']:.3f}"
        name = r["method"] + (f" W{r['weight_bits']}" if "weight_bits" in r else "") + (" *" if r.get("selected") else "")
        lines.append(f"| {name} | {budget} | {r['bits_per_param']:.3f} | {r['mse_chunk_vs_fp']:.3e} | "
                     f"{r['trimmed_mean_chunk_vs_fp']:.3e} | {r['median_chunk_vs_fp']:.2e} | {r['p90_chunk_vs_fp']:.2e} | "
                     f"{r.get('l1_first_vs_demo', float('nan')):.4f} | {r['predicted_cost']:.3e} | "
                     f"{r['predicted_weight_bytes']} / {r['memory_weight_bytes']} / {r['disk_weight_bytes']} |")
    fp = results["float_policy"].get("l1_first_vs_demo")
    if fp is not None:
        lines += ["", f"Float policy L1 of the first action vs demonstrations: {fp:.4f}"]
    lines += ["", f"Largest |measured/predicted - 1| over all plans (memory and disk): {results['max_bytes_rel_diff']:.2e}",
              "", "![action error vs budget](action_error_vs_budget.png)",
              "![spearman](spearman_jacobian_vs_exact.png)", "![allocation at 4 bits/param](allocation_4.0.png)", "",
              "Closed-loop success of these plans (50 episodes per task): [closed_loop.md](closed_loop.md), "
              "made by `bench/quant/closed_loop.py`.", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
