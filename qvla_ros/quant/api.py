"""`quantize_(policy, plan)`: apply a BitPlan in place, torchao style; save and load the result.

    plan = BitPlan.load("config/plans/tiny_qvla_4.0.json", model=policy)   # checks it fits
    quantize_(policy, plan)                                            # Linear -> MixedBitLinear
    save_quantized(policy, plan, "out/tiny_q4")                        # packed safetensors + plan
    policy = load_quantized_policy("out/tiny_q4")                      # ... and back

A quantized checkpoint directory holds the policy's config.json and tokenizer.json, a
model.safetensors whose planned layers are the packed buffers of MixedBitLinear (uint8 codes,
float16 scales/zeros, int32 row_index, bf16 rows), and the plan as plan.json.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .mixed_linear import MixedBitLinear
from .plan import BitPlan, PlanError

PLAN_FILE = "plan.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_(model: nn.Module, plan: BitPlan, *, check_weights: bool = True,
              filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Swap every Linear the plan names for a MixedBitLinear holding its packed rows, in place.

    The plan is checked against the model first (architecture, weights unless check_weights=False,
    layer shapes), so a plan for another model raises PlanError before anything changes.
    `filter_fn(module, name)` can restrict the swap to some of the planned layers.
    """
    already = [n for n, m in model.named_modules() if isinstance(m, MixedBitLinear)]
    if already:
        raise PlanError(f"model is already quantized ({len(already)} MixedBitLinear layers, e.g. {already[0]!r}); "
                        "apply a plan to the float model")
    plan.check_model(model, check_weights=check_weights)
    modules = dict(model.named_modules())
    for name, layer in plan.layers.items():
        linear = modules[name]
        if not isinstance(linear, nn.Linear):
            raise PlanError(f"layer {name!r} is a {type(linear).__name__}, not an nn.Linear")
        if filter_fn is not None and not filter_fn(linear, name):
            continue
        _set_module(model, name, MixedBitLinear.from_linear(
            linear, torch.from_numpy(layer.bits.astype("int64")), act_bits=layer.act_bits, row_tile=plan.row_tile))
    model.qvla_plan_id = plan.plan_id
    return model


def mixed_bit_layers(model: nn.Module) -> dict[str, MixedBitLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MixedBitLinear)}


def quantized_weight_nbytes(model: nn.Module) -> int:
    """Bytes of the packed weight buffers of every MixedBitLinear in `model`, measured on the tensors."""
    return sum(m.packed_nbytes() for m in mixed_bit_layers(model).values())


def set_dequant_cache(model: nn.Module, enabled: bool) -> None:
    """Keep (or drop) a float copy of each layer's dequantized weights: faster CPU forwards at the
    price of the memory the packing saves. Off by default."""
    for m in mixed_bit_layers(model).values():
        m.cache_dequantized = enabled
        m._dequant_cache = None


def safetensors_tensor_nbytes(path: str | os.PathLike) -> dict[str, int]:
    """{tensor name: bytes it occupies in the file}, read from the safetensors header."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", head)
        if size > 100 * 2 ** 20:
            raise ValueError(f"{path} declares a {size}-byte header; not a safetensors file")
        header = json.loads(fh.read(size))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def disk_weight_nbytes(directory: str | os.PathLike, plan: BitPlan) -> int:
    """Bytes the planned layers' packed buffers (bias excluded) take in a saved checkpoint."""
    sizes = safetensors_tensor_nbytes(Path(directory) / WEIGHTS_FILE)
    prefixes = tuple(f"{name}." for name in plan.layers)
    return sum(n for k, n in sizes.items() if k.startswith(prefixes) and not k.endswith(".bias"))


def save_quantized(model: nn.Module, plan: BitPlan, directory: str | os.PathLike) -> Path:
    """Write a quantized policy: its own save_pretrained files (packed state) + plan.json."""
    if not mixed_bit_layers(model):
        raise ValueError("model has no MixedBitLinear layers; run quantize_(model, plan) first")
    if getattr(model, "qvla_plan_id", None) != plan.plan_id:
        raise PlanError(f"model was quantized with plan {getattr(model, 'qvla_plan_id', None)!r}, not {plan.plan_id!r}")
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} has no save_pretrained(); cannot write a policy checkpoint")
    out = Path(directory)
    model.save_pretrained(out)
    plan.save(out / PLAN_FILE)
    return out


def load_quantized(directory: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a policy saved by save_quantized: the architecture from config.json, MixedBitLinear
    shells shaped by plan.json, then the packed tensors from model.safetensors (strictly)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..policy import CheckpointError, InstructionTokenizer, get_config, make_policy

    directory = Path(directory)
    for name in (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, PLAN_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"quantized checkpoint {directory} has no {name}")
    try:
        config = get_config(json.loads((directory / CONFIG_FILE).read_text())["config"])
        tokenizer = InstructionTokenizer.from_str((directory / TOKENIZER_FILE).read_text())
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{directory}: bad config.json or tokenizer.json ({exc})") from None
    plan = BitPlan.load(directory / PLAN_FILE)
    policy = make_policy(config, tokenizer=tokenizer)
    # The random weights are not the plan's, but the architecture must be.
    plan.check_model(policy, check_weights=False)
    for name, layer in plan.layers.items():
        linear = policy.get_submodule(name)
        _set_module(policy, name, MixedBitLinear.empty(
            layer.in_features, layer.out_features, torch.from_numpy(layer.bits.astype("int64")),
            bias=linear.bias is not None, act_bits=layer.act_bits, row_tile=plan.row_tile))
    try:
        state = load_file(directory / WEIGHTS_FILE)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{directory / WEIGHTS_FILE} is corrupt: {exc}") from None
    expected = policy.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{directory / WEIGHTS_FILE} does not match {PLAN_FILE}: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape or tensor.dtype != expected[key].dtype:
            raise CheckpointError(f"{directory / WEIGHTS_FILE}: {key} is {tensor.dtype} {tuple(tensor.shape)}, "
                                  f"the plan implies {expected[key].dtype} {tuple(expected[key].shape)}")
    for name in plan.layers:
        index = state[f"{name}.row_index"]
        n = policy.get_submodule(name).out_features
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n or index.unique().numel() != index.numel()):
            raise CheckpointError(f"{directory / WEIGHTS_FILE}: {name}.row_index is not a set of distinct channels < {n}")
    policy.load_state_dict(state)
    policy.qvla_plan_id = plan.plan_id
    return policy.to(device).eval()


def is_quantized_checkpoint(directory: str | os.PathLike) -> bool:
    return (Path(directory) / PLAN_FILE).is_file() and (Path(directory) / WEIGHTS_FILE).is_file()


def load_quantized_policy(checkpoint_dir: str | os.PathLike | None = None,
                          plan_path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                          cache_dequantized: bool = False) -> nn.Module:
    """The policy to serve or evaluate.

    - checkpoint_dir a quantized checkpoint (save_quantized): loaded as saved; plan_path, if given,
      must be the same plan.
    - otherwise: the float policy at checkpoint_dir (None: the shipped default), quantized by the
      plan at plan_path (checked against the policy first); plan_path None: the float policy.
    The returned module has `qvla_plan_id` (None for the float policy).
    """
    from ..policy import load_policy

    if checkpoint_dir is not None and is_quantized_checkpoint(checkpoint_dir):
        policy = load_quantized(checkpoint_dir, device="cpu")
        if plan_path is not None:
            wanted = BitPlan.load(plan_path).plan_id
            if wanted != policy.qvla_plan_id:
                raise PlanError(f"{checkpoint_dir} was quantized with plan {policy.qvla_plan_id}, not {wanted} ({plan_path})")
    else:
        policy = load_policy(checkpoint_dir, device="cpu")
        if plan_path is None:
            policy.qvla_plan_id = None
            return policy.to(device).eval()
        quantize_(policy, BitPlan.load(plan_path, model=policy))
    set_dequant_cache(policy, cache_dequantized)
    return policy.to(device).eval()
