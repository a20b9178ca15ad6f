"""Serving side by side, one script, one run on one card (issue #17 item 6).

    PYTHONPATH=. python bench/serve/serve.py --out bench/serve/results.json     # the H200 run (~5 min)
    PYTHONPATH=. python bench/serve/serve.py --smoke --out /tmp/serve_smoke.json # CPU check, < 1 min

1. The whole policy (make_policy("oft-7b"): the published OpenVLA-OFT architecture, random weights, bf16 on cuda) at batch 1 and 4, as a
   CUDA graph (torch.cuda.graph via bench_kernels.graph_time, L2 flushed before each timed replay)
   and eager (each call timed alone with CUDA events, L2 flushed before it), over the preprocessed
   inputs (predict_normalized: what the graph captures; tokenization and image conversion outside).
   Variants: bf16; A16 avg4; A8 avg4 (the grouped GEMM's int8 path, the default) and A8 avg4
   decoded (the opt-in decoded-codes int8 GEMM from 24 tokens); A16 avg3 (the kernels' MIXES,
   drawn per layer at random: random plans); fp8 W8A8 with cuBLAS (torch._scaled_mm row-wise, weights converted ahead,
   per-token activation scales in torch: bench_kernels.fp8_linear), the peer a user would pick.
   Optional variants from other modules join with one line in OPTIONAL_VARIANTS (skipped when their
   module is missing).
2. Per layer at 1/16/590 tokens (q/k/v/o 4096x4096, gate/up 4096->11008, down 11008->4096): bf16
   cuBLAS, fp8 cuBLAS (GEMM only, and with the activation quantization), torch int4 tinygemm g128
   (bench_kernels.bench_baselines), ours per variant through PreparedLinear (what MixedBitLinear
   runs), each over weight copies larger than L2 (bench_kernels.graph_time / copies_for).
3. VRAM per variant: torch.cuda.memory_allocated() with that variant's layers in place, less the
   bf16 weights of the swapped layers, which this script keeps aside on the card to restore bf16 for
   the next variant (7B bf16 is 15 GB; the H200 holds 139 GiB, so one bf16 model plus one variant
   fits; no deepcopy).

How quantized variants are built: each planned Linear (qvla_ros.quant.targets: every Linear but the
action head and the projectors) is replaced by a MixedBitLinear whose kernel layout is drawn on the
GPU (kernels.testing.random_kernel_weights: random codes, a random channel-to-width assignment with
the mix's row counts), its packed buffers meta placeholders (the layout is the only copy, as after
quantize_ on a GPU). That takes seconds where quantize_ took 92 s; each variant is freed before the
next. Timings do not depend on the codes' values, only on the widths and the shapes.

Output JSON: card, policy_ms {variant: {batch: {graph, eager, eager_over_graph}}}, layers_us {shape:
{tokens: {method: us}}}, vram_bytes {variant: bytes}, plus build seconds and notes.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
for p in (REPO, REPO / "bench" / "kernels"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import bench_kernels as bk  # noqa: E402

from qvla_ros.kernels import PreparedLinear, ops  # noqa: E402
from qvla_ros.kernels.launch_common import BoundLaunch  # noqa: E402
from qvla_ros.kernels.testing import MIXES, mix_counts, random_kernel_weights  # noqa: E402
from qvla_ros.quant.mixed_linear import MixedBitLinear  # noqa: E402
from qvla_ros.quant.targets import quantizable_linears  # noqa: E402

LAYER_SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}
LAYER_TOKENS = (1, 16, 590)
BATCHES = (1, 4)
POLICY = "oft-7b"
DEVICE = "cuda"
REPLAYS, EAGER_CALLS = 20, 10


# ---- the variants ---------------------------------------------------------------------------------

class Fp8Linear(nn.Module):
    """W8A8 fp8 e4m3 on cuBLAS: row-wise weight scales converted ahead, per-token activation scales
    (bench_kernels.fp8_linear, the decoder ceiling's peer). On a CPU (--smoke) the same numbers in
    float32, since _scaled_mm has no CPU kernel there."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        scale_w = (w.abs().amax(dim=-1).float().clamp(min=1e-12) / 448.0)[None, :]
        self.register_buffer("wq", (w.float() / scale_w.t()).to(torch.float8_e4m3fn))
        self.register_buffer("scale_w", scale_w)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.out_features = w.shape[0]

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        if x2.is_cuda:
            y = bk.fp8_linear(x2, ("w",), {"w": (self.wq, self.scale_w)})[0]
        else:
            scale_x = x2.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / 448.0
            xq = (x2.float() / scale_x).to(torch.float8_e4m3fn)
            y = ((xq.float() * scale_x) @ (self.wq.float() * self.scale_w.t()).T).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


class KernelLinear(nn.Module):
    """A Linear computed by an outside kernel's callable layer(x) (the hook of OPTIONAL_VARIANTS)."""

    def __init__(self, layer: Callable, out_features: int):
        super().__init__()
        self.layer, self.out_features = layer, out_features

    def forward(self, x):
        return self.layer(x)


def mixed_layer(linear: nn.Linear, mix: str, act_bits: int, seed: int) -> MixedBitLinear:
    """A MixedBitLinear of `linear`'s shape at a random plan of the mix, built on linear's device in
    the kernel layout only (no packing on the CPU, no contract buffers)."""
    n, k = linear.out_features, linear.in_features
    counts = mix_counts(n, MIXES[mix])
    with torch.device("meta"):
        mod = MixedBitLinear(k, n, counts, bias=linear.bias is not None, act_bits=act_bits)
    if linear.bias is not None:
        mod.bias = linear.bias.detach().float().clone()
    mod._kernel_weights = random_kernel_weights(n, k, counts, linear.weight.device, seed=seed)
    mod._prepare()
    return mod


def _dump(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".partial.json").write_text(json.dumps(result, indent=1) + "\n")


def optional_kernel_factory(module: str, function: str):
    """factory(linear, mix, act_bits, seed) for a kernel module that may not exist yet: `function`
    (out_features, in_features, counts per width, device, seed=, bias=) -> callable layer(x) with
    random weights of that mix drawn on the device. None when the module or the function
    is missing (the variant is then skipped and the reason recorded)."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    fn = getattr(mod, function, None)
    if fn is None:
        return None

    def factory(linear, mix, act_bits, seed):
        n, k = linear.out_features, linear.in_features
        layer = fn(n, k, mix_counts(n, MIXES[mix]), linear.weight.device, seed=seed, bias=linear.bias is not None)
        return KernelLinear(layer, n)
    return factory


@dataclass
class Variant:
    name: str
    kind: str  # "bf16", "fp8", "mixed"
    mix: str | None = None
    act_bits: int = 16
    factory: Callable | None = None  # (linear, mix, act_bits, seed) -> nn.Module; default mixed_layer
    #: ops.A8_DECODE_MIN_TOKENS while this variant runs (None: the process's routing, by default the
    #: grouped GEMM's int8 path at every token count); 24 runs the decoded-codes int8 GEMM from 24 tokens
    a8_min_tokens: int | None = None


@contextlib.contextmanager
def routing(v: Variant):
    """The routing table as variant v asks for it (route() reads the module constant per bind)."""
    shipped = ops.A8_DECODE_MIN_TOKENS
    if v.a8_min_tokens is not None:
        ops.A8_DECODE_MIN_TOKENS = v.a8_min_tokens
    try:
        yield
    finally:
        ops.A8_DECODE_MIN_TOKENS = shipped


VARIANTS = [
    Variant("bf16", "bf16"),
    Variant("A16 avg4", "mixed", "avg4", 16),
    Variant("A8 avg4", "mixed", "avg4", 8),
    Variant("A8 avg4 decoded", "mixed", "avg4", 8, a8_min_tokens=24),
    Variant("A16 avg3", "mixed", "avg3", 16),
    Variant("fp8 W8A8 cuBLAS", "fp8"),
]

#: (name, mix, act_bits, module, function): variants from kernels still being written; the function
#: takes (KernelWeights, float32 bias or None) and returns a callable layer(x). Skipped (and said so
#: in the results) while the module or function does not exist. Colleague h5's fp8 kernel: put its
#: entry point's name here.
OPTIONAL_VARIANTS = [
    ("A8 avg4 fp8", "avg4", 8, "qvla_ros.kernels.triton_fp8", "random_fp8_layer"),
]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_variant(policy: nn.Module, originals: dict[str, nn.Linear], v: Variant) -> None:
    """Swap every planned layer for the variant's (bf16: put the originals back)."""
    for i, (name, linear) in enumerate(originals.items()):
        if v.kind == "bf16":
            layer = linear
        elif v.kind == "fp8":
            layer = Fp8Linear(linear)
        else:
            layer = (v.factory or mixed_layer)(linear, v.mix, v.act_bits, seed=1000 + i)
        _set_module(policy, name, layer)


# ---- timing ---------------------------------------------------------------------------------------

def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def eager_ms(fn, calls: int) -> float:
    """Median ms of fn() called alone, L2 flushed before each call (CUDA events; CPU: perf_counter)."""
    fn()
    sync()
    times = []
    for _ in range(calls):
        bk.flush_l2()
        if DEVICE == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def policy_inputs(policy, batch: int):
    cfg = policy.config
    gen = torch.Generator().manual_seed(batch)
    images = torch.randint(0, 256, (batch, cfg.n_cams, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8,
                           generator=gen)
    proprio = torch.randn(batch, cfg.proprio_dim, generator=gen)
    instr = ["put both the alphabet soup and the tomato sauce in the basket"] * batch
    return policy.prepare_inputs(images, instr, proprio)


def time_policy(policy, graphs: bool, compare_launch: bool = False) -> dict:
    """Per batch: eager and graph ms. compare_launch (quantized variants): "eager" with bound
    launches direct (launch_common.BoundLaunch) and "eager_jit_launch" with every Triton launch
    through the JIT; the graph is captured with the process default (QVLA_DIRECT_LAUNCH)."""
    out = {}
    for batch in BATCHES:
        inputs = policy_inputs(policy, batch)
        fn = (lambda inputs=inputs: policy.predict_normalized(*inputs))
        default = BoundLaunch.direct
        try:
            if compare_launch:
                BoundLaunch.direct = False
                rec = {"eager_jit_launch": round(eager_ms(fn, EAGER_CALLS), 3)}
                BoundLaunch.direct = True
                rec["eager"] = round(eager_ms(fn, EAGER_CALLS), 3)
            else:
                rec = {"eager": round(eager_ms(fn, EAGER_CALLS), 3)}
        finally:
            BoundLaunch.direct = default
        if graphs:
            try:
                rec["graph"] = round(bk.graph_time([fn], replays=REPLAYS, warmup=3, flush=True) * 1e3, 3)
                rec["eager_over_graph"] = round(rec["eager"] / rec["graph"], 3)
            except Exception as err:  # a capture failure is a result, not a crash of the whole run
                rec["graph"], rec["graph_error"] = None, repr(err)[:400]
        else:
            rec["graph"] = None
        finite = bool(torch.isfinite(fn()).all())
        rec["finite"] = finite
        out[str(batch)] = rec
        print(f"    batch {batch}: {rec}", flush=True)
    return out


# ---- per layer ------------------------------------------------------------------------------------

def bench_layers(variants: list[Variant]) -> dict:
    ceilings = bk.measure_ceilings()
    bk.TOKENS = LAYER_TOKENS
    rows: list[dict] = []
    table: dict = {}
    for shape, (n, k) in LAYER_SHAPES.items():
        bk.bench_baselines(rows, shape, n, k, ceilings)  # bf16, int4 tinygemm g128, fp8 GEMM only
        ws = [torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.02 for _ in range(bk.copies_for(n * k))]
        fp8 = [Fp8Linear(nn.Linear(k, n, bias=False, device=DEVICE, dtype=torch.bfloat16)) for _ in ws]
        for m in LAYER_TOKENS:
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            t = bk.graph_time([(lambda f=f: f(x)) for f in fp8])
            bk.row(rows, shape, n, k, m, "fp8 cuBLAS (with activation quantization)", t, n * k, m * k * 2 + m * n * 2,
                   ceilings)
        del ws, fp8
        for v in variants:
            if v.kind != "mixed":
                continue
            counts = mix_counts(n, MIXES[v.mix])
            probe = random_kernel_weights(n, k, counts, DEVICE, seed=0)
            layers = [PreparedLinear(random_kernel_weights(n, k, counts, DEVICE, seed=s), None, v.act_bits)
                      for s in range(bk.copies_for(probe.nbytes()))]
            if v.factory is not None:
                lin = nn.Linear(k, n, bias=False, device="meta")
                lin.weight = nn.Parameter(torch.empty(n, k, device=DEVICE), requires_grad=False)
                layers = [v.factory(lin, v.mix, v.act_bits, s) for s in range(len(layers))]
            for m in LAYER_TOKENS:
                x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
                with routing(v):
                    t = bk.graph_time([(lambda f=f: f(x)) for f in layers])
                bk.row(rows, shape, n, k, m, f"ours {v.name}", t, probe.nbytes(), m * k * 2 + m * n * 2, ceilings)
            del layers, probe
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    for r in rows:
        table.setdefault(r["shape"], {}).setdefault(str(r["M"]), {})[r["method"]] = round(r["time_us"], 2)
    return table


# ---- main -----------------------------------------------------------------------------------------

def _smoke() -> None:
    """CPU, tiny shapes, no graphs: every code path of this script but the GPU kernels and capture."""
    global LAYER_SHAPES, LAYER_TOKENS, POLICY, DEVICE, REPLAYS, EAGER_CALLS
    DEVICE = bk.DEVICE = "cpu"
    POLICY = "oft-micro"
    LAYER_SHAPES = {"q/k/v/o": (64, 64), "gate/up": (160, 64), "down": (64, 160)}
    LAYER_TOKENS = (1, 16, 20)
    REPLAYS, EAGER_CALLS = 2, 2


def main(argv=None) -> int:
    global POLICY
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "serve" / "results.json")
    ap.add_argument("--smoke", action="store_true", help="tiny policy and layers on the CPU (< 1 min)")
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--policy", default=POLICY,
                    help="random-weight preset to serve (default: oft-7b, the published OpenVLA-OFT; "
                         "--smoke: oft-micro)")
    ap.add_argument("--variants", default=None,
                    help="comma-separated variant names to run (default: all)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    POLICY = args.policy
    if args.smoke:
        _smoke()
    elif not torch.cuda.is_available():
        print("serve.py: no CUDA device (use --smoke on a CPU)", file=sys.stderr)
        return 2
    from qvla_ros.policy import make_policy

    variants = list(VARIANTS)
    skipped = {}
    for name, mix, act_bits, module, function in OPTIONAL_VARIANTS:
        factory = optional_kernel_factory(module, function)
        if factory is None:
            skipped[name] = f"{module}.{function} not found"
        else:
            variants.append(Variant(name, "mixed", mix, act_bits, factory))
    if args.variants:
        wanted = [w.strip() for w in args.variants.split(",")]
        unknown = set(wanted) - {v.name for v in variants}
        if unknown:
            ap.error(f"unknown variants {sorted(unknown)}; known: {[v.name for v in variants]}")
        variants = [v for v in variants if v.name in wanted or v.kind == "bf16"]
    graphs = DEVICE == "cuda"
    card = torch.cuda.get_device_name(0) if graphs else "cpu (smoke)"
    result = {"card": card, "torch": torch.__version__, "policy": POLICY, "policy_ms": {}, "layers_us": {},
              "vram_bytes": {}, "build_s": {}, "skipped_variants": skipped,
              "notes": ("policy_ms: predict_normalized over preprocessed inputs (what a graph captures), median ms; "
                        "graph: CUDA-graph replays with L2 flushed before each; eager: single calls, L2 flushed "
                        "before each. vram_bytes: memory_allocated with the variant in place minus the bf16 "
                        "weights of the swapped layers kept aside. Quantized weights are random plans at the "
                        "named mix (speed and memory only).")}

    t0 = time.perf_counter()
    policy = make_policy(POLICY, seed=0, device=DEVICE, dtype=torch.bfloat16).eval()
    sync()
    result["build_s"]["bf16 policy"] = round(time.perf_counter() - t0, 2)
    originals = quantizable_linears(policy)
    aside = sum(lin.weight.numel() * lin.weight.element_size() + (0 if lin.bias is None else
                lin.bias.numel() * lin.bias.element_size()) for lin in originals.values())
    result["planned_layers"] = len(originals)
    result["planned_bf16_bytes"] = aside
    with torch.inference_mode():
        for v in variants:
            print(f"== {v.name}", flush=True)
            gc.collect()
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
            t0 = time.perf_counter()
            try:
                apply_variant(policy, originals, v)
            except Exception as err:
                result["skipped_variants"][v.name] = f"build failed: {err!r}"[:400]
                apply_variant(policy, originals, VARIANTS[0])
                continue
            sync()
            result["build_s"][v.name] = round(time.perf_counter() - t0, 2)
            if DEVICE == "cuda":
                result["vram_bytes"][v.name] = torch.cuda.memory_allocated() - (0 if v.kind == "bf16" else aside)
            with routing(v):
                result["policy_ms"][v.name] = time_policy(policy, graphs, compare_launch=v.kind == "mixed")
            apply_variant(policy, originals, VARIANTS[0])  # back to bf16; the variant's layers are freed
            print(json.dumps({v.name: result["policy_ms"][v.name], "vram": result["vram_bytes"].get(v.name)}), flush=True)
            _dump(args.out, result)   # a run cut short keeps what it measured
        del policy, originals
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        if not args.skip_layers:
            print("== per layer", flush=True)
            result["layers_us"] = bench_layers(variants)
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("card", "policy_ms", "vram_bytes", "build_s", "total_s")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
