"""Launches for Nsight Compute on the gate/up shape at the avg4 mix, default tiles: one token (A16)
and 590 tokens (8-bit activations) with the grouped GEMM; with --small-m, 1 and 16 tokens with the
grouped GEMM and with the small-M kernel (triton_gemv.py); with --mma, 1 and 16 tokens with the
tensor-core kernel (mixed_gemv_mma.cu) beside the shipped paths and bf16 cuBLAS.

    ncu --clock-control none -k "regex:mixed_gemm|gemv_kernel" --section SpeedOfLight \\
        --section WarpStateStats python bench/kernels/profile_kernels.py [--small-m | --mma]
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from qvla_ros.kernels import launch_gemv, launch_mixed_gemm, quantize_activations  # noqa: E402
from qvla_ros.kernels.testing import MIXES, mix_counts, random_kernel_weights  # noqa: E402

n, k = 11008, 4096
kw = random_kernel_weights(n, k, mix_counts(n, MIXES["avg4"]), "cuda")
mode = sys.argv[1] if len(sys.argv) > 1 else ""
x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
x16 = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
x590 = torch.randn(590, k, device="cuda", dtype=torch.bfloat16)
xq, xs, xsum = quantize_activations(x590)
if mode == "--mma":
    from qvla_ros.kernels.cuda_gemv import launch_mma_gemv
    w_bf16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
for _ in range(2):  # the first round compiles (or loads) the kernels, the second is profiled
    if mode == "--small-m":
        for x in (x1, x16):
            launch_mixed_gemm(x, kw, None, torch.bfloat16, 16)
            launch_gemv(x, kw, None, torch.bfloat16)
    elif mode == "--mma":
        for x in (x1, x16):
            launch_mma_gemv(x, kw, None, torch.bfloat16)
            F.linear(x, w_bf16)
        launch_gemv(x1, kw, None, torch.bfloat16)
        launch_mixed_gemm(x16, kw, None, torch.bfloat16, 16)
    else:
        launch_mixed_gemm(x1, kw, None, torch.bfloat16, 16)
        launch_mixed_gemm(xq, kw, None, torch.bfloat16, 8, xs, xsum)
    torch.cuda.synchronize()
