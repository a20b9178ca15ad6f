"""Spike: time gemv4_mma.cu (4-bit rows, one token, tensor cores, paired decode) beside bf16 cuBLAS
and the shipped small-M Triton kernel on a 4-bit-only layer of the same shape, in one run.

    nvcc -O3 -gencode arch=compute_90,code=sm_90 -shared -Xcompiler -fPIC -o /tmp/spike.so \\
        bench/kernels/spike/gemv4_mma.cu
    PYTHONPATH=. python3 bench/kernels/spike/run_spike.py /tmp/spike.so OUT.json

Not a product path: the spike covers 4-bit rows only, with K a multiple of 128 * warps * unroll.
Timing is bench_kernels.graph_time (15 replays). The recorded runs (results/spike/) used an earlier
copy of it in this file: the same graphs and events, 20 replays, the upper median.
"""
import ctypes
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/kernels: the shared timing
from bench_kernels import graph_time  # noqa: E402
from qvla_ros.kernels import launch_gemv  # noqa: E402
from qvla_ros.kernels.testing import random_kernel_weights  # noqa: E402

SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096)}
CONFIGS = [(4, 2), (4, 4), (2, 4), (8, 2), (2, 8), (8, 4), (16, 2), (16, 1)]  # (warps, unroll)
XP_CONFIGS = [(4, 2), (8, 2), (4, 4), (16, 1)]  # the variant with x paired once per launch
L2_BEATING_BYTES = 256 * 2 ** 20


def pack_words(q: torch.Tensor) -> torch.Tensor:
    """codes [N, K] (0..15) -> int32 words [N, K/8] in the kernel layout (field i of word g:
    feature (g // 32) * 256 + i * 32 + g % 32)."""
    n, k = q.shape
    fields = q.view(n, k // 256, 8, 32).permute(0, 1, 3, 2).to(torch.int64)  # [n, kb, 32 words, 8 fields]
    shifts = torch.arange(8, device=q.device) * 4
    words = (fields << shifts).sum(-1)
    return (words & 0xFFFFFFFF).to(torch.uint32).view(torch.int32).reshape(n, k // 8).contiguous()


def graph_time_us(calls) -> float:
    """Microseconds per call: bench_kernels' CUDA-graph timing (median over replays)."""
    return graph_time(calls) * 1e6


def launched(rc: int) -> None:
    if rc:
        raise RuntimeError(f"launch failed: {rc} (1: shape not supported, 2: no such tile, else a CUDA error)")


def main(lib_path: str, out_path: str) -> None:
    lib = ctypes.CDLL(lib_path)
    lib.gemv4_mma_launch.restype = ctypes.c_int
    lib.gemv4_mma_launch.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 4 + [ctypes.c_void_p]
    lib.gemv4_mma_xp_launch.restype = ctypes.c_int
    lib.gemv4_mma_xp_launch.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int] * 4 + [ctypes.c_void_p]
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": []}
    for shape, (n, k) in SHAPES.items():
        q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.uint8)
        scale = torch.rand(n, device="cuda") * 0.02 + 0.001
        zero = torch.randint(0, 16, (n,), device="cuda").float()
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        w = (q.float() - zero[:, None]) * scale[:, None]
        ref = x.float() @ w.t()
        words = pack_words(q)
        copies = max(2, L2_BEATING_BYTES // words.nbytes + 1)
        word_copies = [words.clone() for _ in range(copies)]
        y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)

        xp = torch.empty(k // 8 * 4, dtype=torch.int32, device="cuda")
        xsum = torch.empty(1, dtype=torch.float32, device="cuda")

        def spike(wc, warps, unroll):
            stream = torch.cuda.current_stream().cuda_stream
            launched(lib.gemv4_mma_launch(wc.data_ptr(), x.data_ptr(), scale.data_ptr(), zero.data_ptr(),
                                          y.data_ptr(), n, k, warps, unroll, stream))

        def spike_xp(wc, warps, unroll):
            stream = torch.cuda.current_stream().cuda_stream
            launched(lib.gemv4_mma_xp_launch(wc.data_ptr(), x.data_ptr(), xp.data_ptr(), xsum.data_ptr(),
                                             scale.data_ptr(), zero.data_ptr(), y.data_ptr(), n, k, warps, unroll,
                                             stream))

        for name, launch, configs in (("spike mma bf16-pairs", spike, CONFIGS),
                                      ("spike-xp (x paired once)", spike_xp, XP_CONFIGS)):
            for warps, unroll in configs:
                if k % (128 * warps * unroll):
                    continue
                y.fill_(float("nan"))
                launch(words, warps, unroll)
                torch.cuda.synchronize()
                err = float((y.float() - ref).norm() / ref.norm())
                t = graph_time_us([lambda wc=wc, a=warps, b=unroll: launch(wc, a, b) for wc in word_copies])
                row = {"shape": shape, "method": f"{name} w{warps} u{unroll}", "time_us": t,
                       "rel_err": err, "all_written": bool(torch.isfinite(y).all())}
                results["rows"].append(row)
                print(row, flush=True)
        del word_copies
        wb = (w.to(torch.bfloat16))
        bf16_copies = [wb.clone() for _ in range(max(2, L2_BEATING_BYTES // wb.nbytes + 1))]
        t = graph_time_us([lambda wc=wc: F.linear(x, wc) for wc in bf16_copies])
        results["rows"].append({"shape": shape, "method": "bf16 cuBLAS", "time_us": t})
        print(results["rows"][-1], flush=True)
        del bf16_copies
        kws = [random_kernel_weights(n, k, {4: n}, "cuda", seed=i) for i in range(copies)]
        t = graph_time_us([lambda kw=kw: launch_gemv(x, kw, None, torch.bfloat16) for kw in kws])
        results["rows"].append({"shape": shape, "method": "shipped small-M Triton kernel, 4-bit rows", "time_us": t})
        print(results["rows"][-1], flush=True)
        del kws
        torch.cuda.empty_cache()
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
