"""Per-call Python overhead of one quantized layer (MixedBitLinear.forward down to the kernel launch),
measured on the CPU: the Triton kernels, cuBLAS and the CPU reference are replaced by stubs, so what
is timed is only the Python path that the eager forward pays per layer on the GPU (checks, switch
lookups, table building, allocations, the custom op's dispatch).

    python bench/serve/overhead.py [--calls 2000] [--json out.json]

"GPU path": the input is a CPU tensor whose `is_cuda` answers True (a subclass with torch functions
disabled, so every op on it is a plain CPU op), which sends the layer down the branch it takes on a
GPU; the Triton launches are no-ops. "CPU path": a plain CPU input to a kernel-resident layer, with
the reference arithmetic stubbed. Python calls per forward are counted with sys.setprofile.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


class FakeCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA; ops on it return plain tensors (no subclass overhead)."""
    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def is_cuda(self):  # noqa: D401
        return True


class _NoLaunch:
    """Stands in for a Triton kernel: kernel[grid](...) does nothing."""
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _stubs(stack: ExitStack) -> None:
    from qvla_ros.kernels import ops, triton_dequant, triton_gemm, triton_gemv
    for mod, name in ((triton_gemv, "gemv_kernel"), (triton_dequant, "dequant_kernel"),
                      (triton_gemm, "mixed_gemm_kernel"), (triton_gemm, "act_quant_kernel")):
        stack.enter_context(mock.patch.object(mod, name, _NoLaunch()))
    # cuBLAS after the decode, and the CPU reference: outputs of the right shape, no arithmetic
    stack.enter_context(mock.patch.object(torch.nn.functional, "linear",
                                          lambda x, w, b=None: x.new_empty(*x.shape[:-1], w.shape[0])))
    stack.enter_context(mock.patch.object(
        ops, "mixed_bit_linear_reference",
        lambda x, kw, bias=None, act_bits=16: x.new_empty(*x.shape[:-1], kw.out_features)))
    m_ = lambda x: (x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32),
                    x.new_empty(x.shape[0], dtype=torch.int32))
    stack.enter_context(mock.patch.object(ops, "quantize_activations_reference", m_))


def layer(n: int, k: int, act_bits: int):
    from qvla_ros.kernels.testing import MIXES, bits_per_row, mix_counts
    from qvla_ros.quant.mixed_linear import MixedBitLinear
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n)
    bits = bits_per_row(n, mix_counts(n, MIXES["avg4"]))
    return MixedBitLinear.from_linear(lin, bits, act_bits=act_bits).to_kernel_layout("cpu")


def per_call(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def python_calls(fn) -> int:
    count = 0

    def prof(frame, event, arg):
        nonlocal count
        if event in ("call", "c_call"):
            count += 1
    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = []
    with ExitStack() as stack, torch.no_grad():
        _stubs(stack)
        for act_bits in (16, 8):
            mod = layer(256, 512, act_bits)
            for m in (1, 16, 590):
                x = torch.randn(m, 512, dtype=torch.bfloat16)
                for path, inp in (("gpu", x.as_subclass(FakeCuda)), ("cpu", x)):
                    fn = (lambda mod=mod, inp=inp: mod(inp))
                    rows.append(dict(path=path, act_bits=act_bits, tokens=m, us=round(per_call(fn, args.calls), 2),
                                     python_calls=python_calls(fn)))
                    print(f"{path} A{act_bits} {m:4d} tokens: {rows[-1]['us']:7.2f} us/call, "
                          f"{rows[-1]['python_calls']} Python calls")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
