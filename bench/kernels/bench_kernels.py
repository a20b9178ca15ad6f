"""Mixed-bit GEMM kernels on one GPU: per-layer GEMMs of OpenVLA-OFT-7B's decoder and a whole
Llama-2-7B-shaped decoder forward, against bf16 cuBLAS, torch's int4 weight-only kernel and fp8
scaled-mm. One run on one card; results as JSON + markdown named after the card.

    PYTHONPATH=. python bench/kernels/bench_kernels.py --out DIR            # everything
    PYTHONPATH=. python bench/kernels/bench_kernels.py --warm --workers 8   # compile the kernels first
    PYTHONPATH=. python bench/kernels/bench_kernels.py --small-m --out DIR  # 1 and 16 tokens only:
        bf16, int4, fp8, the grouped GEMM ("ours") and the small-M kernel ("ours-gemv", triton_gemv.py)
        side by side per layer, and the decoder at 1 and 16 tokens with each
    PYTHONPATH=. python bench/kernels/bench_kernels.py --dequant --out DIR  # 16/64/590 tokens, A16:
        decode-then-cuBLAS (triton_dequant.py) next to the grouped GEMM and bf16; decoder at 64 and 590

Method (see the device notes): every variant is timed as CUDA-graph replays of back-to-back calls
over enough distinct weight copies that the weights do not fit in L2 (so each call streams its
weights from HBM), with CUDA events, after warm-up; the figure is the median over replays divided
by the calls per replay. Every timed configuration of ours is first checked against the plain-torch
dequantized product. Byte floor: (packed weights + activations + output) / 4.8 TB/s (H200
datasheet); the measured device-to-device copy bandwidth is reported beside it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from qvla_ros.kernels import (GemmConfig, GemvConfig, dequant_linear, dequantize_kernel_weights,  # noqa: E402
                              launch_dequant, launch_gemv, launch_mixed_gemm, launch_mma_gemv, mixed_bit_linear,
                              override_configs, override_gemv_configs, quantize_activations)
from qvla_ros.kernels.ops import SMALL_M, bucket, gemv_bucket  # noqa: E402
from qvla_ros.kernels.testing import MIXES, average_bits, mix_counts, random_kernel_weights  # noqa: E402

#: OpenVLA-OFT-7B decoder Linear shapes (out_features N, in_features K)
SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}
TOKENS = (1, 16, 64, 590)
A8_TOKENS = (64, 590)
HBM_BYTES_PER_S = 4.8e12
#: "cuda" for real runs; --smoke runs the whole script on tiny shapes on the CPU (Triton interpreter)
DEVICE = "cuda"

#: configurations tried per token bucket and activation width (the fastest correct one per layer
#: shape is reported as "ours"); run 1 on the H200 picked the split / joined tiles without split-K
_FMA = dict(use_dot=False, bm=1, wb=32, num_warps=2, num_stages=3, bk16=256)
_SPLIT16 = dict(bm=16, wb=32, num_warps=2, num_stages=3, bk16=128)
CANDIDATES: dict[tuple[str, int], list[GemmConfig]] = {
    ("m1", 16): [GemmConfig(bn=16, split_k=4, **_FMA), GemmConfig(bn=16, split_k=8, **dict(_FMA, bk16=128)),
                 GemmConfig(bn=16, split_k=4, **_SPLIT16)],
    ("m16", 16): [GemmConfig(bn=16, split_k=4, **_SPLIT16), GemmConfig(bn=16, split_k=8, **_SPLIT16),
                  GemmConfig(bm=16, bn=32, wb=32, num_warps=4, num_stages=3, split_k=4, bk16=128)],
    ("m64", 16): [GemmConfig(bm=32, bn=32, wb=32, num_warps=4, num_stages=3),
                  GemmConfig(bm=32, bn=32, wb=32, num_warps=4, num_stages=3, split_k=2, bk16=128),
                  GemmConfig(bm=64, bn=64, wb=32, num_warps=4, num_stages=2)],
    ("large", 16): [GemmConfig(bm=128, bn=64, kstep=128, num_warps=8, num_stages=3),
                    GemmConfig(bm=128, bn=64, kstep=128, num_warps=8, num_stages=3, split_k=2),
                    GemmConfig(bm=64, bn=64, wb=32, num_warps=4, num_stages=2)],
}
CANDIDATES[("m64", 8)] = list(CANDIDATES[("m64", 16)])
CANDIDATES[("large", 8)] = CANDIDATES[("large", 16)] + [GemmConfig(bm=128, bn=64, wb=32, num_warps=8,
                                                                   num_stages=2)]


#: the small-M kernel's candidates per bucket (bench/kernels/NOTES.md, "Run 3": registers and
#: instructions per weight from an offline sm_90 compile; bn x wb sets the weight bytes each program
#: has in flight per step). The first of each list is the default.
_M1 = dict(bm=1, bn=64, wb=16, bk16=32, split_k=4)
_M16 = dict(bm=16, bn=16, wb=32, bk16=32, split_k=4, use_dot=True)
GEMV_CANDIDATES: dict[str, list[GemvConfig]] = {
    "m1": [GemvConfig(**_M1), GemvConfig(**dict(_M1, split_k=2)), GemvConfig(**dict(_M1, split_k=8)),
           GemvConfig(**dict(_M1, bn=32)), GemvConfig(**dict(_M1, bn=128)), GemvConfig(**dict(_M1, wb=32)),
           GemvConfig(**dict(_M1, asm=False)), GemvConfig(**dict(_M1, prefetch=False)),
           GemvConfig(**dict(_M1, num_warps=2)),
           # run 4: more programs and more bytes in flight per program (run 3's ncu: 0.75 waves,
           # SMs active 64% of the kernel's time, 25% achieved occupancy)
           GemvConfig(**dict(_M1, split_k=16)), GemvConfig(**dict(_M1, wb=32, split_k=8)),
           GemvConfig(**dict(_M1, wb=32, split_k=16)), GemvConfig(**dict(_M1, wb=64, split_k=8)),
           GemvConfig(**dict(_M1, bn=128, split_k=8, num_warps=8)),
           GemvConfig(**dict(_M1, bn=128, wb=32, split_k=8, num_warps=8)),
           GemvConfig(**dict(_M1, bn=32, split_k=16, num_warps=2)),
           GemvConfig(**dict(_M1, bn=32, wb=32, split_k=16, num_warps=2))]
    # run 5: the weight loops software-pipelined (stages - 1 steps in flight as asynchronous copies,
    # which hold no registers), few or no splits so each program streams a long run of one row block
    # and the split-K epilogue's round trips disappear
    + [GemvConfig(bm=1, bk16=128, prefetch=False, **kw) for kw in (
        dict(bn=16, wb=32, stages=3), dict(bn=16, wb=32, stages=4), dict(bn=16, wb=32, stages=4, num_warps=2),
        dict(bn=16, wb=32, split_k=2, stages=4), dict(bn=16, wb=32, split_k=4, stages=3, num_warps=2),
        dict(bn=16, wb=64, stages=3), dict(bn=16, wb=16, stages=6, num_warps=2), dict(bn=32, wb=32, stages=4),
        dict(bn=32, wb=32, split_k=2, stages=4), dict(bn=32, wb=64, stages=3, num_warps=8),
        dict(bn=64, wb=32, split_k=2, stages=3))]
    # run 7: more rows per thread (each x value serves more weights: 3.4-4.1 instructions per 4-bit
    # weight at 2 warps x 32-64 rows against 5.0 at run 6's gate/up tile, offline sm_90 compile),
    # traded against registers and so against blocks per SM
    + [GemvConfig(bm=1, bk16=128, prefetch=False, **kw) for kw in (
        dict(bn=32, wb=32, split_k=4, stages=3, num_warps=2), dict(bn=32, wb=32, split_k=2, stages=3, num_warps=2),
        dict(bn=32, wb=32, split_k=4, stages=4), dict(bn=64, wb=32, split_k=4, stages=3),
        dict(bn=64, wb=16, split_k=4, stages=4, num_warps=2), dict(bn=32, wb=16, split_k=4, stages=4, num_warps=2),
        dict(bn=16, wb=32, split_k=4, stages=3, num_warps=1), dict(bn=16, wb=32, split_k=8, stages=3, num_warps=2),
        dict(bn=16, wb=32, split_k=4, stages=2, num_warps=2), dict(bn=16, wb=64, split_k=4, stages=3, num_warps=2),
        dict(bn=32, wb=64, split_k=4, stages=3), dict(bn=64, wb=32, split_k=2, stages=3, num_warps=2))],
    "m16": [GemvConfig(**_M16), GemvConfig(**dict(_M16, split_k=2)), GemvConfig(**dict(_M16, split_k=8)),
            GemvConfig(**dict(_M16, bn=64, prefetch=False)), GemvConfig(**dict(_M16, bn=64, wb=16, prefetch=False)),
            GemvConfig(**dict(_M16, bn=64)), GemvConfig(**dict(_M16, bn=128, prefetch=False, num_warps=8)),
            GemvConfig(bm=16, bn=16, wb=16, bk16=16, split_k=4)]
    + [GemvConfig(bm=16, bk16=128, use_dot=True, prefetch=False, **kw) for kw in (
        dict(bn=16, wb=32, split_k=2, stages=3), dict(bn=16, wb=32, split_k=2, stages=4),
        dict(bn=32, wb=32, stages=4), dict(bn=16, wb=32, split_k=4, stages=3), dict(bn=16, wb=64, stages=3))],
}


def variants(small_m: bool = False) -> list[tuple[int, GemmConfig | GemvConfig]]:
    """Every (act_bits, config) the benchmark launches (what --warm compiles)."""
    out = [(act_bits, cfg) for (name, act_bits), cfgs in CANDIDATES.items() for cfg in cfgs
           if not small_m or name in ("m1", "m16")]
    out += [(16, cfg) for cfgs in GEMV_CANDIDATES.values() for cfg in cfgs]
    return list(dict.fromkeys(out))


# ---- timing ---------------------------------------------------------------------------------------

def flush_l2() -> None:
    """Evict the L2 cache: write a buffer of twice its size (between timed replays, untimed)."""
    global _FLUSH
    if DEVICE != "cuda":
        return
    if _FLUSH is None:
        _FLUSH = torch.empty(2 * torch.cuda.get_device_properties(0).L2_cache_size, dtype=torch.uint8, device=DEVICE)
    _FLUSH.zero_()


_FLUSH = None


def graph_time(calls, replays: int = 15, warmup: int = 3, flush: bool = False) -> float:
    """Median seconds per call of `calls` (zero-arg callables) captured back to back in one graph;
    flush=True evicts L2 before each timed replay (outside the timed events)."""
    if DEVICE != "cuda":
        for c in calls:
            c()
        start = time.perf_counter()
        for c in calls:
            c()
        return (time.perf_counter() - start) / len(calls)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(replays):
        if flush:
            flush_l2()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / len(calls))
    del graph
    return statistics.median(times)


def copies_for(nbytes: int) -> int:
    if DEVICE != "cuda":
        return 2
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, min(32, math.ceil(4 * l2 / max(nbytes, 1))))


def measure_ceilings() -> dict:
    if DEVICE != "cuda":
        return {"copy_bytes_per_s": 1e10, "bf16_matmul_flops": 1e11}
    n = 1 << 30  # 1 GiB each way
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE).random_(0, 255)
    dst = torch.empty_like(src)
    t = graph_time([lambda: dst.copy_(src)] * 4, replays=10)
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    tm = graph_time([lambda: a @ b] * 3, replays=10)
    del src, dst, a, b
    return {"copy_bytes_per_s": 2 * n / t, "bf16_matmul_flops": 2 * 8192 ** 3 / tm}


# ---- per-layer rows -------------------------------------------------------------------------------

def row(results, shape, n, k, m, method, seconds, weight_bytes, extra_bytes, ceilings, **info):
    flops = 2.0 * m * n * k
    total = weight_bytes + extra_bytes
    floor = total / HBM_BYTES_PER_S
    r = dict(shape=shape, N=n, K=k, M=m, method=method, time_us=seconds * 1e6, tflops=flops / seconds / 1e12,
             gbps=total / seconds / 1e9, weight_bytes=weight_bytes, bytes=total,
             pct_byte_floor=100.0 * floor / seconds,
             pct_copy_bw=100.0 * (total / ceilings["copy_bytes_per_s"]) / seconds, **info)
    results.append(r)
    print(f"  {shape:8s} M={m:4d} {method:28s} {r['time_us']:9.2f} us {r['tflops']:7.1f} TF/s "
          f"{r['gbps']:7.0f} GB/s {r['pct_byte_floor']:5.1f}% floor {info.get('config', '')}", flush=True)
    return r


def bench_baselines(results, shape, n, k, ceilings):
    w_bytes = n * k * 2
    ws = [torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.02 for _ in range(copies_for(w_bytes))]
    # torch's int4 weight-only (tinygemm) kernel, group size 128
    int4 = None
    try:
        group = 128
        packed = [torch._convert_weight_to_int4pack(
            torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=DEVICE), 8) for _ in ws]
        sz = [torch.randn(k // group, n, 2, device=DEVICE, dtype=torch.bfloat16) * 0.01 for _ in ws]
        int4 = (group, packed, sz)
    except Exception as e:  # not every build has it for this device
        print(f"  int4 weight-only unavailable: {e!r}"[:300])
    fp8 = None
    if hasattr(torch, "_scaled_mm"):
        fp8 = [w.to(torch.float8_e4m3fn) for w in ws]
        scale_w = torch.full((1, n), 0.01, device=DEVICE)
    for m in TOKENS:
        x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
        io = m * k * 2 + m * n * 2
        t = graph_time([(lambda w=w: F.linear(x, w)) for w in ws])
        bf16 = row(results, shape, n, k, m, "bf16 cuBLAS", t, w_bytes, io, ceilings)["time_us"]
        if int4 is not None:
            group, packed, sz = int4
            try:
                t = graph_time([(lambda p=p, s=s: torch._weight_int4pack_mm(x, p, group, s))
                                for p, s in zip(packed, sz)])
                row(results, shape, n, k, m, "torch int4 weight-only g128", t, n * k // 2 + sz[0].numel() * 2, io,
                    ceilings, speedup_vs_bf16=bf16 / (t * 1e6))
            except Exception as e:
                print(f"  int4 M={m} failed: {e!r}"[:300])
        if fp8 is not None:
            try:
                xa = x.to(torch.float8_e4m3fn)
                scale_x = torch.ones(m, 1, device=DEVICE)
                t = graph_time([(lambda w=w: torch._scaled_mm(xa, w.t(), scale_a=scale_x, scale_b=scale_w,
                                                              out_dtype=torch.bfloat16, use_fast_accum=True))
                                for w in fp8])
                row(results, shape, n, k, m, "fp8 scaled_mm (GEMM only)", t, n * k, m * k + m * n * 2, ceilings,
                    speedup_vs_bf16=bf16 / (t * 1e6))
            except Exception as e:
                print(f"  fp8 M={m} failed: {e!r}"[:300])
    del ws, fp8, int4
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def bf16_time(results, shape, m):
    return next(r["time_us"] for r in results if r["shape"] == shape and r["M"] == m and r["method"] == "bf16 cuBLAS")


def bench_ours(results, shape, n, k, mix, ceilings, best):
    counts = mix_counts(n, MIXES[mix])
    kws = [random_kernel_weights(n, k, counts, DEVICE, seed=s) for s in range(1)]
    w_bytes = kws[0].nbytes()
    kws += [random_kernel_weights(n, k, counts, DEVICE, seed=s) for s in range(1, copies_for(w_bytes))]
    w_ref = dequantize_kernel_weights(kws[0])
    for act_bits in (16, 8):
        for m in (TOKENS if act_bits == 16 else A8_TOKENS):
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            if act_bits == 8:
                xq_ref = quantize_activations(x)
                ref = (xq_ref[0].float() * xq_ref[1][:, None]) @ w_ref.T
            else:
                ref = x.float() @ w_ref.T
            timings = []
            for cfg in CANDIDATES[(bucket(m), act_bits)]:
                if act_bits == 8:
                    def call(kw, cfg=cfg):
                        xq, xs, xsum = quantize_activations(x)
                        return launch_mixed_gemm(xq, kw, None, torch.bfloat16, 8, xs, xsum, config=cfg)
                else:
                    def call(kw, cfg=cfg):
                        return launch_mixed_gemm(x, kw, None, torch.bfloat16, 16, config=cfg)
                try:
                    y = call(kws[0])
                    err = float((y.float() - ref).norm() / ref.norm())
                    if not (err < 1e-2 and torch.isfinite(y).all()):
                        print(f"  !! {shape} {mix} M={m} A{act_bits} {cfg}: rel err {err:.3g}", flush=True)
                        timings.append((float("inf"), cfg, err))
                        continue
                    t = graph_time([(lambda kw=kw: call(kw)) for kw in kws])
                    timings.append((t, cfg, err))
                except Exception as e:
                    print(f"  !! {shape} {mix} M={m} A{act_bits} {cfg} failed: {e!r}"[:400], flush=True)
            ok = [tm for tm in timings if math.isfinite(tm[0])]
            if not ok:
                continue
            t, cfg, err = min(ok, key=lambda tm: tm[0])
            method = f"ours {mix} A{act_bits}" + (" (+act quant)" if act_bits == 8 else "")
            row(results, shape, n, k, m, method, t, w_bytes, m * k * 2 + m * n * 2, ceilings,
                speedup_vs_bf16=bf16_time(results, shape, m) / (t * 1e6), config=_cfg_str(cfg), rel_err=err,
                avg_bits=average_bits(counts), counts={str(b): c for b, c in counts.items()},
                candidates=[{"config": _cfg_str(c), "time_us": tt * 1e6} for tt, c, _ in timings])
            best.setdefault((bucket(m), act_bits), {})[(shape, mix, m)] = {c: tt for tt, c, _ in timings}
            if act_bits == 16 and m <= SMALL_M and gemv_bucket(m) in GEMV_CANDIDATES:
                bench_gemv(results, shape, n, k, m, mix, x, ref, kws, w_bytes, counts, ceilings, best)
    del kws, w_ref
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def bench_dequant(results, shape, n, k, ceilings, tokens=(16, 64, 590), mix="avg4"):
    """Decode-then-cuBLAS (triton_dequant.py) beside bf16 cuBLAS and the grouped GEMM (default tiles),
    same weights, 16-bit activations; the decode alone too."""
    counts = mix_counts(n, MIXES[mix])
    kws = [random_kernel_weights(n, k, counts, DEVICE, seed=0)]
    w_bytes = kws[0].nbytes()
    kws += [random_kernel_weights(n, k, counts, DEVICE, seed=s) for s in range(1, copies_for(w_bytes))]
    ws = [torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.02 for _ in range(copies_for(n * k * 2))]
    w_ref = dequantize_kernel_weights(kws[0])
    t = graph_time([(lambda kw=kw: launch_dequant(kw)) for kw in kws])
    row(results, shape, n, k, 0, f"decode only {mix}", t, w_bytes, n * k * 2, ceilings)
    for m in tokens:
        x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
        io = m * k * 2 + m * n * 2
        bf16 = row(results, shape, n, k, m, "bf16 cuBLAS", graph_time([(lambda w=w: F.linear(x, w)) for w in ws]),
                   n * k * 2, io, ceilings)["time_us"]
        ref = x.float() @ w_ref.t()
        for method, fn in ((f"ours {mix} A16 grouped GEMM", lambda kw: launch_mixed_gemm(x, kw, None, x.dtype, 16)),
                           (f"ours {mix} A16 decode+cuBLAS", lambda kw: dequant_linear(x, kw, None))):
            y = fn(kws[0])
            err = float((y.float() - ref).norm() / ref.norm())
            t = graph_time([(lambda kw=kw, fn=fn: fn(kw)) for kw in kws])
            row(results, shape, n, k, m, method, t, w_bytes, io, ceilings, speedup_vs_bf16=bf16 / (t * 1e6),
                rel_err=err)
    del kws, ws
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def bench_gemv(results, shape, n, k, m, mix, x, ref, kws, w_bytes, counts, ceilings, best):
    """The small-M kernel's candidates on the same weights and input as the grouped GEMM's row."""
    timings = []
    for cfg in GEMV_CANDIDATES[gemv_bucket(m)]:
        def call(kw, cfg=cfg):
            return launch_gemv(x, kw, None, torch.bfloat16, config=cfg)
        try:
            y = call(kws[0])
            err = float((y.float() - ref).norm() / ref.norm())
            if not (err < 1e-2 and torch.isfinite(y).all()):
                print(f"  !! gemv {shape} {mix} M={m} {cfg}: rel err {err:.3g}", flush=True)
                timings.append((float("inf"), cfg, err))
                continue
            timings.append((graph_time([(lambda kw=kw: call(kw)) for kw in kws]), cfg, err))
        except Exception as e:
            print(f"  !! gemv {shape} {mix} M={m} {cfg} failed: {e!r}"[:400], flush=True)
    ok = [tm for tm in timings if math.isfinite(tm[0])]
    if not ok:
        return
    t, cfg, err = min(ok, key=lambda tm: tm[0])
    old = next((r["time_us"] for r in results if r["shape"] == shape and r["M"] == m
                and r["method"] == f"ours {mix} A16"), float("nan"))
    row(results, shape, n, k, m, f"ours-gemv {mix} A16", t, w_bytes, m * k * 2 + m * n * 2, ceilings,
        speedup_vs_bf16=bf16_time(results, shape, m) / (t * 1e6), speedup_vs_gemm=old / (t * 1e6),
        config=_cfg_str(cfg), rel_err=err, avg_bits=average_bits(counts),
        counts={str(b): c for b, c in counts.items()},
        candidates=[{"config": _cfg_str(c), "time_us": tt * 1e6} for tt, c, _ in timings])
    best.setdefault(("gemv", gemv_bucket(m)), {})[(shape, mix, m)] = {c: tt for tt, c, _ in timings}


def gemv_choices_per_shape(best) -> dict[tuple[str, int, int], GemvConfig]:
    """(bucket, out_features, in_features) -> the small-M tile with the least time summed over the
    mixes timed at that shape (only tiles that ran correctly for every mix)."""
    chosen = {}
    for (kind, bucket), cases in best.items():
        if kind != "gemv":
            continue
        for shape in {case[0] for case in cases}:
            runs = [times for case, times in cases.items() if case[0] == shape]
            totals = {c: sum(times.get(c, float("inf")) for times in runs) for c in runs[0]}
            finite = {c: t for c, t in totals.items() if math.isfinite(t)}
            if finite:
                chosen[(bucket, *SHAPES[shape])] = min(finite, key=finite.get)
    return chosen


def _cfg_str(cfg) -> str:
    if isinstance(cfg, GemvConfig):
        return (f"gemv {'dot' if cfg.use_dot else 'fma'} bm{cfg.bm} bn{cfg.bn} wb{cfg.wb} bk16={cfg.bk16} "
                f"w{cfg.num_warps}" + (f" splitk{cfg.split_k}" if cfg.split_k > 1 else "")
                + (f" stages{cfg.stages}" if cfg.stages > 1 else "" if cfg.prefetch else " no-prefetch")
                + ("" if cfg.asm or cfg.use_dot else " no-asm"))
    return ("fma" if not cfg.use_dot else ("joined" if cfg.kstep else "split")) + \
        f" bm{cfg.bm} bn{cfg.bn}" + (f" k{cfg.kstep}" if cfg.kstep else f" wb{cfg.wb}") + \
        f" w{cfg.num_warps} s{cfg.num_stages}" + (f" splitk{cfg.split_k}" if cfg.split_k > 1 else "") + \
        (f" bk16={cfg.bk16}" if cfg.bk16 != 64 else "")


# ---- whole decoder --------------------------------------------------------------------------------

HIDDEN, HEADS, INTER, LAYERS = 4096, 32, 11008, 32


def rmsnorm(x, w, eps=1e-5):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope_tables(t, dim, device):
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device).float() / dim))
    ang = torch.arange(t, device=device).float()[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)


def apply_rope(q, cos, sin):  # q [T, H, D]
    half = q.shape[-1] // 2
    rot = torch.cat([-q[..., half:], q[..., :half]], dim=-1)
    return q * cos[:, None, :] + rot * sin[:, None, :]


def block_forward(h, lw, linear, cos, sin):
    t = h.shape[0]
    a = rmsnorm(h, lw["ln1"])
    q, k, v = linear(a, ("q", "k", "v"), lw)
    q = apply_rope(q.view(t, HEADS, -1), cos, sin)
    k = apply_rope(k.view(t, HEADS, -1), cos, sin)
    v = v.view(t, HEADS, -1)
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       is_causal=True)[0].transpose(0, 1).reshape(t, HIDDEN)
    h = h + linear(o, ("o",), lw)[0]
    a = rmsnorm(h, lw["ln2"])
    g, u = linear(a, ("gate", "up"), lw)
    return h + linear(F.silu(g) * u, ("down",), lw)[0]


def bf16_linear(x, names, lw):
    return [F.linear(x, lw[n]) for n in names]


def ours_linear(act_bits):
    def linear(x, names, lw):
        if act_bits == 8:
            xq, xs, xsum = quantize_activations(x)  # once for all projections of one input
            return [launch_mixed_gemm(xq, lw[n], None, x.dtype, 8, xs, xsum) for n in names]
        return [launch_mixed_gemm(x, lw[n], None, x.dtype, 16) for n in names]
    return linear


LINEAR_SHAPES = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096),
                 "gate": (11008, 4096), "up": (11008, 4096), "down": (4096, 11008)}


def fp8_linear(x, names, lw):
    """The 8-bit-activation ceiling: W8A8 fp8 (e4m3) with row-wise weight scales and per-token
    activation scales, weights converted ahead of time (no decoding at all), cuBLAS's fp8 GEMM."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale_x = amax / 448.0
    xq = (x.float() / scale_x).to(torch.float8_e4m3fn)
    return [torch._scaled_mm(xq, lw[n][0].t(), scale_a=scale_x, scale_b=lw[n][1], out_dtype=x.dtype,
                             use_fast_accum=True) for n in names]


def dequant_linear_all(x, names, lw):
    return [dequant_linear(x, lw[n], None) for n in names]


def op_linear(x, names, lw):
    """What a quantized policy runs: the qvla::mixed_bit_linear op with its default routing (the
    small-M kernel at one token, decode-then-cuBLAS from DEQUANT_MIN_TOKENS, else the grouped GEMM)."""
    return [mixed_bit_linear(x, lw[n]) for n in names]


def mma_linear(x, names, lw):
    """The tensor-core small-M CUDA kernel (kernels/mixed_gemv_mma.cu; bench_mma.py times it)."""
    return [launch_mma_gemv(x, lw[n], None, x.dtype) for n in names]


def gemv_linear(x, names, lw):
    if x.shape[0] > SMALL_M:
        raise ValueError(f"the small-M kernel runs at most {SMALL_M} tokens")
    return [launch_gemv(x, lw[n], None, x.dtype) for n in names]


def build_layers(kind, mix=None):
    layers, weight_bytes = [], 0
    for i in range(LAYERS):
        lw = {"ln1": torch.ones(HIDDEN, device=DEVICE, dtype=torch.bfloat16),
              "ln2": torch.ones(HIDDEN, device=DEVICE, dtype=torch.bfloat16)}
        for j, (name, (n, k)) in enumerate(LINEAR_SHAPES.items()):
            if kind == "bf16":
                lw[name] = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.02
                weight_bytes += n * k * 2
            elif kind == "fp8-w8a8":
                w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.02
                scale_w = (w.abs().amax(dim=-1).float() / 448.0)[None, :]
                lw[name] = ((w.float() / scale_w.t()).to(torch.float8_e4m3fn), scale_w)
                weight_bytes += n * k + 4 * n
                del w
            else:
                lw[name] = random_kernel_weights(n, k, mix_counts(n, MIXES[mix]), DEVICE, seed=100 * i + j)
                weight_bytes += lw[name].nbytes()
        layers.append(lw)
    return layers, weight_bytes


def bench_decoder(kind, tokens, act_bits=16, mix="avg4", tiles="default"):
    cuda = DEVICE == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    layers, weight_bytes = build_layers(kind, mix)
    linear = ({"bf16": bf16_linear, "ours-gemv": gemv_linear, "fp8-w8a8": fp8_linear,
               "ours-dequant": dequant_linear_all, "ours-op": op_linear, "ours-mma": mma_linear}.get(kind)
              or ours_linear(act_bits))
    cos, sin = rope_tables(tokens, HIDDEN // HEADS, DEVICE)
    x = torch.randn(tokens, HIDDEN, device=DEVICE, dtype=torch.bfloat16)

    def forward():
        h = x
        for lw in layers:
            h = block_forward(h, lw, linear, cos, sin)
        return h

    t = graph_time([forward], replays=10, warmup=2)
    out = forward()
    finite = bool(torch.isfinite(out).all())
    peak = torch.cuda.max_memory_allocated() - base if cuda else 0
    del layers
    if cuda:
        torch.cuda.empty_cache()
    plain = kind in ("bf16", "fp8-w8a8")
    return {"kind": kind, "tokens": tokens, "act_bits": {"bf16": 16, "fp8-w8a8": 8}.get(kind, act_bits),
            "mix": mix if not plain else None, "time_ms": t * 1e3, "weight_bytes": weight_bytes,
            "peak_bytes": peak, "finite": finite, "tiles": tiles if not plain else None}


# ---- main -----------------------------------------------------------------------------------------

def _shrink_for_smoke() -> None:
    """Tiny shapes on the CPU: every code path of this script, through the Triton interpreter."""
    global DEVICE, SHAPES, TOKENS, A8_TOKENS, HIDDEN, HEADS, INTER, LAYERS, LINEAR_SHAPES
    os.environ["TRITON_INTERPRET"] = "1"
    DEVICE = "cpu"
    SHAPES = {"q/k/v/o": (160, 128), "down": (128, 320)}
    TOKENS, A8_TOKENS = (1, 16, 20), (20,)
    HIDDEN, HEADS, INTER, LAYERS = 128, 2, 320, 2
    LINEAR_SHAPES = {"q": (128, 128), "k": (128, 128), "v": (128, 128), "o": (128, 128),
                     "gate": (320, 128), "up": (320, 128), "down": (128, 320)}
    for key in CANDIDATES:
        CANDIDATES[key] = CANDIDATES[key][:2]
    for key in GEMV_CANDIDATES:  # the first two and the first software-pipelined one
        GEMV_CANDIDATES[key] = GEMV_CANDIDATES[key][:2] + [c for c in GEMV_CANDIDATES[key] if c.stages > 1][:1]


def warm(shard: int, shards: int, small_m: bool = False) -> None:
    """Compile this shard's kernel variants (tiny launches with the real specializations)."""
    todo = variants(small_m)[shard::shards]
    kw = random_kernel_weights(64, 4096, {16: 16, 8: 16, 4: 16, 3: 16, 2: 0, 0: 0}, "cuda")
    kw2 = random_kernel_weights(64, 4096, {2: 48, 0: 16}, "cuda")
    x = torch.randn(3, 4096, device=DEVICE, dtype=torch.bfloat16)
    xq, xs, xsum = quantize_activations(x)
    for act_bits, cfg in todo:
        t = time.time()
        try:
            for w in (kw, kw2):
                if isinstance(cfg, GemvConfig):
                    launch_gemv(x[:1] if cfg.bm == 1 else x, w, None, torch.bfloat16, config=cfg)
                elif act_bits == 8:
                    launch_mixed_gemm(xq, w, None, torch.bfloat16, 8, xs, xsum, config=cfg)
                else:
                    launch_mixed_gemm(x, w, None, torch.bfloat16, 16, config=cfg)
            torch.cuda.synchronize()
            print(f"warm {shard}: A{act_bits} {_cfg_str(cfg)} {time.time() - t:.1f}s", flush=True)
        except Exception as e:  # the benchmark reports the failure for this configuration
            print(f"warm {shard}: A{act_bits} {_cfg_str(cfg)} FAILED {e!r}"[:400], flush=True)


def write_report(out_dir: Path, report: dict) -> None:
    card = report["device"]["name"]
    slug = "".join(ch if ch.isalnum() else "_" for ch in card).strip("_").lower()
    if report.get("small_m"):
        slug += "_small_m"
    if report.get("ceiling"):
        slug += "_ceiling"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"results_{slug}.json").write_text(json.dumps(report, indent=1))
    lines = [f"# Mixed-bit GEMM kernels on {card}", "",
             f"torch {report['device']['torch']}, triton {report['device']['triton']}, "
             f"{report['device']['sms']} SMs, L2 {report['device']['l2_bytes'] / 2**20:.0f} MiB; measured copy "
             f"{report['ceilings']['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
             f"{report['ceilings']['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s; byte floor at "
             f"{HBM_BYTES_PER_S / 1e12:.1f} TB/s. CUDA-graph replays over weight copies larger than L2, median.",
             "", "## Per-layer GEMMs (OFT-7B decoder shapes)", "",
             "| shape | M | method | us | TFLOP/s | GB/s | % byte floor | x bf16 | x ours (gemm) | config |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["layers"]:
        lines.append(f"| {r['shape']} | {r['M']} | {r['method']} | {r['time_us']:.2f} | {r['tflops']:.1f} | "
                     f"{r['gbps']:.0f} | {r['pct_byte_floor']:.1f} | {r.get('speedup_vs_bf16', 1.0):.2f} | "
                     f"{'%.2f' % r['speedup_vs_gemm'] if 'speedup_vs_gemm' in r else ''} | {r.get('config', '')} |")
    lines += ["", "## Whole decoder (32 Llama-2-7B blocks), CUDA graph", "",
              "| weights | tiles | tokens | act bits | ms | x bf16 | weight GiB | weight % of bf16 | peak GiB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for d in report["decoder"]:
        ref = next((e for e in report["decoder"] if e["kind"] == "bf16" and e["tokens"] == d["tokens"]), None)
        speed = ref["time_ms"] / d["time_ms"] if ref else float("nan")
        pct = 100 * d["weight_bytes"] / ref["weight_bytes"] if ref else float("nan")
        lines.append(f"| {d['kind']}{' ' + d['mix'] if d['mix'] else ''} | {d.get('tiles') or ''} | "
                     f"{d['tokens']} | {d['act_bits']} | "
                     f"{d['time_ms']:.2f} | {speed:.2f} | {d['weight_bytes'] / 2**30:.2f} | {pct:.1f} | "
                     f"{d['peak_bytes'] / 2**30:.2f} |")
    (out_dir / f"results_{slug}.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/kernels/results"))
    ap.add_argument("--warm", action="store_true", help="only compile the kernels (in --workers processes)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--shard", type=int, default=None)
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--dequant", action="store_true",
                    help="16, 64 and 590 tokens, 16-bit activations: decode-then-cuBLAS next to the grouped GEMM "
                         "and bf16, per layer and as a decoder")
    ap.add_argument("--skip-decoder", action="store_true")
    ap.add_argument("--small-m", action="store_true",
                    help="1 and 16 tokens only: the grouped GEMM next to the small-M kernel, bf16 and the others")
    ap.add_argument("--tokens", type=str, default=None,
                    help="comma-separated token counts to keep (e.g. 1): a narrower run")
    ap.add_argument("--ceiling", action="store_true",
                    help="decoder at 590 tokens only: bf16, the fp8 W8A8 ceiling (weights converted ahead, no "
                         "decoding) and ours with 8-bit activations")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on the CPU through the Triton interpreter (checks the script, times nothing)")
    args = ap.parse_args(argv)
    global TOKENS, A8_TOKENS
    if args.smoke:
        _shrink_for_smoke()
    if args.small_m:
        TOKENS, A8_TOKENS = tuple(t for t in TOKENS if t <= SMALL_M), ()
    elif not args.smoke and not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.tokens:
        keep = {int(t) for t in args.tokens.split(",")}
        TOKENS, A8_TOKENS = tuple(t for t in TOKENS if t in keep), tuple(t for t in A8_TOKENS if t in keep)
    if args.shard is not None:
        warm(args.shard, args.workers, args.small_m)
        return 0
    if args.warm:
        procs = [subprocess.Popen([sys.executable, __file__, "--shard", str(i), "--workers", str(args.workers)]
                                  + (["--small-m"] if args.small_m else [])) for i in range(args.workers)]
        return max(p.wait() for p in procs)

    import triton
    if DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        device = {"name": torch.cuda.get_device_name(0), "sms": props.multi_processor_count,
                  "l2_bytes": props.L2_cache_size}
    else:
        device = {"name": "cpu smoke run", "sms": 0, "l2_bytes": 0}
    device.update(torch=torch.__version__, triton=triton.__version__)
    report = {"device": device, "layers": [], "decoder": [], "small_m": bool(args.small_m),
              "ceiling": bool(args.ceiling)}
    report["ceilings"] = measure_ceilings()
    print(report["device"], report["ceilings"], flush=True)
    best = {}
    t0 = time.time()
    if args.dequant:  # many tokens, 16-bit activations: decode-then-cuBLAS against bf16 (and the grouped GEMM)
        for kind, tokens in (("bf16", 590), ("ours-dequant", 590), ("bf16", 64), ("ours-dequant", 64)):
            try:
                d = bench_decoder(kind, tokens, 16)
                report["decoder"].append(d)
                print("decoder", d, flush=True)
            except Exception as e:
                print(f"decoder {kind} {tokens} failed: {e!r}"[:500], flush=True)
            write_report(args.out, report)
        for shape, (n, k) in SHAPES.items():
            bench_dequant(report["layers"], shape, n, k, report["ceilings"], tokens=(64, 590))
            write_report(args.out, report)
        print(f"total {time.time() - t0:.0f}s", flush=True)
        return 0
    if args.ceiling:  # what any 8-bit-activation path can reach at 590 tokens on this card
        args.skip_layers = True
        decoders = [("bf16", max(TOKENS), 16), ("fp8-w8a8", max(TOKENS), 8), ("ours", max(TOKENS), 8),
                    ("bf16", max(TOKENS), 16), ("fp8-w8a8", max(TOKENS), 8)]
    elif args.small_m:  # few tokens: bf16, the grouped GEMM and the small-M kernel at each count
        decoders = [(kind, tokens, 16) for tokens in TOKENS for kind in ("bf16", "ours", "ours-gemv")]
    else:
        long = max(TOKENS)
        # "ours-op": the op as a policy calls it (default routing), the figure a user gets
        decoders = [("bf16", long, 16), ("ours", long, 8), ("ours", long, 16), ("ours-op", long, 16), ("bf16", 16, 16),
                    ("ours", 16, 16), ("ours-gemv", 16, 16), ("ours-op", 16, 16), ("bf16", 1, 16), ("ours-op", 1, 16)]
    if not args.skip_decoder:  # first, with the default tile choices: the figure the issue asks for
        for kind, tokens, act_bits in decoders:
            try:
                d = bench_decoder(kind, tokens, act_bits)
                report["decoder"].append(d)
                print("decoder", d, flush=True)
            except Exception as e:
                print(f"decoder {kind} {tokens} A{act_bits} failed: {e!r}"[:500], flush=True)
            write_report(args.out, report)
    if not args.skip_layers:
        for shape, (n, k) in SHAPES.items():
            bench_baselines(report["layers"], shape, n, k, report["ceilings"])
            for mix in MIXES:
                bench_ours(report["layers"], shape, n, k, mix, report["ceilings"], best)
            write_report(args.out, report)
        print(f"layers: {time.time() - t0:.0f}s", flush=True)
        # the fastest configuration per bucket, summed over shapes and mixes (the next defaults)
        chosen = {}
        for key, cases in best.items():
            totals = {}
            for times in cases.values():
                for cfg, t in times.items():
                    totals[cfg] = totals.get(cfg, 0.0) + t  # a failed config sums to inf
            finite = {c: t for c, t in totals.items() if math.isfinite(t)
                      and all(c in times for times in cases.values())}
            if finite:
                chosen[key] = min(finite, key=finite.get)
        override_configs({key: c for key, c in chosen.items() if key[0] != "gemv"})
        override_gemv_configs({key[1]: c for key, c in chosen.items() if key[0] == "gemv"})
        report["chosen_configs"] = {(f"{a}" if b == "gemv" else f"{b} A{a}"): _cfg_str(c)
                                    for (b, a), c in chosen.items()}
        # the small-M kernel also per layer shape (its run-4 bests differed by shape): summed over mixes
        per_shape = gemv_choices_per_shape(best)
        override_gemv_configs(per_shape)
        report["chosen_gemv_per_shape"] = {f"{b} {n}x{k}": _cfg_str(c) for (b, n, k), c in per_shape.items()}
        print("chosen:", report["chosen_configs"], report["chosen_gemv_per_shape"], flush=True)
        write_report(args.out, report)
        if not args.skip_decoder:  # again with the tiles the sweep found fastest
            if args.small_m:
                tuned = [(kind, tokens, 16) for tokens in TOKENS for kind in ("ours", "ours-gemv")]
            else:
                tuned = [("ours", max(TOKENS), 8), ("ours", max(TOKENS), 16), ("ours", 16, 16), ("ours-gemv", 16, 16)]
            for kind, tokens, act_bits in tuned:
                try:
                    d = bench_decoder(kind, tokens, act_bits, tiles="tuned")
                    report["decoder"].append(d)
                    print("decoder", d, flush=True)
                except Exception as e:
                    print(f"decoder tuned {kind} {tokens} A{act_bits} failed: {e!r}"[:500], flush=True)
    write_report(args.out, report)
    print(f"total {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
