"""Does the first-order proxy order the channels like the exact action cost? Checked where it can fail.

    PYTHONPATH=. .venv/bin/python bench/quant/proxy_validation.py [--data DEMO_DIR] [--frames 8]
        [--channels 24] [--out bench/quant]

The shipped `tiny` policy (qvla_ros.policy.load_policy(None)); calibration frames from scripted-
expert demonstrations ("train" split). With no --data, a small demo folder is made first with
`qvla demos --episodes-per-task 2` (about a minute) in a temporary directory; --synthetic uses
random frames instead (no demonstrations needed, worse: not the policy's input distribution).

1. exact_sensitivity on a seeded sample of --channels output channels of every quantizable layer,
   at every width (0/2/3/4/8 bits), on --frames frames;
2. jacobian_sensitivity (unit vectors: exact first order), the same with 8 random projections,
   and the layer-local proxy (||x dW_c||^2; a baseline known to rank worse), on the same frames;
3. rank_agreement of each against exact: per layer and per width, Spearman and top-10% overlap,
   each beside the same statistic for random channel orders of that cell (the null).
Writes proxy_validation.json (per cell statistics, null statistics, summaries, seconds, CPU),
proxy_validation.png, and the two tables (proxy_validation_{exact,jacobian}.safetensors) so that
--from-tables re-analyses without re-measuring.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from qvla_ros.policy import load_policy  # noqa: E402
from qvla_ros.quant.calibration import frames_from_demos, synthetic_frames  # noqa: E402
from qvla_ros.quant.plots import _short  # noqa: E402
from qvla_ros.quant.sensitivity import (SensitivityTable, compare_tables, exact_sensitivity,  # noqa: E402
                                        jacobian_sensitivity, layer_local_sensitivity, rank_agreement)
from qvla_ros.sim.evaluate import cpu_model  # noqa: E402

BITS = (0, 2, 3, 4, 8, 16)


def make_demos(folder: Path) -> float:
    started = time.time()
    cmd = [sys.executable, "-m", "qvla_ros.cli", "demos", "--out", str(folder), "--episodes-per-task", "2",
           "--max-steps", "150", "--workers", "0", "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    return time.time() - started


def plot(agreements: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = agreements["jacobian"]
    bits = main["bits"]
    layers = list(main["cells"])
    x = np.arange(len(layers))
    styles = {"jacobian": ("#1f77b4", "o"), "jacobian_8proj": ("#2ca02c", "x"), "layer_local": ("#d62728", "s")}
    fig, axes = plt.subplots(2, len(bits), figsize=(4.0 * len(bits), 7.5), sharex=True, sharey="row")
    for j, b in enumerate(bits):
        for row, stat in enumerate(("spearman", "overlap")):
            ax = axes[row, j]
            cells = [main["cells"][n].get(b) for n in layers]
            p95 = np.array([c[f"{stat}_null_p95"] if c else np.nan for c in cells])
            mean = np.array([c[f"{stat}_null_mean"] if c else np.nan for c in cells])
            lo = -1.0 if stat == "spearman" else 0.0
            ax.fill_between(x, lo, p95, color="0.85", step="mid", label="random order: below 95th pct")
            ax.plot(x, mean, color="0.5", lw=0.8, drawstyle="steps-mid", label="random order: mean")
            for key, agr in agreements.items():
                colour, marker = styles.get(key, ("k", "."))
                vals = np.array([agr["cells"].get(n, {}).get(b, {}).get(stat, np.nan) for n in layers])
                ax.plot(x, vals, marker, color=colour, ms=3.5, mfc="none" if marker == "s" else colour,
                        ls="none", label=key.replace("_", " "))
            s = main["per_bits"][b]
            ax.set_title(f"{b} bit{'s (pruned)' if b == 0 else 's'}: {stat}\njacobian beats null in "
                         f"{s[f'{stat}_beats_null'] * s['cells']:.0f}/{s['cells']} layers", fontsize=9)
            ax.set_ylim(lo - 0.05, 1.05)
            ax.axvline(23.5, color="0.7", lw=0.6, ls=":")
            if j == 0:
                ax.set_ylabel("Spearman (within layer)" if stat == "spearman" else "top-10% overlap")
            if row == 1:
                ax.set_xticks(x[::4])
                ax.set_xticklabels([_short(n) for n in layers][::4], rotation=90, fontsize=6)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="demonstration folder (default: make a small one with `qvla demos`)")
    ap.add_argument("--synthetic", action="store_true", help="random frames instead of demonstrations")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--channels", type=int, default=24, help="exact: sampled channels per layer")
    ap.add_argument("--null-draws", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "bench" / "quant"))
    ap.add_argument("--from-tables", action="store_true",
                    help="re-analyse the saved proxy_validation_*.safetensors instead of measuring")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    policy = load_policy(None)
    results: dict = {"cpu": cpu_model(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                     "policy": "tiny (shipped, qvla_ros.policy.load_policy(None))", "bits": list(BITS),
                     "args": vars(args)}
    tmp = None
    if args.synthetic:
        frames = synthetic_frames(policy.config, args.frames, seed=args.seed)
    else:
        data = args.data
        if data is None:
            tmp = tempfile.TemporaryDirectory(prefix="qvla-demos-")
            data = Path(tmp.name) / "demos"
            results["demos_seconds"] = round(make_demos(data), 1)
            results["demos"] = "made by `qvla demos --episodes-per-task 2 --max-steps 150` (temporary folder)"
        frames = frames_from_demos(data, args.frames, split="train", seed=args.seed)
    results["calibration"] = {k: v for k, v in frames.source.items() if k != "manifest_recipe"}
    exact_path, jac_path = out / "proxy_validation_exact.safetensors", out / "proxy_validation_jacobian.safetensors"
    seconds = {}
    if args.from_tables:
        exact, jac = SensitivityTable.load(exact_path), SensitivityTable.load(jac_path)
        rnd = None
    else:
        t = time.time()
        jac = jacobian_sensitivity(policy, frames, bits=BITS, progress=False)
        seconds["jacobian"] = round(time.time() - t, 1)
        t = time.time()
        rnd = jacobian_sensitivity(policy, frames, bits=BITS, projections=8, seed=args.seed, progress=False)
        seconds["jacobian_8proj"] = round(time.time() - t, 1)
        t = time.time()
        exact = exact_sensitivity(policy, frames, bits=BITS, max_channels=args.channels, seed=args.seed,
                                  progress=True)
        seconds["exact"] = round(time.time() - t, 1)
        results["exact_replay_max_abs_error"] = exact.meta["replay_max_abs_error"]
        results["exact_perturbations"] = int(sum(np.isfinite(c[:, :-1]).sum() for c in exact.costs.values()))
        exact.save(exact_path)
        jac.save(jac_path)
    t = time.time()
    local = layer_local_sensitivity(policy, frames, bits=BITS)
    seconds["layer_local"] = round(time.time() - t, 1)
    estimates = {"jacobian": jac, "layer_local": local}
    if rnd is not None:
        estimates["jacobian_8proj"] = rnd
    t = time.time()
    agreements = {key: rank_agreement(exact, est, top=0.10, null_draws=args.null_draws, seed=args.seed)
                  for key, est in estimates.items()}
    seconds["rank_agreement"] = round(time.time() - t, 1)
    results["seconds"] = seconds
    results["frames"] = len(frames)
    results["channels_per_layer"] = args.channels
    results["layers"] = len(exact.costs)
    results["compare_tables_pooled"] = {key: {"overall": compare_tables(exact, est)["overall"]}
                                        for key, est in estimates.items()}
    results["summary"] = {key: {"all": a["summary"], "per_bits": a["per_bits"]} for key, a in agreements.items()}
    results["cells"] = {key: a["cells"] for key, a in agreements.items()}
    results["per_layer"] = {key: a["per_layer"] for key, a in agreements.items()}
    results["top"] = 0.10
    results["null_draws"] = args.null_draws
    results["wall_seconds"] = round(time.time() - started, 1)
    src = "synthetic frames" if args.synthetic else "demonstration frames"
    plot(agreements, out / "proxy_validation.png",
         f"tiny policy, {len(frames)} {src}, exact on {args.channels} channels/layer vs proxies; "
         f"grey: random channel order ({args.null_draws} draws) below its 95th percentile")
    (out / "proxy_validation.json").write_text(json.dumps(results, indent=1, default=float))
    for key, a in agreements.items():
        s = a["summary"]
        print(f"{key:15s} cells {s['cells']}: spearman median {s['spearman_median']:.3f} beats null "
              f"{s['spearman_beats_null']:.0%}; top-10% overlap median {s['overlap_median']:.2f} beats null "
              f"{s['overlap_beats_null']:.0%}; pooled {s['pooled_spearman']:.3f} (null {s['pooled_spearman_null_mean']:.3f})")
        for b, pb in a["per_bits"].items():
            print(f"   {b} bits: spearman med {pb['spearman_median']:.3f} min {pb['spearman_min']:.3f} "
                  f"beats {pb['spearman_beats_null']:.0%} | overlap med {pb['overlap_median']:.2f} "
                  f"min {pb['overlap_min']:.2f} beats {pb['overlap_beats_null']:.0%}")
    print("seconds", seconds, "wall", results["wall_seconds"])
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
