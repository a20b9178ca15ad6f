"""8-bit activations at many tokens (issue #17 item 4): the decoded-codes int8 GEMM against its peers.

    PYTHONPATH=. python bench/kernels/a8_probe.py --out $OUT/a8.json           # a card, ~1-2 min
    PYTHONPATH=. python bench/kernels/a8_probe.py --smoke --out /tmp/a8.json   # CPU, interpreter, < 1 min

Per OFT-7B decoder shape and token count, side by side in one run, us per layer (bench_kernels.graph_time:
one CUDA graph over distinct layer copies that together outgrow L2, flushed before each replay, median):

  cuBLAS bf16                 F.linear on bf16 weights (what the quantized layer replaces)
  fp8 W8A8 peer               per-token e4m3 activations in torch ops + cuBLAS _scaled_mm on weights
                              converted ahead (bench_kernels.fp8_linear; serve.py's peer policy)
  fp8 GEMM only / int8 GEMM only   cuBLAS's fp8 (_scaled_mm) and int8 (_int_mm) GEMMs on operands made
                              ahead: the tensor-core floors an 8-bit route sits on
  ours A8 grouped GEMM        the default 8-bit-activation route at every token count (triton_gemm.py)
  ours A8 decoded             the opt-in route (QVLA_A8_DECODE_MIN_TOKENS; ops._bind_a8_decoded: activation
                              quantization + decode to int8 codes + triton_a8's GEMM), default tile and,
                              at the largest token count, every tile of TILES
  act quant / decode to int8  the decoded route's first two launches alone
  ours A16 decode+cuBLAS      today's 16-bit-activation route, for reference

Weights: random plans at the avg4 mix (kernels.testing.MIXES). Error: the decoded route's output
against a float64 product of the same int8 activations and decoded weights (norm-relative).
Output JSON: card, torch, triton, per shape per token count {method: us}, tiles (590 sweep), errors.
"""
from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # before Triton decorates any kernel
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
for p in (REPO, REPO / "bench" / "kernels"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import bench_kernels as bk  # noqa: E402

from qvla_ros.io import atomic_write_text  # noqa: E402
from qvla_ros.kernels import ops  # noqa: E402
from qvla_ros.kernels.reference import dequantize_kernel_weights, quantize_activations_reference  # noqa: E402
from qvla_ros.kernels.testing import MIXES, mix_counts, random_kernel_weights  # noqa: E402

SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}
TOKENS = (590, 256, 64, 24)
#: (BM, BN, BK, GROUP_M, warps, stages) of the decoded route's GEMM, swept at the largest token count
TILES = [(128, 128, 128, 8, 8, 4), (128, 256, 128, 8, 8, 3), (128, 128, 64, 8, 4, 4), (64, 128, 128, 8, 4, 4),
         (128, 64, 128, 8, 4, 4), (256, 128, 128, 8, 8, 3), (128, 256, 64, 8, 8, 4), (64, 256, 128, 8, 8, 3)]
SMOKE_SHAPES = {"tiny": (72, 256)}
SMOKE_TOKENS = (20,)
SMOKE_TILES = [(16, 32, 64, 2, 4, 2), (32, 16, 128, 1, 4, 2)]
START = time.time()


def log(*a):
    print(f"[{time.time() - START:6.1f}s]", *a, flush=True)


def timed(calls) -> float | str:
    """us per call, or the error that stopped the method (kept in the results, not raised)."""
    try:
        return round(bk.graph_time(calls, flush=bk.DEVICE == "cuda") * 1e6, 2)
    except Exception as err:  # noqa: BLE001 - one method failing must not lose the others
        return f"error: {type(err).__name__}: {err}"[:300]


def reference_error(kw, x, y) -> float:
    """Norm-relative error of y against float64 (int8 activations x decoded weights)."""
    xq, xscale, _ = quantize_activations_reference(x)
    w = dequantize_kernel_weights(kw, torch.float64)
    ref = (xq.to(torch.float64) * xscale.to(torch.float64)[:, None]) @ w.T
    return float((y.to(torch.float64) - ref).norm() / ref.norm().clamp(min=1e-30))


def bench_shape(n: int, k: int, tokens, tiles) -> tuple[dict, dict, float]:
    dev = bk.DEVICE
    counts = mix_counts(n, MIXES["avg4"])
    probe = random_kernel_weights(n, k, counts, dev, seed=0)
    copies = bk.copies_for(probe.nbytes() + n * k)  # packed words + the transient int8 codes
    kws = [random_kernel_weights(n, k, counts, dev, seed=s) for s in range(copies)]
    channels = [ops.A8Channels.of(kw) for kw in kws]
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(bk.copies_for(n * k * 2))]
    fp8 = {}
    if dev == "cuda":
        for i, w in enumerate(ws):
            scale_w = (w.abs().amax(dim=-1).float().clamp(min=1e-12) / 448.0)[None, :]
            fp8[f"w{i}"] = ((w.float() / scale_w.t()).to(torch.float8_e4m3fn), scale_w)
    decoders = [ops._bind_dequant(kw, torch.int8) for kw in kws]
    codes = [d() for d in decoders]  # the decoded matrices, made ahead for the GEMM-only rows and as decode targets
    per_m, tile_us = {}, {}
    error = float("nan")
    for m in tokens:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        xq, xscale, _ = ops.quantize_activations(x)
        row = {"cuBLAS bf16": timed([(lambda w=w: F.linear(x, w)) for w in ws])}
        if dev == "cuda":
            names = list(fp8)
            row["fp8 W8A8 peer"] = timed([(lambda nm=nm: bk.fp8_linear(x, (nm,), fp8)) for nm in names])
            x8 = (x.float() / (x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / 448.0)).to(
                torch.float8_e4m3fn)
            sx = torch.ones(m, 1, device=dev)
            row["fp8 GEMM only"] = timed([(lambda nm=nm: torch._scaled_mm(
                x8, fp8[nm][0].t(), scale_a=sx, scale_b=fp8[nm][1], out_dtype=torch.bfloat16, use_fast_accum=True))
                for nm in names])
        if m > 16:
            row["int8 GEMM only"] = timed([(lambda c=c: torch._int_mm(xq, c.t())) for c in codes])
        grouped = [ops._bind_route("gemm_a8", kw, m, torch.bfloat16, None, None, dev) for kw in kws]
        row["ours A8 grouped GEMM"] = timed([(lambda g=g: g(x)) for g in grouped])
        decoded = [ops._bind_a8_decoded(kw, m, torch.bfloat16, None, ch) for kw, ch in zip(kws, channels)]
        row["ours A8 decoded"] = timed([(lambda d=d: d(x)) for d in decoded])
        quant = ops._bind_act_quant(m, k)
        row["act quant"] = timed([lambda: quant(x)])
        row["decode to int8"] = timed([(lambda d=d: d(c)) for d, c in zip(decoders, codes)])
        a16 = [ops._bind_route("dequant", kw, m, torch.bfloat16, None, None, dev) for kw in kws]
        row["ours A16 decode+cuBLAS"] = timed([(lambda d=d: d(x)) for d in a16])
        if m == tokens[0]:
            error = reference_error(kws[0], x, decoded[0](x))
            for tile in tiles:
                runs = [ops._bind_a8_decoded(kw, m, torch.bfloat16, None, ch, tile) for kw, ch in zip(kws, channels)]
                tile_us[",".join(map(str, tile))] = timed([(lambda d=d: d(x)) for d in runs])
        per_m[str(m)] = row
        log(f"  {m} tokens: {json.dumps(row)}")
    return per_m, tile_us, error


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under Triton's interpreter")
    args = ap.parse_args(argv)
    if args.smoke:
        bk.DEVICE = "cpu"
        shapes, tokens, tiles = SMOKE_SHAPES, SMOKE_TOKENS, SMOKE_TILES
    elif not torch.cuda.is_available():
        print("a8_probe.py: no CUDA device (use --smoke on a CPU)", file=sys.stderr)
        return 2
    else:
        shapes, tokens, tiles = SHAPES, TOKENS, TILES
    import triton
    result = {"card": torch.cuda.get_device_name(0) if bk.DEVICE == "cuda" else "cpu (smoke)",
              "torch": torch.__version__, "triton": triton.__version__, "mix": "avg4",
              "default_tile": list(ops.A8_GEMM_TILE), "a8_decode_min_tokens": ops.A8_DECODE_MIN_TOKENS,
              "us": {}, "tiles_us": {}, "error": {}}
    with torch.inference_mode():
        for shape, (n, k) in shapes.items():
            log(f"{shape} ({n} x {k})")
            result["us"][shape], result["tiles_us"][shape], result["error"][shape] = bench_shape(n, k, tokens, tiles)
            atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")  # a cut-short run keeps its shapes
            if bk.DEVICE == "cuda":
                torch.cuda.empty_cache()
    result["total_s"] = round(time.time() - START, 1)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    log(json.dumps({s: {m: {k: v for k, v in r.items()} for m, r in rows.items() if m == str(tokens[0])}
                    for s, rows in result["us"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
