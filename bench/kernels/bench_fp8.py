"""fp8 (e4m3) activations on fp8 tensor cores for mixed-bit layers (issue #17 item 4), per layer of
OpenVLA-OFT-7B's decoder at 1, 16 and 590 tokens, an avg4 row mix (MIXES["avg4"] of
bench_kernels.py), against bf16 cuBLAS and fp8 row-wise cuBLAS (torch._scaled_mm, weights
converted ahead, per-token activation scales). One run on one card, results as one JSON file.

    PYTHONPATH=. python bench/kernels/bench_fp8.py --out bench/kernels/results/fp8/results_h200.json
    PYTHONPATH=. python bench/kernels/bench_fp8.py --smoke --out /tmp/fp8_smoke.json   # CPU, < 1 min

GPU mode: compiles the tile candidates in parallel processes first (Triton's on-disk cache), then
per shape and token count: checks ours against the float reference of the same fake-quantized
activations and weights on the GPU (and one layer packed by qvla_ros.quant against packing.py's
own dequantization), lets fp8_mixed_linear tune its tiles at the first call (the tuner's log goes
into the JSON), and times as CUDA-graph replays over enough weight copies that they do not fit in
L2 (bench_kernels.graph_time / copies_for):

* "ours fp8 (quant + gemm)": what fp8_mixed_linear costs (activation kernel + grouped GEMM);
* "ours fp8 gemm only": the GEMM on pre-quantized activations; "ours fp8 act quant": the
  activation kernel alone;
* "bf16 cuBLAS": F.linear on bf16 weights;
* "fp8 cuBLAS gemm only": _scaled_mm on pre-quantized activations (row-wise scales);
  "fp8 cuBLAS + our act quant": with the fused activation kernel of this work (the fair fp8 peer);
  "fp8 cuBLAS + torch act quant": with per-token quantization in plain torch ops (run 10's peer).

JSON keys: device, mix, shapes (N, K, rows per width, weight bytes of each method), layers (one row
per shape, tokens and method: time_us, speedup_vs_bf16, weight_bytes, config, rel_err), checks
(accuracy against the references, the e4m3 activation error beside int8's), tuning (every
candidate per layer shape and token bucket: time_us, rel_err), chosen, seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}
TOKENS = (1, 16, 590)
MIX = "avg4"


def _setup(smoke: bool):
    """Import the modules (after TRITON_INTERPRET is set for a smoke run)."""
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch  # noqa: F401

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_kernels as bk  # the timing helpers (graph_time, copies_for)
    from qvla_ros.kernels import triton_fp8 as T

    if smoke:
        bk.DEVICE = "cpu"
    return bk, T


def warm(shard: int, workers: int) -> None:
    """Compile this shard's first-tier candidates (tiny launches, the real specializations)."""
    import torch

    _, T = _setup(False)
    configs = list(dict.fromkeys(c for tiers in T.CANDIDATES.values() for c in tiers[0]))[shard::workers]
    p = T.random_fp8_weights(64, 4096, {16: 16, 8: 16, 4: 16, 3: 16, 2: 0, 0: 0}, "cuda")
    x = torch.randn(3, 4096, device="cuda", dtype=torch.bfloat16)
    xq, sx, total = T.quantize_activations_fp8(x)
    for cfg in configs:
        t = time.time()
        try:
            T.launch_fp8_gemm(x, xq, sx, total, p, cfg)
            torch.cuda.synchronize()
            print(f"warm {shard}: {cfg.label()} {time.time() - t:.1f}s", flush=True)
        except Exception as e:  # the tuner reports the failure for this configuration
            print(f"warm {shard}: {cfg.label()} FAILED {e!r}"[:400], flush=True)


def rel(a, b) -> float:
    import torch
    a, b = a.to(torch.float64), b.to(torch.float64)
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU through the Triton interpreter")
    ap.add_argument("--workers", type=int, default=8, help="parallel compile processes before timing (GPU)")
    ap.add_argument("--warm-shard", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=str, default=None, help="comma-separated token counts (default 1,16,590)")
    ap.add_argument("--shapes", type=str, default=None, help="comma-separated shape names (default all)")
    args = ap.parse_args(argv)
    if args.warm_shard is not None:
        warm(args.warm_shard, args.workers)
        return 0
    t0 = time.time()
    bk, T = _setup(args.smoke)
    import torch
    import torch.nn.functional as F
    import triton

    from qvla_ros.kernels.testing import MIXES, average_bits, mix_counts
    from qvla_ros.quant.kernel_oracle import random_packed
    from qvla_ros.quant.quantizer import fake_quantize_activations

    shapes, tokens = dict(SHAPES), TOKENS
    if args.smoke:
        shapes, tokens = {"q/k/v/o": (160, 128), "down": (128, 320)}, (1, 20)
        for key in T.CANDIDATES:  # one small tile per bucket, one fallback
            T.CANDIDATES[key] = [[T.Fp8Config(64, 32, 64, 4, 2)], [T.Fp8Config(64, 32, 64, 4, 2, promote=64)]]
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    if args.tokens:
        tokens = tuple(int(t) for t in args.tokens.split(","))
    if args.shapes:
        shapes = {s: shapes[s] for s in args.shapes.split(",")}
    dev = "cpu" if args.smoke else "cuda"

    if dev == "cuda":
        props = torch.cuda.get_device_properties(0)
        device = {"name": torch.cuda.get_device_name(0), "sms": props.multi_processor_count,
                  "l2_bytes": props.L2_cache_size, "capability": list(torch.cuda.get_device_capability(0))}
    else:
        device = {"name": "cpu smoke run (Triton interpreter)", "sms": 0, "l2_bytes": 0}
    device.update(torch=torch.__version__, triton=triton.__version__)
    report = {"device": device, "mix": MIX, "mix_fractions": {str(b): f for b, f in MIXES[MIX].items()},
              "tokens": list(tokens), "shapes": {}, "layers": [], "checks": [], "tuning": {}, "chosen": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        report["tuning"] = {" ".join(map(str, k)): v for k, v in T.TUNE_LOG.items()}
        report["chosen"] = {" ".join(map(str, k)): c.label() for k, c in T.chosen_configs().items()}
        report["seconds"] = time.time() - t0
        args.out.write_text(json.dumps(report, indent=1))

    if dev == "cuda" and args.workers > 0:  # compile every first-tier tile in parallel (on-disk cache)
        procs = [subprocess.Popen([sys.executable, __file__, "--out", str(args.out), "--warm-shard", str(i),
                                   "--workers", str(args.workers)]) for i in range(args.workers)]
        for proc in procs:
            proc.wait()
        report["warm_seconds"] = time.time() - t0
        print(f"warm: {report['warm_seconds']:.0f}s", flush=True)

    def add(shape, n, k, m, method, seconds, weight_bytes, bf16_us=None, **info):
        us = seconds * 1e6
        r = dict(shape=shape, N=n, K=k, M=m, method=method, time_us=us, weight_bytes=weight_bytes,
                 tflops=2.0 * m * n * k / seconds / 1e12, **info)
        if bf16_us:
            r["speedup_vs_bf16"] = bf16_us / us
        report["layers"].append(r)
        print(f"  {shape:8s} M={m:4d} {method:30s} {us:9.2f} us {r.get('speedup_vs_bf16', 1.0):5.2f}x "
              f"{info.get('config', '')}", flush=True)
        return us

    def packed_check():  # one layer packed by the project's packer, against packing.py's dequantization
        n0, k0 = next(iter(shapes.values()))
        packed, _ = random_packed(n0, k0, mix_counts(n0, MIXES[MIX]), seed=7)
        gen = torch.Generator().manual_seed(0)
        bias0 = torch.randn(n0, generator=gen) * 0.1
        p0 = T.prepare_fp8(packed, bias=bias0, device=dev)
        x0 = torch.randn(max(tokens), k0, generator=gen).to(torch.bfloat16).to(dev)
        w0 = packed.dequantize(torch.float64).to(dev)
        dense = (packed.bits_per_row() == 16)[None, :].to(dev)
        b0 = bias0.double().to(dev)
        ref0 = torch.where(dense, x0.double() @ w0.T, T.fake_quantize_activations_fp8(x0).double() @ w0.T) + b0
        y0 = T.fp8_mixed_linear(x0, p0)
        a16 = x0.double() @ w0.T + b0
        report["checks"].append({"what": "packing.py layer vs its own dequantization, e4m3 x", "N": n0, "K": k0,
                                 "M": max(tokens), "rel_err": rel(y0, ref0), "finite": bool(torch.isfinite(y0).all()),
                                 "rel_err_vs_a16": rel(y0, a16),
                                 "int8_a8_rel_err_vs_a16": rel(fake_quantize_activations(x0.float(), 8).double() @ w0.T
                                                               + b0, a16)})
        print("check:", report["checks"][-1], flush=True)
        del packed, w0, p0

    try:
        packed_check()
    except Exception as e:  # keep going: the per-shape runs below are independent of it
        report["checks"].append({"what": "packing.py layer", "error": repr(e)[:1000], "finite": False,
                                 "rel_err": None})
        print(f"packed check FAILED: {e!r}"[:1000], flush=True)
    save()

    for shape, (n, k) in shapes.items():
        counts = mix_counts(n, MIXES[MIX])
        probe = T.random_fp8_weights(n, k, counts, dev, seed=0)
        ours_bytes = probe.nbytes()
        copies = bk.copies_for(ours_bytes)
        ours = [probe] + [T.random_fp8_weights(n, k, counts, dev, seed=i) for i in range(1, copies)]
        bf16_copies = bk.copies_for(2 * n * k)
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(bf16_copies)]
        f8 = [(torch.randn(n, k, device=dev) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
              for _ in range(bk.copies_for(n * k))]
        sw = torch.full((1, n), 2e-4, device=dev)
        report["shapes"][shape] = {"N": n, "K": k, "rows": {str(b): c for b, c in counts.items()},
                                   "average_bits": average_bits(counts),
                                   "weight_bytes": {"ours": ours_bytes, "bf16": 2 * n * k, "fp8": n * k + 4 * n},
                                   "copies": {"ours": copies, "bf16": bf16_copies, "fp8": len(f8)}}

        def measure(shape, n, k, m):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            # accuracy first (the first call also tunes the tiles of this shape and token bucket)
            y = T.fp8_mixed_linear(x, probe)
            ref = T.fp8_mixed_linear_reference(x, probe, torch.float32 if dev == "cuda" else torch.float64)
            err = rel(y, ref)
            cfg = T.chosen_configs().get(T._key(probe, m), T.DEFAULT_CONFIGS[T.m_bucket(m)]).label()
            report["checks"].append({"what": "ours vs float reference of fake-quantized x and dequantized W",
                                     "shape": shape, "M": m, "rel_err": err, "finite": bool(torch.isfinite(y).all()),
                                     "config": cfg})
            t = bk.graph_time([(lambda w=w: F.linear(x, w)) for w in ws])
            bf16_us = add(shape, n, k, m, "bf16 cuBLAS", t, 2 * n * k)
            t = bk.graph_time([(lambda p=p: T.fp8_mixed_linear(x, p)) for p in ours])
            add(shape, n, k, m, "ours fp8 (quant + gemm)", t, ours_bytes, bf16_us, config=cfg, rel_err=err)
            xq, sx, total = T.quantize_activations_fp8(x)
            chosen = T.pick_config(x, probe)
            t = bk.graph_time([(lambda p=p: T.launch_fp8_gemm(x, xq, sx, total, p, chosen)) for p in ours])
            add(shape, n, k, m, "ours fp8 gemm only", t, ours_bytes, bf16_us, config=cfg)
            t = bk.graph_time([lambda: T.quantize_activations_fp8(x)] * (1 if args.smoke else 4))
            add(shape, n, k, m, "ours fp8 act quant", t, 0, None)
            try:
                sxa = sx[:, None].contiguous()

                def scaled(w, a=xq, s=sxa):
                    return torch._scaled_mm(a, w.t(), scale_a=s, scale_b=sw, out_dtype=torch.bfloat16,
                                            use_fast_accum=True)

                def ours_quant_scaled(w):
                    a, s, _ = T.quantize_activations_fp8(x)
                    return scaled(w, a, s[:, None])

                def torch_quant_scaled(w):
                    s = (x.abs().amax(dim=-1, keepdim=True).float() / 448.0).clamp(min=1e-12)
                    a = (x.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn)
                    return scaled(w, a, s)

                y8 = scaled(f8[0])
                ref8 = (xq.double() * sxa.double()) @ (f8[0].double() * sw.double().T).T
                f8_err = rel(y8, ref8)
                t = bk.graph_time([(lambda w=w: scaled(w)) for w in f8])
                add(shape, n, k, m, "fp8 cuBLAS gemm only", t, n * k + 4 * n, bf16_us, rel_err=f8_err)
                t = bk.graph_time([(lambda w=w: ours_quant_scaled(w)) for w in f8])
                add(shape, n, k, m, "fp8 cuBLAS + our act quant", t, n * k + 4 * n, bf16_us)
                t = bk.graph_time([(lambda w=w: torch_quant_scaled(w)) for w in f8])
                add(shape, n, k, m, "fp8 cuBLAS + torch act quant", t, n * k + 4 * n, bf16_us)
            except Exception as e:  # _scaled_mm is not there on every device/build (e.g. the CPU smoke run)
                report["checks"].append({"what": "fp8 cuBLAS", "shape": shape, "M": m, "error": repr(e)[:300]})
                print(f"  fp8 cuBLAS unavailable: {e!r}"[:300], flush=True)

        for m in tokens:
            try:
                measure(shape, n, k, m)
            except Exception as e:  # keep the rest of the run (and this failure) in the JSON
                report["checks"].append({"what": "run", "shape": shape, "M": m, "error": repr(e)[:1000],
                                         "finite": False, "rel_err": None})
                print(f"  {shape} M={m} FAILED: {e!r}"[:1000], flush=True)
            save()
        del ours, ws, f8, probe
        if dev == "cuda":
            torch.cuda.empty_cache()
    save()
    bad = [c for c in report["checks"] if "rel_err" in c and not (c["rel_err"] is not None and c["finite"]
                                                                   and c["rel_err"] < T.TUNE_TOLERANCE)]
    print(f"total {time.time() - t0:.0f}s; {len(bad)} failed checks; wrote {args.out}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
