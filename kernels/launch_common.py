"""What every launcher shares: the output tensor, the split-K scratch, the small-M input check.

Its own module so that ops.py (the routing) and the launchers it routes to (cuda_gemv.py) both import
it, and neither imports the other's internals back (the ops.py <-> cuda_gemv.py import circle of
issue #17 item 5).
"""
from __future__ import annotations

import inspect
import os
import warnings
import weakref

import torch

try:
    from torch._C import _cuda_getCurrentRawStream as _raw_stream
    from triton import knobs
except ImportError:  # pragma: no cover - the package imports without Triton or CUDA torch
    _raw_stream = knobs = None

from .layout import KernelWeights


def output_tensor(out: torch.Tensor | None, m: int, n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The [m, n] output a launch writes: `out` if given (it must be contiguous, of that shape and
    dtype: the kernels write rows m * n apart and cast to its type), else a new tensor."""
    if out is None:
        return torch.empty(m, n, dtype=dtype, device=device)
    if out.shape != (m, n) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape ({m}, {n})")
    return out


# Split-K scratch per device: float32 parts of the output tiles and one arrival counter per tile.
# The counters are zeroed once and every launch leaves them at zero again; launches that share them
# must run one after the other (one stream), which is how a model's layers run. A launch bound once
# (ops.PreparedLinear) keeps the buffers it was bound with; when a later launch grows the scratch the
# old buffers stay alive for it, still zero between launches, so both remain correct.
SPLIT_SCRATCH: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def split_scratch(device: torch.device, parts: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    ws, counts = SPLIT_SCRATCH.get(device, (None, None))
    if ws is None or ws.numel() < parts or counts.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # Inside a capture torch.zeros is recorded, not run: the new arrival counters would
            # hold garbage for every launch outside the graph, and tiles whose counter never
            # reaches SPLIT_K - 1 would never be written.
            raise RuntimeError("the split-K scratch has to grow, which cannot happen during CUDA graph "
                               "capture; run the layer once at this token count before capturing")
        ws = torch.empty(max(parts, 1 << 20), dtype=torch.float32, device=device)
        counts = torch.zeros(max(tiles, 1 << 14), dtype=torch.int32, device=device)
        SPLIT_SCRATCH[device] = (ws, counts)
    return ws, counts


def check_small_m_input(x: torch.Tensor, kw: KernelWeights, max_tokens: int, kernel: str) -> tuple[int, int]:
    """(M, K) of a small-M kernel's input x, refused unless it is a 2-D bfloat16/float16 [M, K] for
    this layer with at most max_tokens tokens (`kernel` names the launcher in the message)."""
    if x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"x must be a 2-D bfloat16/float16 tensor, got {x.dtype} of shape {tuple(x.shape)}")
    m, k = x.shape
    if k != kw.in_features:
        raise ValueError(f"input has {k} features, the layer expects {kw.in_features}")
    if m > max_tokens:
        raise ValueError(f"{kernel} runs at most {max_tokens} tokens, got {m}; use launch_mixed_gemm")
    return m, k


class BoundLaunch:
    """`kernel[grid](*args, **constexprs)` with the grid and the constexprs fixed once, for a launch
    repeated with the same shapes (a layer's bound route, ops.PreparedLinear).

    The first call goes through Triton's JIT (argument binding, specialization, cache lookup or
    compile) and keeps the compiled kernel; later calls hand the arguments straight to that kernel's
    launcher. Triton's per-call binding is most of a launch's host time, and an eager 7B forward
    makes about a thousand launches (issue #17 item 2: the per-call overhead).

    Sound because the compiled kernel depends only on what Triton specializes on: the constexprs
    (fixed here), each int argument's value class (1, divisible by 16) and each pointer's 16-byte
    alignment and dtype. A call launches directly only when every tensor argument is the very
    object of the first call (the layer's weights; held by weak reference, so nothing is kept
    alive) or has that call's dtype and alignment (activations, outputs), and every other argument
    equals the first call's; otherwise it goes through the JIT (which finds or compiles the right
    kernel). Launch hooks (a profiler's) and Triton's interpreter also take the JIT path.
    """

    __slots__ = ("kernel", "grid", "constexprs", "_compiled", "_first", "_tail")

    #: Whether bound launches go direct: on unless QVLA_DIRECT_LAUNCH=0. Its test (test_kernels_gpu.py,
    #: direct launch bit for bit against the JIT launch) passed on an H100 on 2026-12-07, and
    #: bench/serve/serve.py measured the eager forward both ways (bench/serve/README.md).
    direct = os.environ.get("QVLA_DIRECT_LAUNCH", "1") != "0"

    def __init__(self, kernel, grid: tuple[int, ...], **constexprs):
        self.kernel, self.constexprs = kernel, constexprs
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self._compiled = None
        self._first: tuple = ()
        self._tail: tuple = ()

    def _jit(self, args):
        compiled = self.kernel[self.grid](*args, **self.constexprs)
        if (not BoundLaunch.direct or self._compiled is not None or compiled is None
                or not hasattr(compiled, "packed_metadata")):
            return  # direct launches off, already bound, or the interpreter: nothing to keep
        tail = []
        for p in self.kernel.params[len(args):]:
            if p.name in self.constexprs:
                tail.append(self.constexprs[p.name])
            elif p.default is not inspect.Parameter.empty:
                tail.append(p.default)
            else:
                return  # an argument this class does not know how to pass: keep the JIT path
        self._first = tuple((weakref.ref(a), a.dtype, a.data_ptr() % 16) if isinstance(a, torch.Tensor) else a
                            for a in args)
        self._compiled, self._tail = compiled, tuple(tail)

    def __call__(self, *args):
        compiled = self._compiled
        if (not compiled or not BoundLaunch.direct or knobs.runtime.launch_enter_hook is not None
                or len(args) != len(self._first)):
            return self._jit(args)
        for a, first in zip(args, self._first):
            if isinstance(a, torch.Tensor):
                if type(first) is not tuple:
                    return self._jit(args)
                ref, dtype, align = first
                if a is not ref() and (a.dtype != dtype or (a.data_ptr() % 16 == 0) != (align == 0)):
                    return self._jit(args)
            elif a != first:
                return self._jit(args)
        g = self.grid
        try:
            compiled.run(g[0], g[1], g[2], _raw_stream(torch.cuda.current_device()), compiled.function,
                         compiled.packed_metadata, None, None, None, *args, *self._tail)
        except (TypeError, ValueError, OverflowError) as err:
            # Triton's launcher refused the argument list (a Triton whose launch signature differs
            # from 3.6's): launch through the JIT from now on, and say so once.
            warnings.warn(f"direct launch of {self.kernel.__name__} failed ({err}); using Triton's JIT launch")
            self._compiled = False
            self._jit(args)
