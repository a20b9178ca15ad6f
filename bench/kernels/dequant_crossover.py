"""Where decode-then-cuBLAS starts to beat the grouped GEMM: the OFT-7B layers (avg4, 16-bit
activations) at 16-64 tokens, both paths on the same weights, CUDA-graph timing as bench_kernels.py.

    PYTHONPATH=. python3 bench/kernels/dequant_crossover.py OUT.json

Prints per token count the time summed over the three layer shapes, and the fewest tokens from which
decode-then-cuBLAS is faster at every larger count timed (ops.DEQUANT_MIN_TOKENS' evidence).
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402
from qvla_ros.kernels import dequant_linear, launch_mixed_gemm  # noqa: E402
from qvla_ros.kernels.testing import MIXES, mix_counts, random_kernel_weights  # noqa: E402

TOKENS = (16, 24, 32, 40, 48, 56, 64)


def main(out_path: str) -> None:
    rows = []
    totals = {m: {"gemm": 0.0, "dequant": 0.0} for m in TOKENS}
    for shape, (n, k) in bk.SHAPES.items():
        counts = mix_counts(n, MIXES["avg4"])
        kws = [random_kernel_weights(n, k, counts, "cuda", seed=0)]
        kws += [random_kernel_weights(n, k, counts, "cuda", seed=s) for s in range(1, bk.copies_for(kws[0].nbytes()))]
        for m in TOKENS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = launch_mixed_gemm(x, kws[0], None, x.dtype, 16).float()
            got = dequant_linear(x, kws[0], None).float()
            err = float((got - ref).norm() / ref.norm())
            assert err < 1e-2, (shape, m, err)  # the two paths agree before either is timed
            gemm = bk.graph_time([(lambda kw=kw: launch_mixed_gemm(x, kw, None, x.dtype, 16)) for kw in kws])
            deq = bk.graph_time([(lambda kw=kw: dequant_linear(x, kw, None)) for kw in kws])
            rows.append({"shape": shape, "M": m, "gemm_us": gemm * 1e6, "dequant_us": deq * 1e6})
            totals[m]["gemm"] += gemm * 1e6
            totals[m]["dequant"] += deq * 1e6
            print(rows[-1], flush=True)
        del kws
        torch.cuda.empty_cache()
    faster = [m for m in TOKENS if all(totals[t]["dequant"] < totals[t]["gemm"] for t in TOKENS if t >= m)]
    result = {"device": torch.cuda.get_device_name(0), "rows": rows, "totals_us": totals,
              "dequant_faster_from": min(faster) if faster else None}
    print({m: {k: round(v, 1) for k, v in t.items()} for m, t in totals.items()}, "faster from:",
          result["dequant_faster_from"], flush=True)
    Path(out_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
