"""Launches for Nsight Compute on the gate/up shape at the avg4 mix, default tiles: one token (A16)
and 590 tokens (8-bit activations) with the grouped GEMM; with --small-m, 1 and 16 tokens with the
grouped GEMM and with the small-M kernel (triton_gemv.py).

    ncu --clock-control none -k "regex:mixed_gemm|gemv_kernel" --section SpeedOfLight \\
        --section WarpStateStats python bench/kernels/profile_kernels.py [--small-m]
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from qvla_ros.kernels import launch_gemv, launch_mixed_gemm, quantize_activations  # noqa: E402
from qvla_ros.kernels.testing import MIXES, mix_counts, random_kernel_weights  # noqa: E402

n, k = 11008, 4096
kw = random_kernel_weights(n, k, mix_counts(n, MIXES["avg4"]), "cuda")
small_m = "--small-m" in sys.argv[1:]
x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
x16 = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
x590 = torch.randn(590, k, device="cuda", dtype=torch.bfloat16)
xq, xs, xsum = quantize_activations(x590)
for _ in range(2):  # the first round compiles (or loads) the kernels, the second is profiled
    if small_m:
        for x in (x1, x16):
            launch_mixed_gemm(x, kw, None, torch.bfloat16, 16)
            launch_gemv(x, kw, None, torch.bfloat16)
    else:
        launch_mixed_gemm(x1, kw, None, torch.bfloat16, 16)
        launch_mixed_gemm(xq, kw, None, torch.bfloat16, 8, xs, xsum)
    torch.cuda.synchronize()
