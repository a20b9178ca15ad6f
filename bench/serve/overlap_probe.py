"""Can decoding hide behind the GEMM? The measurement behind issue #17's 590-token ceiling.

    PYTHONPATH=. python bench/serve/overlap_probe.py --out bench/serve/overlap_probe.json   # H200, ~1 min
    PYTHONPATH=. python bench/serve/overlap_probe.py --smoke --out /tmp/overlap_smoke.json  # CPU check

At 590 tokens (what an OFT forward runs) every decoder GEMM is compute-bound, and today's 16-bit
activation route decodes the layer to a transient bf16 matrix, then calls cuBLAS: its time is the
decode PLUS the GEMM, so it cannot reach bf16's time. The one way past that without a fused
mixed-input GEMM is to decode the NEXT layer on a second stream while this layer's GEMM runs
(decode is memory-bound, the GEMM compute-bound). Whether the two actually share the card depends on
how many SMs cuBLAS's kernel leaves free, which only a measurement says. Per decoder shape, side by
side in one run (CUDA graphs, L2 flushed before each replay, each figure per layer over a chain of
layer copies larger than L2):

  bf16 cuBLAS                       the GEMM a quantized layer replaces
  decode avg4 -> bf16               our one-launch decode (kernels.ops._bind_dequant) alone
  A16 serial (today)                decode, then cuBLAS on the decoded matrix
  A16 prefetch                      cuBLAS on layer i while layer i+1 decodes on a side stream
  fp8 act quant (Triton)            the fused per-token e4m3 quantization alone
  fp8 cuBLAS GEMM only              torch._scaled_mm row-wise, weights e4m3 ahead of time
  fp8 W8A8 peer                     fused act quant + _scaled_mm (weights at 8 bits, resident)
  A8 prefetch (bf16-decode bound)   act quant + _scaled_mm on layer i while layer i+1 decodes on a
                                    side stream; the decode writes bf16, twice the bytes a decode
                                    to e4m3 writes, so this bounds such a route from above

Output JSON: card, torch, tokens, layers_us {shape: {method: us}}, ratios {shape: {...}}, notes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
for p in (REPO, REPO / "bench" / "kernels"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import bench_kernels as bk  # noqa: E402

from qvla_ros.io import atomic_write_text  # noqa: E402
from qvla_ros.kernels.testing import MIXES, mix_counts, random_kernel_weights  # noqa: E402

#: the decoder's Linear shapes (out_features, in_features) at OpenVLA-OFT's 7B size
SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}
SMOKE_SHAPES = {"q/k/v/o": (64, 512), "gate/up": (128, 512)}


def chain_time(step, layers: int) -> float:
    """Seconds per layer of `step(i)` run for i = 0..layers-1 as one captured chain."""
    def chain():
        for i in range(layers):
            step(i)
    return bk.graph_time([chain], flush=True) / layers


def prefetch_chain(decoders, buffers, gemm, layers: int):
    """step(i): wait for layer i's decode, start layer i+1's decode on a side stream (into the other
    buffer, once layer i-1's GEMM that read it is done), run layer i's GEMM on the main stream."""
    side = torch.cuda.Stream() if bk.DEVICE == "cuda" else None

    def step(i):
        if side is None:  # CPU smoke: the same work, serially
            if i == 0:
                decoders[0](buffers[0])
            decoders[(i + 1) % len(decoders)](buffers[(i + 1) % 2])
            gemm(i, buffers[i % 2])
            return
        main = torch.cuda.current_stream()
        if i == 0:
            decoders[0](buffers[0])
        else:
            # Not at i == 0: under capture the side stream must first be forked from the main one
            # (its first wait is on the main stream), or the capture is invalidated.
            main.wait_stream(side)  # layer i's decode (started during layer i-1) is done
        side.wait_stream(main)   # ... and so is layer i-1's GEMM, which read the other buffer
        with torch.cuda.stream(side):
            decoders[(i + 1) % len(decoders)](buffers[(i + 1) % 2])
        gemm(i, buffers[i % 2])
        if i == layers - 1:
            main.wait_stream(side)  # a captured graph must join every stream it forked
    return step


def probe_shape(n: int, k: int, m: int, layers: int) -> dict[str, float]:
    from qvla_ros.kernels.ops import _bind_dequant
    from qvla_ros.kernels.triton_fp8 import quantize_activations_fp8

    dev = bk.DEVICE
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    x = torch.randn(m, k, device=dev, dtype=dtype)
    counts = mix_counts(n, MIXES["avg4"])
    kws = [random_kernel_weights(n, k, counts, dev, seed=s) for s in range(layers)]
    decoders = [_bind_dequant(kw, torch.bfloat16) for kw in kws] if dev == "cuda" else \
        [(lambda out, kw=kw: out.copy_(torch.randn(n, k))) for kw in kws]
    buffers = [torch.empty(n, k, device=dev, dtype=dtype) for _ in range(2)]
    dense = [torch.randn(n, k, device=dev, dtype=dtype) * 0.02 for _ in range(layers)]
    out: dict[str, float] = {}

    out["bf16 cuBLAS"] = chain_time(lambda i: torch.nn.functional.linear(x, dense[i]), layers)
    out["decode avg4 -> bf16"] = chain_time(lambda i: decoders[i](buffers[i % 2]), layers)
    out["A16 serial (today)"] = chain_time(
        lambda i: torch.nn.functional.linear(x, decoders[i](buffers[i % 2])), layers)
    out["A16 prefetch"] = chain_time(prefetch_chain(
        decoders, buffers, lambda i, w: torch.nn.functional.linear(x, w), layers), layers)

    if dev == "cuda":
        w8 = [(d.to(torch.float8_e4m3fn), torch.full((1, n), 0.02 / 448, device=dev)) for d in dense]

        def fp8_gemm(xq, sx, w, sw):
            return torch._scaled_mm(xq, w.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16,
                                    use_fast_accum=True)

        xq, sx, _ = quantize_activations_fp8(x)
        sx = sx[:, None].contiguous()

        def peer(i):
            q, s, _ = quantize_activations_fp8(x)
            return fp8_gemm(q, s[:, None], *w8[i])

        # a prefetching A8 route: its GEMM would read e4m3 codes decoded into the buffer; here the
        # GEMM reads resident e4m3 weights and the side stream decodes to bf16 (an upper bound)
        def a8_gemm(i, _buffer):
            return peer(i)

        out["fp8 act quant (Triton)"] = chain_time(lambda i: quantize_activations_fp8(x), layers)
        out["fp8 cuBLAS GEMM only"] = chain_time(lambda i: fp8_gemm(xq, sx, *w8[i]), layers)
        out["fp8 W8A8 peer"] = chain_time(peer, layers)
        out["A8 prefetch (bf16-decode bound)"] = chain_time(
            prefetch_chain(decoders, buffers, a8_gemm, layers), layers)
    return {name: round(t * 1e6, 2) for name, t in out.items()}


def ratios(us: dict[str, float]) -> dict[str, float]:
    r = {"A16 serial / bf16": us["A16 serial (today)"] / us["bf16 cuBLAS"],
         "A16 prefetch / bf16": us["A16 prefetch"] / us["bf16 cuBLAS"],
         "A16 prefetch / max(GEMM, decode)": us["A16 prefetch"] / max(us["bf16 cuBLAS"], us["decode avg4 -> bf16"]),
         "A16 prefetch / (GEMM + decode)": us["A16 prefetch"] / (us["bf16 cuBLAS"] + us["decode avg4 -> bf16"])}
    if "fp8 W8A8 peer" in us:
        r["fp8 peer / bf16"] = us["fp8 W8A8 peer"] / us["bf16 cuBLAS"]
        r["A8 prefetch / fp8 peer"] = us["A8 prefetch (bf16-decode bound)"] / us["fp8 W8A8 peer"]
        r["A8 prefetch / bf16"] = us["A8 prefetch (bf16-decode bound)"] / us["bf16 cuBLAS"]
    return {k: round(v, 3) for k, v in r.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=590)
    ap.add_argument("--layers", type=int, default=8, help="layer copies per chain (more than L2 holds)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks the script runs")
    args = ap.parse_args(argv)
    if args.smoke:
        bk.DEVICE = "cpu"
    elif not torch.cuda.is_available():
        ap.error("needs a CUDA device (or --smoke)")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    m = 8 if args.smoke else args.tokens
    layers = 2 if args.smoke else args.layers
    result = {"card": torch.cuda.get_device_name() if bk.DEVICE == "cuda" else "cpu (smoke)",
              "torch": torch.__version__, "tokens": m, "layers_per_chain": layers,
              "layers_us": {}, "ratios": {},
              "notes": "us per layer, median of CUDA-graph replays of a chain of distinct layer copies, "
                       "L2 flushed before each replay; decode = the avg4 mix of kernels.testing.MIXES"}
    for name, (n, k) in shapes.items():
        us = probe_shape(n, k, m, layers)
        result["layers_us"][name] = us
        result["ratios"][name] = ratios(us)
        print(name, json.dumps(us), json.dumps(result["ratios"][name]), flush=True)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
