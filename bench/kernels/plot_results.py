"""Plot a bench_kernels.py result file: per-layer time relative to bf16 cuBLAS, per shape and token
count (left), and the whole decoder (right).

    python bench/kernels/plot_results.py bench/kernels/results/run2_h200/results_nvidia_h200.json
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path: str) -> Path:
    report = json.loads(Path(path).read_text())
    rows = report["layers"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    methods = ["torch int4 weight-only g128", "fp8 scaled_mm (GEMM only)", "ours avg8 A16", "ours avg4 A16",
               "ours avg3 A16", "ours avg4 A8 (+act quant)"]
    fig, axes = plt.subplots(1, len(shapes) + 1, figsize=(5 * (len(shapes) + 1), 4.2))
    for ax, shape in zip(axes, shapes):
        tokens = sorted({r["M"] for r in rows if r["shape"] == shape})
        bf16 = {r["M"]: r["time_us"] for r in rows if r["shape"] == shape and r["method"] == "bf16 cuBLAS"}
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            speed = [bf16[m] / next((r["time_us"] for r in rows if r["shape"] == shape and r["M"] == m
                                     and r["method"] == method), float("nan")) for m in tokens]
            ax.bar([t + i * width for t in range(len(tokens))], speed, width, label=method)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(3.0, color="r", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tokens))], [str(m) for m in tokens])
        ax.set_xlabel("tokens (M)")
        ax.set_title(f"{shape}: speed-up over bf16 cuBLAS")
    axes[0].legend(fontsize=7)
    dec = report["decoder"]
    labels = [f"{d['kind']} {d['tokens']}t A{d['act_bits']}" + (f" {d['tiles']}" if d.get("tiles") else "")
              for d in dec]
    axes[-1].barh(labels, [d["time_ms"] for d in dec], color=["gray" if d["kind"] == "bf16" else "C1" for d in dec])
    axes[-1].set_xlabel("ms per forward (CUDA graph)")
    axes[-1].set_title("32-block Llama-2-7B decoder")
    fig.suptitle(f"Mixed-bit GEMM kernels on {report['device']['name']}")
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(main(sys.argv[1] if len(sys.argv) > 1 else "bench/kernels/results/run2_h200/results_nvidia_h200.json"))
