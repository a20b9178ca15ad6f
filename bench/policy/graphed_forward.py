"""GraphedForward (the forward PolicyServer and `qvla eval --device cuda` run) against the eager
forward, per policy variant: max |graph - eager|, ms per call both ways (the contract call end to
end: tokenizing, image preprocessing and the copy into the static buffers included), the forward
mode and the graphs captured. Writes JSON (default bench/policy/graphed_forward.json).

    python bench/policy/graphed_forward.py --smoke              # CPU: the eager path, 2 calls
    python bench/policy/graphed_forward.py --device cuda        # tiny fp32 / bf16 / qvla 4.0 plan
    python bench/policy/graphed_forward.py --device cuda --preset oft-7b --bits 4 --batch 1 4

Exit status 1 when a variant on CUDA does not run as a graph or differs from eager by more than
--tol (so the script doubles as the GPU check of the serving path).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))
PLAN = REPO / "config" / "plans" / "tiny_qvla_4.0.json"


def variants(args):
    """(name, builder) pairs; builders return a policy on args.device."""
    from qvla_ros.policy import load_policy, make_policy
    from qvla_ros.quant import load_quantized_policy, quantizable_linears, quantize_
    from qvla_ros.quant.plan import plan_from_bits

    dev = args.device
    if args.preset is None:
        yield "tiny fp32", lambda: load_policy(None, device=dev)
        if args.smoke:
            return
        yield "tiny bf16", lambda: load_policy(None, device=dev, dtype=torch.bfloat16)
        yield "tiny qvla 4.0 plan", lambda: load_quantized_policy(None, str(PLAN), device=dev)
        return

    def build(bits):
        policy = make_policy(args.preset, seed=0, device=dev, dtype=torch.bfloat16)
        if bits:
            quantize_(policy, plan_from_bits(policy, {n: bits for n in quantizable_linears(policy)}),
                      check_weights=False)
        return policy.eval()

    yield f"{args.preset} bf16", lambda: build(0)
    for bits in args.bits:
        yield f"{args.preset} uniform {bits}-bit", lambda bits=bits: build(bits)


def timed(call, iters: int, cuda: bool) -> float:
    """Median ms of call() over iters (after 3 untimed calls)."""
    for _ in range(3):
        call()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--smoke", action="store_true", help="CPU, the tiny fp32 policy, 2 timed calls")
    p.add_argument("--preset", default=None, help="random-weight preset (e.g. oft-7b) instead of tiny")
    p.add_argument("--bits", type=int, nargs="*", default=[4], help="uniform widths to quantize the preset to")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--tol", type=float, default=2e-2, help="max |graph - eager| allowed on CUDA")
    p.add_argument("--out", type=Path, default=HERE / "graphed_forward.json")
    args = p.parse_args()
    if args.smoke:
        args.device, args.iters, args.batch = "cpu", 2, [1, 2]
    from qvla_ros.policy.graphed import CUDA_GRAPH, GraphedForward

    cuda = args.device.startswith("cuda")
    rows, failed = [], []
    for name, build in variants(args):
        policy = build()
        runner = GraphedForward(policy)
        cfg = policy.config
        for batch in args.batch:
            g = torch.Generator().manual_seed(batch)
            images = torch.randint(0, 256, (batch, cfg.n_cams, cfg.image_size, cfg.image_size, 3),
                                   dtype=torch.uint8, generator=g)
            proprio = torch.randn(batch, cfg.proprio_dim, generator=g)
            texts = ["pull the drawer open"] * batch
            with torch.inference_mode():
                graphed = runner(images, texts, proprio)
                eager = policy(images, texts, proprio)
                diff = float((graphed.float() - eager.float()).abs().max())
                row = {"variant": name, "batch": batch, "forward_mode": runner.forward_mode,
                       "graphs": len(runner.shapes), "max_abs_diff": diff,
                       "graph_ms": timed(lambda: runner(images, texts, proprio), args.iters, cuda),
                       "eager_ms": timed(lambda: policy(images, texts, proprio), args.iters, cuda)}
            row["eager_over_graph"] = row["eager_ms"] / row["graph_ms"]
            rows.append(row)
            print(f"{name:<24} batch {batch}: {row['forward_mode']}; graph {row['graph_ms']:.2f} ms, "
                  f"eager {row['eager_ms']:.2f} ms; max |graph - eager| {diff:.3g}", flush=True)
            if cuda and (row["forward_mode"] != CUDA_GRAPH or not diff <= args.tol):
                failed.append(f"{name} batch {batch}")
            if not cuda and diff != 0.0:  # the eager path is the policy's own call
                failed.append(f"{name} batch {batch} (eager path differs)")
        del policy, runner
        if cuda:
            torch.cuda.empty_cache()
    card = torch.cuda.get_device_name() if cuda else "cpu"
    args.out.write_text(json.dumps({"device": card, "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
