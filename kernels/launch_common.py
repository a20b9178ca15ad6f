"""What every launcher shares: the output tensor, the split-K scratch, the small-M input check.

Its own module so that ops.py (the routing) and the launchers it routes to (cuda_gemv.py) both import
it, and neither imports the other's internals back (the ops.py <-> cuda_gemv.py import circle of
issue #17 item 5).
"""
from __future__ import annotations

import torch

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
