"""Two launches of the grouped GEMM for Nsight Compute: one token and 590 tokens (8-bit
activations) on the gate/up shape at the avg4 mix, default tiles.

    ncu --clock-control none -k regex:mixed_gemm --section SpeedOfLight --section WarpStateStats \\
        python bench/kernels/profile_kernels.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from qvla_ros.kernels import launch_mixed_gemm, quantize_activations  # noqa: E402
from qvla_ros.kernels.testing import MIXES, mix_counts, random_kernel_weights  # noqa: E402

n, k = 11008, 4096
kw = random_kernel_weights(n, k, mix_counts(n, MIXES["avg4"]), "cuda")
x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
x590 = torch.randn(590, k, device="cuda", dtype=torch.bfloat16)
xq, xs, xsum = quantize_activations(x590)
for _ in range(2):  # the first round compiles (or loads) the kernels, the second is profiled
    launch_mixed_gemm(x1, kw, None, torch.bfloat16, 16)
    launch_mixed_gemm(xq, kw, None, torch.bfloat16, 8, xs, xsum)
    torch.cuda.synchronize()
