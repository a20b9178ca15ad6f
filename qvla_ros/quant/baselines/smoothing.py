"""Per-input-channel rescaling that leaves the fp function unchanged (SmoothQuant; AWQ uses its
`fold_into_output`).

For a Linear y = W x, dividing input channel j by s_j and multiplying column j of W by s_j changes
nothing in exact arithmetic, but moves quantization difficulty between activations and weights.
Where the input comes straight from a normalization layer (Llama's input_layernorm ->
q/k/v_proj, post_attention_layernorm -> gate/up_proj; SigLIP's layer_norm1 -> q/k/v_proj,
layer_norm2 -> fc1) the 1/s is folded into the norm's weight (and bias), which costs nothing at
run time; the Linears fed by one norm share one s. Every other Linear gets an explicit input
scale (`InputScaled`: x / s before the layer, K float16 values, counted in the measured memory).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint import set_submodule
from ..input_scaled import InputScaled

# (suffix of a Linear's dotted name, name of the norm beside its parent block that feeds it)
NORM_FEEDS = (
    ("self_attn.q_proj", "input_layernorm"),
    ("self_attn.k_proj", "input_layernorm"),
    ("self_attn.v_proj", "input_layernorm"),
    ("mlp.gate_proj", "post_attention_layernorm"),
    ("mlp.up_proj", "post_attention_layernorm"),
    ("self_attn.q_proj", "layer_norm1"),
    ("self_attn.k_proj", "layer_norm1"),
    ("self_attn.v_proj", "layer_norm1"),
    ("mlp.fc1", "layer_norm2"),
)

#: smoothing factors are kept in [1e-5, 1e5]: a dead input channel must not blow up a weight
_S_MIN, _S_MAX = 1e-5, 1e5


def _get(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def feeding_norm(root: nn.Module, linear_name: str) -> str | None:
    """Dotted name of the normalization layer whose output is this Linear's input, or None."""
    for suffix, norm in NORM_FEEDS:
        if linear_name == suffix or linear_name.endswith("." + suffix):
            block = linear_name[: -len(suffix)].rstrip(".")
            norm_name = f"{block}.{norm}" if block else norm
            module = _get(root, norm_name)
            if module is not None and isinstance(getattr(module, "weight", None), torch.Tensor):
                return norm_name
    return None


@dataclass
class ScaleGroup:
    """Linears that read one input and so share one smoothing vector; `norm` folds it if set."""

    linears: list[str]
    norm: str | None


def scale_groups(root: nn.Module, names: list[str]) -> list[ScaleGroup]:
    """Group `names` by the norm that feeds them; a Linear with no such norm is its own group."""
    by_norm: dict[str, list[str]] = {}
    groups: list[ScaleGroup] = []
    for name in names:
        norm = feeding_norm(root, name)
        if norm is None:
            groups.append(ScaleGroup([name], None))
        elif norm in by_norm:
            by_norm[norm].append(name)
        else:
            by_norm[norm] = [name]
            groups.append(ScaleGroup(by_norm[norm], norm))
    return groups


@torch.no_grad()
def apply_smoothing(root: nn.Module, group: ScaleGroup, s: torch.Tensor) -> torch.Tensor | None:
    """Fold smoothing vector `s` [K] into one group in place: W[:, j] *= s_j for each Linear, and
    either the norm's weight/bias /= s (returns None) or, with no norm, returns the float16 scale
    that the caller must apply to the input (`wrap_input_scales`, after quantization).

    Without a norm, s is rounded to float16 first and the weight multiplied by the rounded value,
    so the pair stays an identity up to fp error.
    """
    s = s.detach().float().clamp(_S_MIN, _S_MAX)
    if not torch.isfinite(s).all():
        raise ValueError(f"smoothing factors for {group.linears} are not finite")
    if group.norm is None:
        s = s.to(torch.float16).float()
    else:
        fold_into_output(root.get_submodule(group.norm), s)
    for name in group.linears:
        lin = root.get_submodule(name)
        if lin.in_features != s.numel():
            raise ValueError(f"{name} has {lin.in_features} inputs but the smoothing vector has {s.numel()}")
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
    return None if group.norm is not None else s.to(torch.float16)


@torch.no_grad()
def fold_into_output(module: nn.Module, s: torch.Tensor) -> None:
    """Divide output channel j of `module` by s_j in place: a norm's weight (and bias), or a
    Linear's output rows (and bias). Exact for whatever reads that output linearly per channel:
    the Linears after a norm; o_proj after v_proj (attention mixes v's rows over tokens only);
    down_proj after up_proj (act(gate) * up is elementwise in up's channels)."""
    weight = module.weight
    if weight.shape[0] != s.numel():
        raise ValueError(f"cannot fold {s.numel()} scales into a {type(module).__name__} with "
                         f"{weight.shape[0]} output channels")
    s = s.to(weight.device, torch.float32)
    weight.copy_((weight.float() / (s if weight.dim() == 1 else s[:, None])).to(weight.dtype))
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.copy_((bias.float() / s).to(bias.dtype))


def wrap_input_scales(root: nn.Module, scales: Mapping[str, torch.Tensor]) -> None:
    """Put each named module (already quantized or not) behind its explicit input scale."""
    for name, scale in scales.items():
        set_submodule(root, name, InputScaled(root.get_submodule(name), scale))
