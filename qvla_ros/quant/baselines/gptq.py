"""GPTQ (Frantar et al., 2022), weight-only, per output channel, on the project's RTN grid.

Each Linear is quantized one input column at a time; the rounding error of a column is spread
over the columns not yet quantized through the inverse Hessian of the layer objective
||W X - Q(W) X||^2 (H = X X^T / n from the calibration inputs). Layers are handled in forward
order, one group of Linears sharing an input per calibration pass, so each layer is calibrated on
the inputs that the already-quantized layers before it produce (as in the paper).

Storage: the per-row grid (scale, zero) comes from the row's min/max through the project's one
RTN quantizer, and each row's min and max entries are pinned to the extreme codes. The result is
therefore a weight matrix whose rows the packer's own min/max RTN reproduces exactly, so GPTQ
weights pack into MixedBitLinear with no separate storage format.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..quantizer import ALL_BITS, QUANT_BITS, check_bits, dequantize_rows, quantize_rows
from .calibration import check_batches, collect_input_stats, forward_order


def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, bits: int | torch.Tensor, *,
                         damp: float = 0.01, block: int = 128, act_order: bool = True
                         ) -> torch.Tensor:
    """GPTQ-quantized copy of `weight` [N, K] (dequantized, float32) for input Hessian [K, K].

    bits: one width in {2, 3, 4, 8} for every row, or a width per row [N] in {0, 2, 3, 4, 8, 16}
        (a QVLA allocation). GPTQ spreads a row's rounding error only over that row's later
        columns, so rows of different widths are independent: each gets its own grid. Pruned
        (0) rows come back as zeros and 16-bit rows unchanged; neither is rounded here.
    damp: fraction of the mean Hessian diagonal added to it (numerical stability, paper: 1%).
    act_order: quantize columns in order of decreasing Hessian diagonal (the paper's
        "desc_act"); with one grid per row the order changes no storage.
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"GPTQ needs weight [N, K] and Hessian [K, K], got {tuple(weight.shape)} "
                         f"and {tuple(hessian.shape)}")
    if not 0 <= damp < 1:
        raise ValueError(f"damp must be in [0, 1), got {damp}")
    n, k = weight.shape
    row_bits = _row_bits(bits, n).to(weight.device)
    out = weight.detach().float().clone()
    out[row_bits == 0] = 0.0
    rounded = (row_bits != 0) & (row_bits != 16)
    if not rounded.any():
        return out
    w = out[rounded]
    rb = row_bits[rounded]
    h = hessian.detach().to(weight.device, torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    # One grid per row, from the row's own width, by the project's one RTN quantizer.
    dev = w.device
    scale = torch.empty(len(w), dtype=torch.float16, device=dev)
    zero = torch.empty(len(w), dtype=torch.float16, device=dev)
    for b in rb.unique().tolist():
        sel = rb == b
        _, scale[sel], zero[sel] = quantize_rows(w[sel], b)
    s32, z32 = scale.float(), zero.float()
    maxq = (2.0 ** rb.float()) - 1
    # Each row's min and max entries are pinned to codes 0 and maxq (where they bound the range:
    # the grid always holds 0), so the packer's min/max recomputes exactly this grid.
    rows = len(w)
    pin_lo = torch.where(zero.float() > 0, w.argmin(dim=1), torch.full((rows,), -1, device=dev))
    pin_hi = torch.where(zero.float() < maxq, w.argmax(dim=1), torch.full((rows,), -1, device=dev))

    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
    else:
        perm = torch.arange(k, device=dev)
    inv_perm = torch.argsort(perm)
    w = w[:, perm]
    h = h[perm][:, perm]
    pos_lo = torch.where(pin_lo >= 0, inv_perm[pin_lo.clamp(min=0)], pin_lo)
    pos_hi = torch.where(pin_hi >= 0, inv_perm[pin_hi.clamp(min=0)], pin_hi)

    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype, device=dev)
    hinv = _upper_cholesky_of_inverse(h).float()

    q_all = torch.zeros_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            d = hinv1[i, i]
            # The quantizer's grid rule with this row's fixed (scale, zero).
            codes = torch.minimum(torch.clamp(torch.round(col / s32) + z32, min=0), maxq)
            codes = torch.where(pos_lo == i1 + i, torch.zeros_like(codes), codes)
            codes = torch.where(pos_hi == i1 + i, maxq, codes)
            q = dequantize_rows(codes.unsqueeze(1), scale, zero).squeeze(1)
            q_all[:, i1 + i] = q
            e = (col - q) / d
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    out[rounded] = q_all[:, inv_perm]
    return out


def _row_bits(bits: int | torch.Tensor, rows: int) -> torch.Tensor:
    """Per-row widths [rows] (int64) from one width or a per-row vector, checked."""
    if isinstance(bits, torch.Tensor):
        if bits.shape != (rows,):
            raise ValueError(f"per-row bits must have shape ({rows},), got {tuple(bits.shape)}")
        row_bits = bits.detach().to(torch.int64).cpu()
        bad = set(row_bits.unique().tolist()) - set(ALL_BITS)
        if bad:
            raise ValueError(f"unknown bit-widths {sorted(bad)} in per-row bits; allowed: {list(ALL_BITS)}")
        return row_bits
    return torch.full((rows,), check_bits(bits, QUANT_BITS), dtype=torch.int64)


def _upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, adding damping until H is numerically positive definite."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    extra = 0.0
    base = float(torch.mean(torch.diag(h)))
    for _ in range(8):
        try:
            lower = torch.linalg.cholesky(h + extra * eye)
            hinv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(hinv, upper=True)
        except torch.linalg.LinAlgError:
            extra = base * 0.01 if extra == 0 else extra * 10
    raise ValueError("GPTQ: the calibration Hessian is not positive definite even with damping; "
                     "use more calibration frames")


def layer_objective(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the layer output error GPTQ minimises, for H = X X^T / n."""
    d = (weight.float() - quantized.float()).double()
    return float(torch.einsum("nk,kl,nl->", d, hessian.double(), d))


@torch.no_grad()
def apply_gptq(policy: nn.Module, modules: Mapping[str, nn.Linear], batches: Sequence[Mapping],
               bits: int | Mapping[str, torch.Tensor], *, damp: float = 0.01,
               act_order: bool = True, progress: bool = True) -> dict[str, float]:
    """Replace each Linear's weight in `modules` by its GPTQ-quantized values (still dense).

    bits: one width for every layer, or per layer a width per output row (a QVLA allocation).
    The caller then packs them with the matching plan; the grid is the packer's own, so packing
    adds no further error. Returns each layer's relative objective error (for reporting).
    """
    if isinstance(bits, Mapping):
        missing = [n for n in modules if n not in bits]
        if missing:
            raise ValueError(f"GPTQ: no per-row bits for {len(missing)} layers, e.g. {missing[0]!r}")
    batches = check_batches(batches)
    groups, calls = forward_order(policy, modules, batches[0])
    rel_err: dict[str, float] = {}
    desc = "GPTQ mixed rows" if isinstance(bits, Mapping) else f"GPTQ W{bits}"
    for group in tqdm(groups, desc=desc, disable=not progress, leave=False):
        stats = collect_input_stats(policy, {group[0]: modules[group[0]]}, batches, hessian=True,
                                    stop_after_calls=calls[group[0]])
        h = stats[group[0]].h
        for name in group:
            lin = modules[name]
            row_bits = bits[name] if isinstance(bits, Mapping) else bits
            q = gptq_quantize_weight(lin.weight, h, row_bits, damp=damp, act_order=act_order)
            base = layer_objective(lin.weight, torch.zeros_like(lin.weight), h)
            rel_err[name] = layer_objective(lin.weight, q, h) / max(base, 1e-30)
            lin.weight.copy_(q.to(lin.weight.dtype))
    return rel_err



@torch.no_grad()
def gptq_weight_deltas(policy: nn.Module, modules: Mapping[str, nn.Linear], batches: Sequence[Mapping],
                       bits: Sequence[int], *, damp: float = 0.01, act_order: bool = True,
                       progress: bool = True) -> dict[str, torch.Tensor]:
    """Per layer, dW [len(bits), N, K]: what GPTQ at each width does to the float weights.

    The input for QVLA's sensitivity when rows are to be GPTQ-rounded: since GPTQ keeps rows
    independent, row n of the width-b result is exactly what row n becomes when QVLA gives it b
    bits. The Hessians come from the float policy's inputs (one pass for all layers), which is
    what sensitivity measures against; the final quantization (apply_gptq) re-collects them
    layer by layer on the already-quantized prefix. 0 bits -> -W, 16 bits -> 0.
    """
    from ..sensitivity import weight_deltas

    batches = check_batches(batches)
    stats = collect_input_stats(policy, modules, batches, hessian=True)
    out: dict[str, torch.Tensor] = {}
    for name, lin in tqdm(modules.items(), desc="GPTQ weight deltas", disable=not progress, leave=False):
        h = stats[name].h
        out[name] = weight_deltas(lin.weight, bits, lambda w, b, h=h: gptq_quantize_weight(
            w, h, b, damp=damp, act_order=act_order))
    return out
