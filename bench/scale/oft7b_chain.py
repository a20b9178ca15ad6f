"""QVLA's whole chain at the seed's scale, on one GPU: build `oft-7b` (random weights, bf16) ->
calibrate (streaming Jacobian sensitivity over N frames) -> allocate at whole-policy budgets ->
quantize (rows rounded to nearest, and by GPTQ) -> save -> load in a FRESH process -> forward.

    PYTHONPATH=. python bench/scale/oft7b_chain.py --out bench/scale/oft7b_chain.json     # H200
    PYTHONPATH=. python bench/scale/oft7b_chain.py --smoke --out /tmp/chain.json          # CPU, oft-micro

One device call may last 10 minutes, so the chain can run in two stages: `--stage plan` (build,
calibrate, allocate, RTN rows, save, fresh load; writes the plans next to --out) and
`--stage gptq --plans DIR` (rebuilds the same seeded policy, GPTQ rows at the saved plans, save,
fresh load) whose figures are merged into the same JSON; total_s is then the sum of both stages.

Every figure comes from this one run: times per stage, peak GPU memory (the caching allocator's
reserved peak, the bytes the card had to hold, and the allocated peak), peak host RSS of this
process and of the fresh loader, bf16 VRAM (torch.cuda.memory_allocated after the build), the
quantized VRAM after load in the fresh process, and their ratio.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from qvla_ros.policy import make_policy  # noqa: E402
from qvla_ros.quant.allocate import allocate  # noqa: E402
from qvla_ros.quant.api import quantize_  # noqa: E402
from qvla_ros.quant.checkpoint import save_quantized  # noqa: E402
from qvla_ros.quant.baselines.gptq import apply_gptq  # noqa: E402
from qvla_ros.quant.calibration import synthetic_frames  # noqa: E402
from qvla_ros.quant.sensitivity import jacobian_sensitivity  # noqa: E402
from qvla_ros.quant.accounting import policy_storage, resident_nbytes  # noqa: E402

# The fresh process: load the saved checkpoint onto the device, measure, run one forward.
LOADER = r"""
import json, resource, sys, time, torch
sys.path.insert(0, sys.argv[3])
from qvla_ros.quant.checkpoint import load_quantized
from qvla_ros.quant.calibration import synthetic_frames
dev = torch.device(sys.argv[2])
t = time.perf_counter()
policy = load_quantized(sys.argv[1], device=dev)
if dev.type == "cuda":
    torch.cuda.synchronize(dev)
load_s = time.perf_counter() - t
vram = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None
frames = synthetic_frames(policy.config, 1, seed=7)
with torch.no_grad():
    t = time.perf_counter()
    actions = policy(*frames.inputs())
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
print(json.dumps({"load_s": load_s, "vram_bytes": vram, "forward_s": time.perf_counter() - t,
                  "actions_shape": list(actions.shape), "actions_finite": bool(torch.isfinite(actions).all()),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _build(args, dev):
    policy = make_policy(args.config, seed=args.seed, device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else None)
    _sync(dev)
    return policy


def _fresh_load(directory: Path, dev: torch.device) -> dict:
    out = subprocess.run([sys.executable, "-c", LOADER, str(directory), str(dev), str(ROOT)],
                         capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(f"fresh-process load of {directory} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--smoke", action="store_true", help="micro policy on the CPU, 2 frames (checks the script)")
    p.add_argument("--config", default="oft-7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--replicas", type=int, default=2, help="projections per backward pass in calibration")
    p.add_argument("--budgets", default="4.0,3.0", help="whole-policy bits per parameter")
    p.add_argument("--gptq-budgets", default="4.0", help="budgets also quantized with GPTQ rows")
    p.add_argument("--gptq-frames", type=int, default=64,
                   help="frames GPTQ rounds on, all in ONE forward: this bounds its activation memory")
    p.add_argument("--layout", choices=("kernel", "packed"), default="kernel",
                   help="how the allocator prices rows: as the GPU kernels hold them (what this chain "
                        "serves) or as the packed checkpoint buffers")
    p.add_argument("--workdir", type=Path, default=None, help="where checkpoints go (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage", choices=("all", "plan", "quantize", "gptq"), default="all",
                   help="quantize: the plan stage's plans (--plans) quantized with RTN rows, saved and "
                        "loaded fresh, after a --probe-frames calibration that measures its peak memory "
                        "and per-frame time and times allocation on the same shapes")
    p.add_argument("--probe-frames", type=int, default=2)
    p.add_argument("--plans", type=Path, default=None, help="gptq stage: the folder the plan stage wrote plans to")
    args = p.parse_args(argv)
    if args.smoke:
        # oft-7b's micro sibling (the same architecture) in float32. Its unquantized remainder alone
        # (embedding, projectors, head) is ~18 bits/param, so higher budgets.
        args.config, args.device, args.frames, args.gptq_frames = "oft-micro", "cpu", 2, 4
        args.budgets, args.gptq_budgets = "24.0,22.0", "24.0"
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("oft7b_chain: no CUDA device (use --smoke on a CPU)", file=sys.stderr)
        return 2
    budgets = [float(b) for b in args.budgets.split(",")]
    gptq_budgets = {float(b) for b in args.gptq_budgets.split(",") if b.strip()}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="qvla-chain-"))
    work.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    if args.stage == "gptq":
        return _gptq_stage(args, dev, work, gptq_budgets)
    result = {"card": card, "config": args.config, "frames": args.frames, "replicas": args.replicas,
              "gptq_frames": args.gptq_frames, "layout": args.layout, "torch": torch.__version__, "budgets": {}}
    if args.stage == "plan":
        gptq_budgets = set()
    if args.stage == "quantize":
        gptq_budgets = set()
        result["calibration_frames_run"] = args.probe_frames
    t_total = time.perf_counter()

    # 1. the float policy, and what it holds on the device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t = time.perf_counter()
    policy = _build(args, dev)
    result["build_s"] = time.perf_counter() - t
    result["bf16_vram_bytes"] = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None
    result["params"] = sum(p.numel() for p in policy.parameters())
    result["weights"] = policy_storage(policy)["params"]   # parameters + persistent buffers
    print(f"[chain] built {args.config}: {result['params'] / 1e9:.2f} B params in {result['build_s']:.1f} s", flush=True)

    # 2. calibration: streaming action-space Jacobian sensitivity
    frames = synthetic_frames(policy.config, args.probe_frames if args.stage == "quantize" else args.frames,
                              seed=args.seed)
    t = time.perf_counter()
    table = jacobian_sensitivity(policy, frames, replicas=args.replicas, progress=True)
    _sync(dev)
    result["calibrate_s"] = time.perf_counter() - t
    result["calibrate_s_per_frame"] = result["calibrate_s"] / len(frames)
    result["calibrate_peak_gpu_bytes"] = torch.cuda.max_memory_reserved(dev) if dev.type == "cuda" else None
    result["layers"] = len(table.costs)
    _save_partial(args, result)
    result["channels"] = int(sum(c.shape[0] for c in table.costs.values()))
    print(f"[chain] calibrated {result['layers']} layers, {result['channels']} channels in "
          f"{result['calibrate_s']:.1f} s", flush=True)

    # 3. allocation at whole-policy budgets
    plans = {}
    result["allocate_s"] = 0.0
    for b in budgets:
        t = time.perf_counter()
        alloc = allocate(table, b, scope="whole", storage=table.meta["storage"], layout=args.layout)
        planned = alloc.bits_per_param
        plan = alloc.to_plan(table)
        result["allocate_s"] += time.perf_counter() - t
        if args.stage == "plan":
            plan.save(args.out.parent / "plans" / f"plan_{b}.json")
        elif args.stage == "quantize":   # quantize what the full calibration allocated
            from qvla_ros.quant.plan import BitPlan
            plan = BitPlan.load((args.plans or args.out.parent / "plans") / f"plan_{b}.json", model=policy)
            planned = plan.bits_per_param()
        plans[b] = plan
        result["budgets"][str(b)] = {"planned_bits_per_param": planned,
                                     "predicted_whole_bits_per_param": alloc.whole_bits_per_param,
                                     "action_cost": alloc.cost, "allocate_s": time.perf_counter() - t}
        print(f"[chain] allocated {b} whole-policy bits ({planned:.3f} over the planned layers) in "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        _save_partial(args, result)
    del table
    gc.collect()

    # 4. quantize (RTN rows; GPTQ rows where asked), save, load in a fresh process, forward
    first = True
    for b in budgets:
        for rounding in ("rtn", "gptq") if b in gptq_budgets else ("rtn",):
            if not first:
                del policy
                gc.collect()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                policy = _build(args, dev)   # same seed: the very weights the table was measured on
            first = False
            _quantize_save_load(args, dev, work, policy, plans[b], b, rounding, result)
    result["total_s"] = time.perf_counter() - t_total
    _finish(args, dev, result, budgets)
    return 0


def _save_partial(args, result) -> None:
    """What is measured so far, so a run stopped at the device's time limit leaves its figures."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".partial.json").write_text(json.dumps(result, indent=1))


def _quantize_save_load(args, dev, work, policy, plan, b, rounding, result) -> None:
    t = time.perf_counter()
    if rounding == "gptq":
        modules = {name: policy.get_submodule(name) for name in plan.layers}
        gptq_frames = synthetic_frames(policy.config, args.gptq_frames, seed=args.seed + 1)
        forwards = [0]   # policy forwards GPTQ ran: 2 when every group was rounded in one pass
        counter = policy.register_forward_pre_hook(lambda m, a: forwards.__setitem__(0, forwards[0] + 1))
        t_gptq = time.perf_counter()
        rel = apply_gptq(policy, modules, gptq_frames, plan.row_bits(), progress=True)
        _sync(dev)
        gptq_s = time.perf_counter() - t_gptq
        counter.remove()
        quantize_(policy, plan, check_weights=False)
    else:
        quantize_(policy, plan)
    _sync(dev)
    q_s = time.perf_counter() - t
    result["quantize_s"] = result.get("quantize_s", 0.0) + q_s
    entry = result.setdefault("budgets", {}).setdefault(str(b), {})
    entry[f"{rounding}_quantize_s"] = q_s
    if rounding == "gptq":
        # the GPTQ rounding alone (the rest of gptq_quantize_s is packing); frames in ONE batch
        entry.update(gptq_s=gptq_s, gptq_frames=args.gptq_frames, gptq_layers=len(rel),
                     gptq_policy_forwards=forwards[0],
                     gptq_mean_relative_layer_error=sum(rel.values()) / max(len(rel), 1))
        print(f"[chain] GPTQ {len(rel)} layers on {args.gptq_frames} frames in {gptq_s:.1f} s "
              f"({forwards[0]} policy forwards)", flush=True)
    # measured: every weight the quantized policy holds, over the float policy's weight count
    entry["whole_policy_bits_per_param"] = resident_nbytes(policy) * 8 / result["weights"]
    entry[f"{rounding}_inprocess_vram_bytes"] = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None
    t = time.perf_counter()
    out_dir = save_quantized(policy, plan, work / f"q{b}_{rounding}")
    s_s = time.perf_counter() - t
    result["save_s"] = result.get("save_s", 0.0) + s_s
    entry[f"{rounding}_save_s"] = s_s
    loaded = _fresh_load(out_dir, dev)
    entry[f"{rounding}_fresh"] = loaded
    if loaded["vram_bytes"] is not None and result.get("bf16_vram_bytes"):
        entry[f"{rounding}_vram_ratio"] = loaded["vram_bytes"] / result["bf16_vram_bytes"]
    _save_partial(args, result)
    print(f"[chain] {b} bits {rounding}: quantize {q_s:.1f} s, save {s_s:.1f} s, fresh load "
          f"{loaded['load_s']:.1f} s, vram {loaded['vram_bytes']}, forward ok {loaded['actions_finite']}",
          flush=True)


def _gptq_stage(args, dev, work, gptq_budgets) -> int:
    """GPTQ rows at the plan stage's plans, merged into the plan stage's JSON (--out)."""
    from qvla_ros.quant.plan import BitPlan

    # Merged into the plan stage's record when --out holds one (copy it there first), else alone.
    result = json.loads(args.out.read_text()) if args.out.exists() else {
        "card": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "config": args.config,
        "torch": torch.__version__}
    t_total = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    plans_dir = args.plans or args.out.parent / "plans"
    for b in sorted(gptq_budgets, reverse=True):
        policy = _build(args, dev)
        # what a record composed by hand may lack: the float policy's weight count and VRAM
        result.setdefault("weights", policy_storage(policy)["params"])
        if dev.type == "cuda":
            result.setdefault("bf16_vram_bytes", torch.cuda.memory_allocated(dev))
        plan = BitPlan.load(plans_dir / f"plan_{b}.json", model=policy)
        _quantize_save_load(args, dev, work, policy, plan, b, "gptq", result)
        del policy
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    stage_s = time.perf_counter() - t_total
    result["gptq_stage_s"] = stage_s
    result["total_s"] = result.get("total_s", 0.0) + stage_s
    result["gptq_frames"] = args.gptq_frames
    if dev.type == "cuda":
        result["gptq_stage_peak_gpu_bytes"] = torch.cuda.max_memory_reserved(dev)
        result["peak_gpu_bytes"] = max(result.get("peak_gpu_bytes") or 0, torch.cuda.max_memory_reserved(dev))
        result["peak_gpu_allocated_bytes"] = max(result.get("peak_gpu_allocated_bytes") or 0,
                                                 torch.cuda.max_memory_allocated(dev))
    children = [e[k]["peak_rss_bytes"] for e in result["budgets"].values() for k in e if k.endswith("_fresh")]
    result["gptq_stage_peak_host_rss_bytes"] = _rss()
    result["peak_host_rss_bytes"] = max([result.get("peak_host_rss_bytes") or 0, _rss(), *children])
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "budgets"}, indent=1))
    return 0


def _finish(args, dev, result, budgets) -> None:
    result["peak_gpu_bytes"] = torch.cuda.max_memory_reserved(dev) if dev.type == "cuda" else None
    result["peak_gpu_allocated_bytes"] = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    children = [e[k]["peak_rss_bytes"] for e in result["budgets"].values() for k in e if k.endswith("_fresh")]
    result["peak_host_rss_bytes"] = max([_rss(), *children])
    result["peak_host_rss_chain_bytes"] = _rss()
    head = result["budgets"].get(str(budgets[0]), {})
    result["quantized_vram_bytes"] = head.get("rtn_fresh", {}).get("vram_bytes")
    result["vram_ratio"] = head.get("rtn_vram_ratio")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "budgets"}, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
