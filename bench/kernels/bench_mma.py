"""The tensor-core small-M kernel (kernels/mixed_gemv_mma.cu) beside bf16 cuBLAS and the shipped
Triton paths, 1-16 tokens, on one card in one run: per layer of OFT-7B's decoder (every compiled
tile, each checked against the dequantized product first) and the whole 32-block decoder with the
tiles the sweep found fastest.

    PYTHONPATH=. python3 bench/kernels/bench_mma.py --out DIR [--tokens 1,16] [--mixes avg4]

"ours (auto)" is what the op ran by default before this kernel: the Triton small-M kernel at one
token, the grouped GEMM at 2-16. Method and byte floor as in bench_kernels.py (CUDA-graph replays
over weight copies larger than L2, median).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402
from qvla_ros.kernels import dequantize_kernel_weights, launch_gemv, launch_mixed_gemm  # noqa: E402
from qvla_ros.kernels.cuda_gemv import (MmaConfig, compiled_tiles, launch_mma_gemv,  # noqa: E402
                                        override_mma_configs, pick_mma_config)
from qvla_ros.kernels.testing import MIXES, average_bits, mix_counts, random_kernel_weights  # noqa: E402


#: the testing mixes, and "b4": every row 4-bit (the spike's layer, bench/kernels/spike/)
MIX_TABLE = dict(MIXES, b4={4: 1.0})


def shipped_call(x, kw):
    """What QVLA_SMALL_M_KERNEL=auto ran before this kernel."""
    if x.shape[0] == 1:
        return launch_gemv(x, kw, None, x.dtype)
    return launch_mixed_gemm(x, kw, None, x.dtype, 16)


def bench_layer(results, shape, n, k, tokens, mixes, ceilings):
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(bk.copies_for(n * k * 2))]
    bf16 = {}
    for m in tokens:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        t = bk.graph_time([(lambda w=w: F.linear(x, w)) for w in ws])
        bf16[m] = bk.row(results, shape, n, k, m, "bf16 cuBLAS", t, n * k * 2, m * k * 2 + m * n * 2,
                         ceilings)["time_us"]
    del ws
    torch.cuda.empty_cache()
    for mix in mixes:
        counts = mix_counts(n, MIX_TABLE[mix])
        kws = [random_kernel_weights(n, k, counts, "cuda", seed=0)]
        w_bytes = kws[0].nbytes()
        kws += [random_kernel_weights(n, k, counts, "cuda", seed=s) for s in range(1, bk.copies_for(w_bytes))]
        w_ref = dequantize_kernel_weights(kws[0])
        for m in tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ w_ref.T
            io = m * k * 2 + m * n * 2
            info = dict(avg_bits=average_bits(counts), mix=mix)
            t = bk.graph_time([(lambda kw=kw: shipped_call(x, kw)) for kw in kws])
            shipped = bk.row(results, shape, n, k, m, f"ours (auto) {mix}", t, w_bytes, io, ceilings,
                             speedup_vs_bf16=bf16[m] / (t * 1e6), **info)["time_us"]
            default = pick_mma_config(m)
            for cfg in candidates():
                try:
                    y = launch_mma_gemv(x, kws[0], None, x.dtype, config=cfg)
                    err = float((y.float() - ref).norm() / ref.norm())
                    if not (err < 1e-2 and torch.isfinite(y).all()):
                        print(f"  !! mma {shape} {mix} M={m} {cfg}: rel err {err:.3g}", flush=True)
                        continue
                    t = bk.graph_time([(lambda kw=kw: launch_mma_gemv(x, kw, None, x.dtype, config=cfg))
                                       for kw in kws])
                except Exception as e:  # e.g. a tile too wide for 16 tokens' staging
                    print(f"  -- mma {shape} {mix} M={m} {cfg}: {e!r}"[:300], flush=True)
                    continue
                bk.row(results, shape, n, k, m, f"ours-mma {mix}", t, w_bytes, io, ceilings,
                       speedup_vs_bf16=bf16[m] / (t * 1e6), speedup_vs_gemm=shipped / (t * 1e6),
                       config=cfg_str(cfg) + (" (default)" if cfg == default else ""), rel_err=err, **info)
        del kws, w_ref
        torch.cuda.empty_cache()


def candidates() -> list[MmaConfig]:
    """Every compiled tile at three run lengths per block (rows split along K into about 8, 16 or
    32 steps per block)."""
    return [MmaConfig(*tile, block_steps=steps) for tile in sorted(compiled_tiles()) for steps in (8, 16, 32)]


def cfg_str(cfg: MmaConfig) -> str:
    return f"rt{cfg.row_tiles} wk{cfg.k_warps} u{cfg.unroll} steps{cfg.block_steps}"


def best_per_bucket(results) -> dict[str, MmaConfig]:
    """Per token bucket, the config with the least time summed over every timed shape and mix (only
    configs that ran correctly everywhere)."""
    from qvla_ros.kernels.cuda_gemv import mma_bucket
    by_name = {cfg_str(c): c for c in candidates()}
    chosen = {}
    for bucket in ("m1", "m8", "m16"):
        rows = [r for r in results if r["method"].startswith("ours-mma") and mma_bucket(r["M"]) == bucket]
        cases = {(r["shape"], r["mix"], r["M"]) for r in rows}
        totals = {}
        for r in rows:
            name = r["config"].replace(" (default)", "")
            totals.setdefault(name, []).append(r["time_us"])
        complete = {name: sum(ts) for name, ts in totals.items() if len(ts) == len(cases)}
        if complete:
            chosen[bucket] = by_name[min(complete, key=complete.get)]
    return chosen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", default="1,4,8,16")
    ap.add_argument("--mixes", default="avg4,avg3,avg8")
    ap.add_argument("--skip-decoder", action="store_true")
    ap.add_argument("--skip-layers", action="store_true")
    args = ap.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    mixes = args.mixes.split(",")
    props = torch.cuda.get_device_properties(0)
    report = {"device": {"name": torch.cuda.get_device_name(0), "sms": props.multi_processor_count,
                         "torch": torch.__version__}, "layers": [], "decoder": []}
    report["ceilings"] = bk.measure_ceilings()
    print(report["device"], report["ceilings"], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "_" for ch in report["device"]["name"]).strip("_").lower()
    out = args.out / f"mma_{slug}.json"
    t0 = time.time()
    if not args.skip_layers:
        for shape, (n, k) in bk.SHAPES.items():
            bench_layer(report["layers"], shape, n, k, tokens, mixes, report["ceilings"])
            out.write_text(json.dumps(report, indent=1))
        chosen = best_per_bucket(report["layers"])
        report["chosen"] = {bucket: cfg_str(cfg) for bucket, cfg in chosen.items()}
        print("chosen:", report["chosen"], flush=True)
        override_mma_configs(chosen)
    if not args.skip_decoder:
        for m in tokens:
            # bf16 twice: the run-to-run spread; "ours" at one token is the Triton small-M kernel;
            # ours-mma with the tiles chosen above
            for kind in ("bf16", "ours-gemv" if m == 1 else "ours", "ours-mma", "bf16"):
                try:
                    d = bk.bench_decoder(kind, m, 16)
                    d["mma_config"] = cfg_str(pick_mma_config(m)) if kind == "ours-mma" else None
                    report["decoder"].append(d)
                    print("decoder", d, flush=True)
                except Exception as e:
                    print(f"decoder {kind} {m} failed: {e!r}"[:500], flush=True)
                out.write_text(json.dumps(report, indent=1))
    print(f"total {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
