"""AWQ (Lin et al., 2023) as published (mit-han-lab/llm-awq), weight-only, per channel or group-wise.

Per transformer block, on the float policy's inputs to that block (the calibration frames):

1. scale search, once per group of Linears that read one input (`BLOCK_RULES`): for
   s_j = mean|x_j|^alpha over the calibration tokens (clamped at 1e-4, normalised so
   sqrt(max(s) * min(s)) = 1), alpha = 0, 1/grid, ..., (grid-1)/grid as in llm-awq, the group's
   weights become Q(W s) / s and the candidate is scored by the squared error of the output of
   the module that holds the group (llm-awq's `module2inspect`: the attention for q/k/v, the MLP
   for gate/up, the Linear itself for o_proj and down_proj), not by each layer's own output.
   Every search of a block starts from the float block; the block's scales are applied after.
2. fold: W[:, j] *= s_j and output channel j of the preceding op /= s_j (a norm's weight and
   bias, or the preceding Linear's rows: v_proj for o_proj, up_proj for down_proj), so the float
   forward is unchanged and nothing runs at inference time. A Linear with no foldable preceding
   op (fc2 behind a GELU, a layout no rule knows, a v_proj narrower than o_proj under grouped
   attention) gets no scale; llm-awq would add a run-time scale after a GELU, which this leaves out.
3. clip search, per Linear except q/k (their error is amplified by the attention scores): per
   group (per row when per channel), the weights clamped to [-m, m] with m = max|w| * (1 - i/grid),
   i < grid/2, scored by that group's share of the layer output on up to 512 sampled input rows
   (after the fold). As in llm-awq the clip thresholds are searched on float inputs and applied
   after every block has been searched, so each block's search sees the float policy's inputs.

The weights stay float; the caller packs them with the project's RTN quantizer (MixedBitLinear)
or GroupWiseLinear at the same group size. The clipped range is then the row's (group's)
min/max, so packing reproduces exactly what the searches scored.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..groupwise_linear import check_group_size, fake_quantize_group_wise, padded_groups
from ..quantizer import check_bits, fake_quantize_rows
from .calibration import StopForward, check_batches, collect_input_stats, forward_order, run_batches
from .smoothing import fold_into_output

NO_CLIP_SUFFIXES = ("q_proj", "k_proj")


@dataclass(frozen=True)
class ScaleRule:
    """Linears of a block that read one input, the op whose output that input is (`prev`), and
    the module whose output scores a scale candidate; names relative to the block."""

    prev: str
    linears: tuple[str, ...]
    inspect: str


#: per block layout, the groups llm-awq scales (its auto_scale_block for Llama and OPT-like blocks)
BLOCK_RULES = (
    (ScaleRule("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
     ScaleRule("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
     ScaleRule("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
     ScaleRule("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj")),
    # SigLIP (the shipped policy's vision tower, OFT's second tower)
    (ScaleRule("layer_norm1", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
     ScaleRule("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
     ScaleRule("layer_norm2", ("mlp.fc1",), "mlp")),
    # timm ViT (OFT's DINOv2 tower: fused qkv; its proj would fold into qkv's last rows, not done)
    (ScaleRule("norm1", ("attn.qkv",), "attn"),
     ScaleRule("norm2", ("mlp.fc1",), "mlp")),
)


@dataclass
class ScaleGroup:
    """One rule applied in one block: dotted names of the preceding op, the Linears, the module."""

    prev: str
    linears: list[str]
    inspect: str


def _get(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def scale_blocks(root: nn.Module, names: Sequence[str]) -> dict[str, list[ScaleGroup]]:
    """{block prefix: its scale groups} for the quantized Linears `names`, in module order. A rule
    applies where all its Linears are quantized, its preceding op has one output channel per
    input of theirs, and the module to inspect exists."""
    quantized = set(names)
    blocks: dict[str, list[ScaleGroup]] = {}
    for name in names:
        for rules in BLOCK_RULES:
            anchor = "." + rules[0].linears[0]
            if not name.endswith(anchor):
                continue
            block = name[: -len(anchor)]
            groups = []
            for rule in rules:
                linears = [f"{block}.{n}" for n in rule.linears]
                prev = _get(root, f"{block}.{rule.prev}")
                if (not all(n in quantized for n in linears) or _get(root, f"{block}.{rule.inspect}") is None
                        or not isinstance(getattr(prev, "weight", None), torch.Tensor)):
                    continue
                if any(prev.weight.shape[0] != root.get_submodule(n).in_features for n in linears):
                    continue
                groups.append(ScaleGroup(f"{block}.{rule.prev}", linears, f"{block}.{rule.inspect}"))
            if groups:   # else another layout may share this anchor name (SigLIP's q_proj)
                blocks[block] = groups
                break
    return blocks


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """What the packed layer will hold for `weight`: per-row (MixedBitLinear) or group-wise."""
    if group_size is None:
        return fake_quantize_rows(weight, bits)
    return fake_quantize_group_wise(weight, bits, group_size)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture_calls(policy: nn.Module, modules: Mapping[str, nn.Module], batches: Sequence[Mapping],
                  calls_per_forward: Mapping[str, int]) -> dict[str, list[tuple[tuple, dict]]]:
    """The (args, kwargs) of every call of each named module over the batches; each forward is
    stopped once every module has had its calls of that forward (the rest is not needed)."""
    captured: dict[str, list] = {n: [] for n in modules}
    seen: dict[str, int] = {}

    def hook_for(name):
        def hook(module, args, kwargs):
            captured[name].append((tuple(args), dict(kwargs)))
            seen[name] += 1
            if all(seen[n] >= calls_per_forward[n] for n in modules):
                raise StopForward
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n), with_kwargs=True) for n, m in modules.items()]
    try:
        run_batches(policy, batches, lambda: seen.update({n: 0 for n in modules}))
    finally:
        for h in handles:
            h.remove()
    return captured


@torch.no_grad()
def _output_error(module: nn.Module, calls, reference) -> float:
    """Mean squared difference of `module`'s outputs on `calls` from `reference`."""
    total, count = 0.0, 0
    for (args, kwargs), ref in zip(calls, reference):
        out = _first(module(*args, **kwargs))
        total += float((out.float() - ref.float()).pow(2).sum())
        count += ref.numel()
    return total / max(count, 1)


@torch.no_grad()
def search_scale(module: nn.Module, calls, linears: Sequence[nn.Linear], absmean: torch.Tensor, bits: int,
                 group_size: int | None = None, grid: int = 20) -> tuple[torch.Tensor, float, list[float]]:
    """llm-awq's _search_module_scale: the s [K] whose Q(W s)/s for every Linear of `linears`
    gives the smallest output error of `module` on its captured `calls`. The Linears' weights are
    left as they were. Returns (s, alpha, error per alpha)."""
    reference = [_first(module(*a, **k)) for a, k in calls]
    originals = [lin.weight.detach().clone() for lin in linears]
    best, best_alpha, best_err, errors = torch.ones_like(absmean), 0.0, float("inf"), []
    try:
        for i in range(grid):
            alpha = i / grid
            s = absmean.float().pow(alpha).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for lin, w in zip(linears, originals):
                lin.weight.copy_((fake_quantize(w.float() * s, bits, group_size) / s).to(w.dtype))
            err = _output_error(module, calls, reference)
            errors.append(err)
            if err < best_err:
                best, best_alpha, best_err = s, alpha, err
    finally:
        for lin, w in zip(linears, originals):
            lin.weight.copy_(w)
    return best, best_alpha, errors


@torch.no_grad()
def search_clip(x: torch.Tensor, weight: torch.Tensor, bits: int, group_size: int | None = None,
                grid: int = 20, max_shrink: float = 0.5, row_chunk: int = 64) -> torch.Tensor:
    """llm-awq's auto_clip_layer: per group of `weight` [N, K] (per row when group_size is None)
    the clip value m [N, groups] minimising the group's output error on inputs `x` [T, K]."""
    n, k = weight.shape
    g = k if group_size is None else check_group_size(group_size)
    w = padded_groups(weight, g).reshape(n, -1, g)                   # [N, ng, g]
    xg = padded_groups(x, g).reshape(x.shape[0], -1, g)              # [T, ng, g]
    best_max = torch.empty(n, w.shape[1], 1)
    for r1 in range(0, n, row_chunk):
        wc = w[r1:r1 + row_chunk]
        reference = torch.einsum("tgk,ngk->ntg", xg, wc)
        absmax = wc.abs().amax(-1, keepdim=True)
        best_err = torch.full(absmax.shape, float("inf"), device=absmax.device)
        best = absmax.clone()
        for i in range(int(max_shrink * grid)):
            m = absmax * (1 - i / grid)
            q = fake_quantize_rows(torch.maximum(torch.minimum(wc, m), -m).reshape(-1, g), bits).reshape(wc.shape)
            err = (torch.einsum("tgk,ngk->ntg", xg, q) - reference).pow(2).mean(1, keepdim=True).transpose(1, 2)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, m, best)
        best_max[r1:r1 + row_chunk] = best
    return best_max.squeeze(-1)


def apply_clip(weight: torch.Tensor, max_val: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """`weight` [N, K] clamped to [-m, m] per group (m [N, groups] from search_clip)."""
    n, k = weight.shape
    g = k if group_size is None else group_size
    m = max_val.repeat_interleave(g, dim=1)[:, :k].to(weight.device, weight.dtype)
    return torch.maximum(torch.minimum(weight, m), -m)


@torch.no_grad()
def apply_awq(policy: nn.Module, modules: Mapping[str, nn.Linear], batches: Sequence[Mapping],
              bits: int, *, group_size: int | None = None, grid: int = 20, clip: bool = True,
              max_samples: int = 512, progress: bool = True) -> dict:
    """Scale-search and fold (block by block), then clip, every Linear in `modules` in place;
    the weights stay float. Pack afterwards at `bits` (per channel, or group-wise at group_size).

    Returns {"alphas": chosen alpha per scale group (keyed by its first Linear), "unscaled": the
    Linears no rule could scale (clip only)}.
    """
    bits = check_bits(bits, (2, 3, 4, 8))
    if group_size is not None:
        check_group_size(group_size)
    batches = check_batches(batches)
    names = list(modules)
    # Float inputs of every Linear (absmean for the scales, a sample for the clip): the folds
    # leave the float forward unchanged and the clips are applied at the end, so these stay the
    # inputs each block sees during its search.
    stats = collect_input_stats(policy, modules, batches, max_samples=max_samples)
    _, calls = forward_order(policy, modules, batches[0])
    blocks = scale_blocks(policy, names)
    alphas: dict[str, float] = {}
    applied: dict[str, torch.Tensor] = {}
    for block, groups in tqdm(blocks.items(), desc=f"AWQ W{bits} scales", disable=not progress, leave=False):
        inspect = {g.inspect: policy.get_submodule(g.inspect) for g in groups}
        captured = capture_calls(policy, inspect, batches, {g.inspect: calls[g.linears[0]] for g in groups})
        chosen = []
        for g in groups:
            linears = [modules[n] for n in g.linears]
            s, alpha, _ = search_scale(inspect[g.inspect], captured[g.inspect], linears,
                                       stats[g.linears[0]].absmean, bits, group_size, grid)
            chosen.append((g, s))
            alphas[g.linears[0]] = alpha
        del captured
        for g, s in chosen:   # llm-awq's apply_scale: after every search of the block
            fold_into_output(policy.get_submodule(g.prev), s)
            for n in g.linears:
                modules[n].weight.mul_(s.to(modules[n].weight.dtype)[None, :])
                applied[n] = s
    if clip:
        thresholds = {}
        for name in tqdm(names, desc=f"AWQ W{bits} clip", disable=not progress, leave=False):
            if name.rsplit(".", 1)[-1] in NO_CLIP_SUFFIXES:
                continue
            x = stats[name].sample_tensor()
            if name in applied:
                x = x / applied[name][None, :]
            thresholds[name] = search_clip(x, modules[name].weight.float(), bits, group_size, grid)
        for name, m in thresholds.items():
            lin = modules[name]
            lin.weight.copy_(apply_clip(lin.weight, m, group_size))
    return {"alphas": alphas, "unscaled": [n for n in names if n not in applied]}
