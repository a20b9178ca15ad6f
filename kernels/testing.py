"""Random mixed-bit layers in the kernel layout, for the kernels' tests and benchmarks.

`random_kernel_weights(...)` draws codes straight into the kernel layout on the device, for timing
layers as large as Llama-2-7B's without a CPU round trip; MIXES and mix_counts say how many rows
get each width. Layers quantized by the project's packer, and the float64 oracle the kernels are
checked against, are one layer up (qvla_ros/quant/kernel_oracle.py): this package never imports
quant/.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .layout import SLOT_BITS, WORDS_PER_BLOCK, KernelWeights, META_FIELDS, SlotMeta, num_k_blocks

#: realistic mixes of widths (fractions of a layer's rows, 0 = pruned) at three budgets;
#: average bits over all rows (16-bit rows included, pruned rows as 0): about 7.95, 3.9 and 2.95
MIXES: dict[str, dict[int, float]] = {
    "avg8": {16: 0.03, 8: 0.92, 4: 0.03, 0: 0.02},
    "avg4": {16: 0.01, 8: 0.08, 4: 0.55, 3: 0.25, 2: 0.08, 0: 0.03},
    "avg3": {16: 0.005, 8: 0.03, 4: 0.20, 3: 0.40, 2: 0.325, 0: 0.04},
}


def mix_counts(out_features: int, fractions: Mapping[int, float], row_tile: int = 16) -> dict[int, int]:
    """Rows per width for `fractions` of out_features, each a multiple of row_tile; the remainder
    goes to the most common width."""
    counts = {b: int(out_features * f) // row_tile * row_tile for b, f in fractions.items()}
    widest = max(fractions, key=fractions.get)
    counts[widest] += out_features - sum(counts.values())
    return {b: n for b, n in counts.items() if n > 0}


def average_bits(counts: Mapping[int, int]) -> float:
    rows = sum(counts.values())
    return sum(b * n for b, n in counts.items()) / rows


def bits_per_row(out_features: int, counts: Mapping[int, int], generator: torch.Generator | None = None) -> torch.Tensor:
    """A random assignment of widths to channels with these counts."""
    bits = torch.cat([torch.full((n,), b, dtype=torch.int64) for b, n in counts.items()])
    if bits.numel() != out_features:
        raise ValueError(f"counts {dict(counts)} hold {bits.numel()} rows, layer has {out_features}")
    return bits[torch.randperm(out_features, generator=generator)]


def random_kernel_weights(out_features: int, in_features: int, counts: Mapping[int, int], device,
                          seed: int = 0) -> KernelWeights:
    """A layer in the kernel layout with random codes, drawn on `device` (for timing).

    Rows of width b get uniform random b-bit codes, integer zero-points at mid-range and small
    scales, so outputs stay finite; channels are assigned to groups at random.
    """
    n, k = int(out_features), int(in_features)
    gen = torch.Generator(device=device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=cpu_gen)
    meta = torch.zeros(len(SLOT_BITS), META_FIELDS, dtype=torch.int32)
    chunks, scales, zeros, index = [], [], [], []
    w16 = torch.zeros(1, 1, dtype=torch.bfloat16, device=device)
    used = start = 0
    for slot, bits in enumerate(SLOT_BITS[:5]):
        rows = int(counts.get(bits, 0))
        if rows == 0:
            continue
        index.append(perm[start:start + rows])
        if bits == 16:
            w16 = (torch.randn(rows, k, generator=gen, device=device) * 0.02).to(torch.bfloat16)
            scales.append(torch.ones(rows, device=device))
            zeros.append(torch.zeros(rows, device=device))
            meta[slot] = SlotMeta(rows, start).as_row()
        else:
            nkb = num_k_blocks(bits, k)
            words = rows * nkb * WORDS_PER_BLOCK
            if bits == 3:
                words += words // 2  # the int16 high plane
            chunk = torch.randint(-2 ** 31, 2 ** 31 - 1, (words,), generator=gen, device=device, dtype=torch.int64)
            chunks.append(chunk.to(torch.int32))
            high = 2 * (used + rows * nkb * WORDS_PER_BLOCK) if bits == 3 else 0
            meta[slot] = SlotMeta(rows, start, used, high, nkb).as_row()
            used += words
            scales.append(torch.full((rows,), 0.02 / 2 ** bits, device=device))
            zeros.append(torch.full((rows,), float(2 ** (bits - 1)), device=device))
        start += rows
    kept = torch.cat(index) if index else torch.zeros(0, dtype=torch.int64)
    pruned = perm[start:]
    if counts.get(0, 0) != pruned.numel():
        raise ValueError(f"counts {dict(counts)} do not add up to out_features={n}")
    meta[SLOT_BITS.index(0)] = SlotMeta(pruned.numel(), start).as_row()
    return KernelWeights(
        n, k, torch.cat(chunks) if chunks else torch.zeros(1, dtype=torch.int32, device=device), w16,
        torch.cat(scales).float() if scales else torch.ones(1, device=device),
        torch.cat(zeros).float() if zeros else torch.zeros(1, device=device),
        torch.cat([kept, pruned]).to(torch.int32).to(device), meta.to(device),
        tuple(SlotMeta.from_row(row).rows for row in meta), True)


def replayed_in_a_cuda_graph(call):
    """call()'s output from a CUDA graph: one warm-up call outside the capture, the capture, a replay
    (the GPU tests' check that a launch path records into a graph and replays to the same result)."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # warm-up outside the capture
        with torch.cuda.graph(graph):
            captured = call()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    return captured
