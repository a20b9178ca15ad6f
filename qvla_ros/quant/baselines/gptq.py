"""GPTQ (Frantar et al., 2022), weight-only, per output channel or per group of inputs, on the
project's RTN grid.

Each Linear is quantized one input column at a time; the rounding error of a column is spread
over the columns not yet quantized through the inverse Hessian of the layer objective
||W X - Q(W) X||^2 (H = X X^T / n from the calibration inputs). Layers are handled in forward
order, one group of Linears sharing an input per calibration pass, so each layer is calibrated on
the inputs that the already-quantized layers before it produce (as in the paper).

Storage: the per-row grid (scale, zero) comes from the row's min/max through the project's one
RTN quantizer, and each row's min and max entries are pinned to the extreme codes. The result is
therefore a weight matrix whose rows the packer's own min/max RTN reproduces exactly, so GPTQ
weights pack into MixedBitLinear with no separate storage format. Group-wise (group_size G, the
setting LLM users run as "g128") is the same with one grid per G consecutive inputs of a row:
each group's min and max entries are pinned, so GroupWiseLinear's packer reproduces the weights.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..groupwise_linear import check_group_size, padded_groups
from ..quantizer import ALL_BITS, QUANT_BITS, check_bits, quantize_rows
from .calibration import (StopForward, check_batches, collect_input_stats, forward_order, input_rows,
                          run_policy, stack_batches)


def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, bits: int | torch.Tensor, *,
                         damp: float = 0.01, block: int = 128, act_order: bool = True,
                         group_size: int | None = None) -> torch.Tensor:
    """GPTQ-quantized copy of `weight` [N, K] (dequantized, float32) for input Hessian [K, K].

    bits: one width in {2, 3, 4, 8} for every row, or a width per row [N] in {0, 2, 3, 4, 8, 16}
        (a QVLA allocation). GPTQ spreads a row's rounding error only over that row's later
        columns, so rows of different widths are independent: each gets its own grid. Pruned
        (0) rows come back as zeros and 16-bit rows unchanged; neither is rounded here.
    damp: fraction of the mean Hessian diagonal added to it (numerical stability, paper: 1%).
    act_order: quantize columns in order of decreasing Hessian diagonal (the paper's
        "desc_act"); with one grid per row the order changes no storage.
    group_size: None = one grid per row (MixedBitLinear); G = one grid per G consecutive inputs
        of a row (GroupWiseLinear, K zero-padded to a multiple of G). Without act_order each
        group's grid is set when the column loop reaches the group, from the weights as the
        error feedback of the earlier columns left them (the published GPTQ). With act_order the
        columns of a stored group are not processed together; the grids would have to follow
        the permuted order, which needs a per-column group index the stored layout does not
        have, so instead every grid is fixed up front from the unquantized weights ("static
        groups", as AutoGPTQ's static_groups) and each column uses its stored group's grid.
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"GPTQ needs weight [N, K] and Hessian [K, K], got {tuple(weight.shape)} "
                         f"and {tuple(hessian.shape)}")
    if not 0 <= damp < 1:
        raise ValueError(f"damp must be in [0, 1), got {damp}")
    n, k = weight.shape
    g = k if group_size is None else check_group_size(group_size)
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
    maxq = (2.0 ** rb.float()) - 1

    dev = w.device
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
    else:
        perm = torch.arange(k, device=dev)
    inv_perm = torch.argsort(perm)
    dynamic = g < k and not act_order
    if dynamic:
        # Each block of the column loop is one group, so a group's grid is set at its block's
        # start, when every earlier column's error has reached it (lazy updates land at block ends).
        block, grid, regroup = g, _column_grid(w, rb, maxq, g, lazy=True), lambda w1: _group_grid(w1, rb, maxq, g)
    else:
        grid, regroup = _column_grid(w, rb, maxq, g, perm=perm), None
    w = w[:, perm]
    h = h[perm][:, perm]

    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype, device=dev)
    hinv = _upper_cholesky_of_inverse(h).float()
    del h

    q_all = _gptq_columns(w, hinv, maxq, grid, block, regroup)
    out[rounded] = q_all[:, inv_perm]
    return out


def _group_grid(w: torch.Tensor, rb: torch.Tensor, maxq: torch.Tensor, g: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The grid of every g-column group of rows `w` [R, C] (columns in stored order), by the
    project's one RTN quantizer, as per-column tensors [R, C]: (scale, zero, pinned, pin_code).

    Each group's min and max entries are pinned to codes 0 and maxq (where they bound the range:
    the grid always holds 0), so the packer's min/max recomputes exactly this grid from GPTQ's
    output, whatever the error feedback did to the other entries."""
    r, c = w.shape
    groups = padded_groups(w, g)                       # [R * ng, g], a partial last group zero-padded
    gb = rb.repeat_interleave(groups.shape[0] // r)
    gmax = maxq.repeat_interleave(groups.shape[0] // r)
    scale = torch.empty(len(groups), dtype=torch.float16, device=w.device)
    zero = torch.empty_like(scale)
    for b in gb.unique().tolist():
        sel = gb == b
        _, scale[sel], zero[sel] = quantize_rows(groups[sel], b)
    zero32 = zero.float()
    start = torch.arange(0, groups.shape[0] // r * g, g, device=w.device).repeat(r)  # each group's first column
    row = torch.arange(r, device=w.device).repeat_interleave(groups.shape[0] // r)
    pinned = torch.zeros(r, c, dtype=torch.bool, device=w.device)
    pin_code = torch.zeros(r, c, device=w.device)
    # max after min: it wins. A pin never lands on padding (a real entry is a strict min or max).
    for cols, needed, code in ((groups.argmin(1), zero32 > 0, torch.zeros_like(gmax)),
                               (groups.argmax(1), zero32 < gmax, gmax)):
        col = start + cols
        sel = needed & (col < c)
        pinned[row[sel], col[sel]] = True
        pin_code[row[sel], col[sel]] = code[sel]

    def per_column(t: torch.Tensor) -> torch.Tensor:
        t = t.float().reshape(r, -1)
        # One grid per row: a broadcast view, so per-channel GPTQ holds no [R, K] grid copies.
        return t.expand(r, c) if t.shape[1] == 1 else t.repeat_interleave(g, dim=1)[:, :c]
    return per_column(scale), per_column(zero), pinned, pin_code


def _column_grid(w, rb, maxq, g, *, perm=None, lazy=False):
    """Per-column grid tensors [R, K] in processing order: fixed up front from `w` (permuted by
    `perm`), or, `lazy`, empty ones that the column loop fills group by group."""
    if lazy:
        r, k = w.shape
        return (torch.empty(r, k, device=w.device), torch.empty(r, k, device=w.device),
                torch.zeros(r, k, dtype=torch.bool, device=w.device), torch.zeros(r, k, device=w.device))
    return tuple(t if t.stride(1) == 0 else t[:, perm] for t in _group_grid(w, rb, maxq, g))


def _gptq_columns(w: torch.Tensor, hinv: torch.Tensor, maxq: torch.Tensor,
                  grid: tuple[torch.Tensor, ...], block: int, regroup=None) -> torch.Tensor:
    """GPTQ's column loop on rows `w` [R, K] (updated in place; columns already in act order):
    each column is rounded on its grid (`grid` = scale, zero, pinned, pin_code, per column
    [R, K]; pinned codes forced), and its error spread over the later columns through the upper
    Cholesky factor of H^-1 `hinv`. `regroup(w1)`, if given, sets the grid of each block from its
    current weights at the block's start. Returns the dequantized rows [R, K]. Lazy batch
    updates (the paper's blocks of `block` columns) keep the big updates as matrix products;
    inside a block each column is ~10 ops (the loop runs K times per layer and its cost is the
    per-op overhead, not the arithmetic)."""
    k = w.shape[1]
    lo = torch.zeros_like(maxq)
    q_all = torch.empty_like(w)
    scale, zero, pinned, pin_code = grid
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        if regroup is not None:
            for t, v in zip(grid, regroup(w1)):
                t[:, i1:i2] = v
        q1 = q_all[:, i1:i2]
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i, (col, h_row, s32, z32, pin, code, q, e) in enumerate(zip(
                w1.unbind(1), hinv1.unbind(0), scale[:, i1:i2].unbind(1), zero[:, i1:i2].unbind(1),
                pinned[:, i1:i2].unbind(1), pin_code[:, i1:i2].unbind(1), q1.unbind(1), err1.unbind(1))):
            # The quantizer's grid rule with this column's fixed (scale, zero), then the pins.
            codes = torch.where(pin, code, torch.clamp(torch.round(col / s32) + z32, min=lo, max=maxq))
            torch.mul(codes - z32, s32, out=q)   # dequantize_rows' (codes - zero) * scale, in float32
            torch.div(col - q, h_row[i], out=e)
            w1[:, i:].addcmul_(e.unsqueeze(1), h_row[i:].unsqueeze(0), value=-1.0)
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q_all


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
               act_order: bool = True, group_size: int | None = None, progress: bool = True
               ) -> dict[str, float]:
    """Replace each Linear's weight in `modules` by its GPTQ-quantized values (still dense).

    bits: one width for every layer, or per layer a width per output row (a QVLA allocation).
    group_size: None = one grid per row (pack with MixedBitLinear); G = one grid per G inputs
        (pack with GroupWiseLinear at the same G; see gptq_quantize_weight for act_order).
    The caller then packs them with the matching plan; the grid is the packer's own, so packing
    adds no further error. Returns each layer's relative objective error (for reporting).

    Every group is quantized on the inputs the already-quantized groups before it produce. The
    frames are stacked into ONE batch and the groups are quantized inside ONE forward of it: a
    pre-hook on each group's first Linear takes the Hessian of its input, rounds the group and
    lets the forward go on, so every later layer sees the quantized prefix. That is exactly what
    `apply_gptq_per_group` computes with a prefix forward per group. A group whose Linear runs
    several times per forward (one encoder per camera) cannot be rounded at its first call (its
    Hessian needs every call), so it alone gets a per-group pass, and the next one-pass forward
    resumes after it: mixing is exact, since neither pass touches a layer that has not yet been
    reached. Memory: the forward holds the activations of every frame at once (bounded by the
    number of frames given), plus one group's Hessian, freed after use.
    """
    _check_bits_cover(modules, bits)
    batches = check_batches(batches)
    batch = stack_batches(batches)
    if batch is None:   # frames that cannot share a forward
        return apply_gptq_per_group(policy, modules, batches, bits, damp=damp, act_order=act_order,
                                    group_size=group_size, progress=progress)
    # The order and call counts of the very batch quantized (a policy may loop over frames).
    groups, calls = forward_order(policy, modules, batch)
    opts = {"damp": damp, "act_order": act_order, "group_size": group_size}
    rel_err: dict[str, float] = {}
    with tqdm(total=len(groups), desc=_desc(bits), disable=not progress, leave=False) as bar:
        i = 0
        while i < len(groups):
            if _called_more_than_once(groups[i], calls):
                _per_group(policy, modules, [batch], groups[i:i + 1], calls, bits, opts,
                           rel_err, bar)
                i += 1
                continue
            j = i
            while j < len(groups) and not _called_more_than_once(groups[j], calls):
                j += 1
            _one_pass(policy, modules, batch, groups[i:j], bits, opts, rel_err, bar)
            i = j
    return rel_err


@torch.no_grad()
def apply_gptq_per_group(policy: nn.Module, modules: Mapping[str, nn.Linear], batches: Sequence[Mapping],
                         bits: int | Mapping[str, torch.Tensor], *, damp: float = 0.01,
                         act_order: bool = True, group_size: int | None = None,
                         progress: bool = True) -> dict[str, float]:
    """`apply_gptq` with one prefix forward over all `batches` per group (a forward stopped at the
    group's last call): the reference the one-pass method is checked against, and the path for
    batches that cannot be stacked. Slow at scale: a 7B policy's 332 groups take 332 forwards."""
    _check_bits_cover(modules, bits)
    batches = check_batches(batches)
    groups, calls = forward_order(policy, modules, batches[0])
    opts = {"damp": damp, "act_order": act_order, "group_size": group_size}
    rel_err: dict[str, float] = {}
    with tqdm(total=len(groups), desc=_desc(bits), disable=not progress, leave=False) as bar:
        _per_group(policy, modules, batches, groups, calls, bits, opts, rel_err, bar)
    return rel_err


def _check_bits_cover(modules: Mapping[str, nn.Linear], bits) -> None:
    if isinstance(bits, Mapping):
        missing = [n for n in modules if n not in bits]
        if missing:
            raise ValueError(f"GPTQ: no per-row bits for {len(missing)} layers, e.g. {missing[0]!r}")


def _desc(bits) -> str:
    return "GPTQ mixed rows" if isinstance(bits, Mapping) else f"GPTQ W{bits}"


def _called_more_than_once(group: Sequence[str], calls: Mapping[str, int]) -> bool:
    return any(calls[name] > 1 for name in group)


def _per_group(policy, modules, batches, groups, calls, bits, opts, rel_err, bar) -> None:
    """Each group in turn: its Hessian from a prefix forward over `batches`, then rounded."""
    for group in groups:
        stats = collect_input_stats(policy, {group[0]: modules[group[0]]}, batches, hessian=True,
                                    stop_after_calls=calls[group[0]])
        h = stats.pop(group[0]).h
        del stats
        _quantize_group(modules, group, h, bits, opts, rel_err)
        del h
        bar.update(1)


def _one_pass(policy, modules, batch, groups, bits, opts, rel_err, bar) -> None:
    """Rounds `groups` (each run once per forward, in forward order) inside ONE forward of `batch`,
    each in a pre-hook on its first Linear, before that Linear runs; the forward is stopped after
    the last group (what follows is not needed)."""
    done = [0]

    def hook_for(index: int, group: Sequence[str]):
        def hook(module, args):
            if index != done[0]:
                raise RuntimeError(f"GPTQ: {group[0]!r} ran before {groups[done[0]][0]!r} in the "
                                   "quantizing forward, unlike in the forward that ordered the layers")
            x = input_rows(args[0])
            # As collect_input_stats: float32 products, float64 Hessian, over the input rows.
            h = (x.T @ x).double() / max(x.shape[0], 1)
            del x
            _quantize_group(modules, group, h, bits, opts, rel_err)
            del h
            done[0] += 1
            bar.update(1)
            if done[0] == len(groups):
                raise StopForward
        return hook

    handles = [modules[g[0]].register_forward_pre_hook(hook_for(i, g)) for i, g in enumerate(groups)]
    try:
        run_policy(policy, batch)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if done[0] != len(groups):
        raise RuntimeError(f"GPTQ: {groups[done[0]][0]!r} never ran in the quantizing forward")


def _quantize_group(modules, group, h, bits, opts, rel_err) -> None:
    """GPTQ of the Linears of one group (one input, so one Hessian) in place, recording each
    one's relative layer error (`opts`: gptq_quantize_weight's keywords). Their rows are rounded
    together as one matrix: GPTQ keeps rows independent, so this is each layer's own GPTQ, with
    one column loop (the cost at scale) instead of one per layer."""
    lins = [modules[name] for name in group]
    weights = torch.cat([lin.weight for lin in lins]) if len(lins) > 1 else lins[0].weight
    if isinstance(bits, Mapping):
        row_bits = torch.cat([_row_bits(bits[name], lin.out_features) for name, lin in zip(group, lins)])
    else:
        row_bits = bits
    q_all = gptq_quantize_weight(weights, h, row_bits, **opts)
    del weights
    for name, lin, q in zip(group, lins, q_all.split([lin.out_features for lin in lins])):
        base = layer_objective(lin.weight, torch.zeros_like(lin.weight), h)
        rel_err[name] = layer_objective(lin.weight, q, h) / max(base, 1e-30)
        lin.weight.copy_(q.to(lin.weight.dtype))


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
