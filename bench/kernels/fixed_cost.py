"""Where one-token layer time goes: a fixed cost per launch against a streaming rate.

Each kernel runs one token through layers of K = 4096 features and N = 1024 .. 32768 rows (CUDA-graph
replays over weight copies larger than L2, median, as bench_kernels.py times), and a least-squares
line t = fixed + bytes / rate is fitted over the sizes. The fixed part (launch, first loads' latency,
ramp and drain) is what no kernel can stream away: on a 4096 x 4096 layer it is most of the time.
An empty kernel in the same kind of graph gives the launch part alone.

    PYTHONPATH=. python3 bench/kernels/fixed_cost.py --out DIR
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402
from qvla_ros.kernels import launch_gemv  # noqa: E402
from qvla_ros.kernels.cuda_gemv import launch_mma_gemv, mma_available  # noqa: E402
from qvla_ros.kernels.testing import MIXES, mix_counts, random_kernel_weights  # noqa: E402

K = 4096
SIZES = (1024, 2048, 4096, 8192, 11008, 16384, 32768)


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(fixed seconds, bytes per second) of the least-squares line through (bytes, seconds)."""
    n = len(points)
    mx = sum(b for b, _ in points) / n
    my = sum(t for _, t in points) / n
    slope = sum((b - mx) * (t - my) for b, t in points) / sum((b - mx) ** 2 for b, _ in points)
    return my - slope * mx, 1.0 / slope


def time_sizes(make_calls) -> list[dict]:
    """For each N: (bytes moved, seconds per call) of the calls make_calls(n) returns."""
    rows = []
    for n in SIZES:
        calls, nbytes = make_calls(n)
        t = bk.graph_time(calls)
        rows.append({"N": n, "bytes": nbytes, "time_us": t * 1e6, "rate_TBps": nbytes / t / 1e12})
        del calls
        torch.cuda.empty_cache()
    return rows


def bf16_calls(n):
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    ws = [torch.randn(n, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(bk.copies_for(n * K * 2))]
    return [(lambda w=w: F.linear(x, w)) for w in ws], n * K * 2


def packed_calls(launch, mix):
    def make(n):
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        counts = mix_counts(n, MIXES[mix] if mix in MIXES else {4: 1.0})
        kws = [random_kernel_weights(n, K, counts, "cuda", seed=0)]
        kws += [random_kernel_weights(n, K, counts, "cuda", seed=s) for s in range(1, bk.copies_for(kws[0].nbytes()))]
        return [(lambda kw=kw: launch(x, kw, None, x.dtype)) for kw in kws], kws[0].nbytes()
    return make


def read_calls(n):
    """A plain read of the same bytes as a 4-bit layer (torch's sum: a reduction that streams)."""
    nbytes = n * K // 2
    bufs = [torch.randn(nbytes // 4, device="cuda") for _ in range(bk.copies_for(nbytes))]
    return [(lambda b=b: b.sum()) for b in bufs], nbytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    tiny = torch.zeros(1, device="cuda")
    launch_only = bk.graph_time([(lambda: tiny.add_(1.0))] * 64, replays=20)
    report = {"device": torch.cuda.get_device_name(0), "K": K, "empty_kernel_us": launch_only * 1e6, "kernels": {}}
    print(f"one-element kernel in a graph: {launch_only * 1e6:.2f} us", flush=True)
    kinds = {"bf16 cuBLAS": bf16_calls, "read (torch sum, 4-bit bytes)": read_calls,
             "Triton small-M b4": packed_calls(launch_gemv, "b4"),
             "Triton small-M avg4": packed_calls(launch_gemv, "avg4")}
    if mma_available():
        kinds["mma b4"] = packed_calls(launch_mma_gemv, "b4")
        kinds["mma avg4"] = packed_calls(launch_mma_gemv, "avg4")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, make in kinds.items():
        rows = time_sizes(make)
        fixed, rate = fit([(r["bytes"], r["time_us"] * 1e-6) for r in rows if r["N"] >= 2048])
        report["kernels"][name] = {"rows": rows, "fixed_us": fixed * 1e6, "rate_TBps": rate / 1e12}
        print(f"{name:32s} fixed {fixed * 1e6:6.2f} us  rate {rate / 1e12:5.2f} TB/s  | "
              + "  ".join(f"{r['N']}:{r['time_us']:.2f}" for r in rows), flush=True)
        (args.out / "fixed_cost.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
