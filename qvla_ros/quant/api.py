"""`quantize_(policy, plan)`: apply a BitPlan in place, torchao style; save and load the result.

    plan = BitPlan.load("config/plans/tiny_qvla_4.0.json", model=policy)   # checks it fits
    quantize_(policy, plan)                                            # Linear -> MixedBitLinear
    save_quantized(policy, plan, "out/tiny_q4")                        # packed safetensors + plan
    policy = load_quantized_policy("out/tiny_q4")                      # ... and back

A quantized checkpoint directory holds the policy's config.json and tokenizer.json, a
model.safetensors whose planned layers are the packed buffers of MixedBitLinear (uint8 codes,
float16 scales/zeros, int32 row_index, bf16 rows), and the plan as plan.json. Loading treats
the three as untrusted: they are checked against each other (config.json against the plan's
architecture hash, both against every tensor the safetensors header names) on a meta-device
skeleton before anything is allocated, and the float Linears the plan replaces are never built.
"""
from __future__ import annotations

import hashlib
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


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
                       torch.int64: "I64", torch.bool: "BOOL"}


def _read_config(directory: Path):
    """(VLAConfig, InstructionTokenizer) from a checkpoint's config.json and tokenizer.json,
    checked as load_policy checks them."""
    from ..policy.modeling_vla import read_checkpoint_config

    return read_checkpoint_config(directory)


def _stored_tensors(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, safetensors dtype)} from the file's header; no tensor data is read."""
    from ..policy.modeling_vla import stored_tensor_specs

    return stored_tensor_specs(path)


def architecture_fingerprint(model: nn.Module) -> dict:
    """plan.model_fingerprint without the weight hash: the architecture hash from names and shapes
    only, so it works on a meta-device skeleton (which has no data to hash)."""
    arch = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        arch.update(f"{name}:{tuple(tensor.shape)};".encode())
    config = getattr(model, "config", None)
    return {"class": type(model).__name__, "config": getattr(config, "name", None),
            "architecture": arch.hexdigest(), "weights": None,
            "params": int(sum(p.numel() for p in model.parameters()))}


def _float_skeleton(directory: Path, config, tokenizer, stored: dict[str, tuple[tuple[int, ...], str]]) -> nn.Module:
    """The float policy config.json describes, on the meta device (no storage)."""
    from ..policy.modeling_vla import meta_skeleton

    # The weights' dtype as stored (a bf16 policy saved on a GPU stays bf16), read off one tensor
    # every policy has and no plan packs.
    # (VLAPolicy: action_queries; OFTPolicy: projector.fc1.weight.)
    probe = stored.get("action_queries") or stored.get("projector.fc1.weight") or ((), "F32")
    dtype = {"BF16": torch.bfloat16, "F16": torch.float16}.get(probe[1])
    return meta_skeleton(directory, config, tokenizer, len(stored), dtype=dtype)


def _check_header(skeleton: nn.Module, stored: dict[str, tuple[tuple[int, ...], str]], path: Path,
                  sources: str) -> None:
    """Raise CheckpointError unless the stored tensors are exactly the skeleton's, name for name,
    shape for shape and dtype for dtype (`sources`: the files that shaped the skeleton)."""
    from ..policy import CheckpointError
    from ..policy.modeling_vla import check_tensor_names

    expected = {k: (tuple(v.shape), _SAFETENSORS_DTYPES.get(v.dtype, str(v.dtype)))
                for k, v in skeleton.state_dict().items()}
    check_tensor_names(path, expected, stored, sources)
    for key, (shape, dtype) in stored.items():
        if (shape, dtype) != expected[key]:
            raise CheckpointError(f"{path}: tensor {key} is {dtype} {shape}, {sources} imply "
                                  f"{expected[key][1]} {expected[key][0]}")


def _quantized_skeleton(directory: Path, config, tokenizer, plan: BitPlan,
                        stored: dict[str, tuple[tuple[int, ...], str]]) -> nn.Module:
    """The quantized policy on the meta device (no storage): the architecture from config.json with
    each planned Linear swapped for a MixedBitLinear shell shaped by the plan. Raises
    CheckpointError (or PlanError) unless its tensors are exactly those stored, name for name,
    shape for shape and dtype for dtype: after this, materializing it allocates what the file
    holds and no more (the float Linears the plan replaces are never allocated)."""
    from ..policy import CheckpointError

    path = directory / WEIGHTS_FILE
    absent = [name for name in plan.layers if f"{name}.row_index" not in stored]
    if absent:
        raise CheckpointError(f"{path} does not match {PLAN_FILE}: no packed tensors for planned "
                              f"layers {absent[:4]}{'...' if len(absent) > 4 else ''}")
    skeleton = _float_skeleton(directory, config, tokenizer, stored)
    try:
        plan.check_model(skeleton, check_weights=False, fingerprint=architecture_fingerprint(skeleton))
        for name in plan.layers:
            if not isinstance(skeleton.get_submodule(name), nn.Linear):
                raise PlanError(f"layer {name!r} is a {type(skeleton.get_submodule(name)).__name__}, "
                                "not an nn.Linear")
    except PlanError as exc:
        raise PlanError(f"{directory / PLAN_FILE} does not match {CONFIG_FILE}: {exc}") from None
    with torch.device("meta"):
        for name, layer in plan.layers.items():
            linear = skeleton.get_submodule(name)
            _set_module(skeleton, name, MixedBitLinear(
                layer.in_features, layer.out_features, layer.counts,
                bias=linear.bias is not None, act_bits=layer.act_bits, row_tile=plan.row_tile))
    _check_header(skeleton, stored, path, f"{CONFIG_FILE} and {PLAN_FILE}")
    return skeleton


def _materialize(skeleton: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """The meta skeleton with the loaded tensors as its own (assigned, not copied: the file's
    bytes are held once), and the buffers no checkpoint stores (rotary frequencies, position ids)
    rebuilt from their modules' configs, of which they are functions."""
    policy = skeleton
    policy.load_state_dict(state, assign=True)
    for name, module in policy.named_modules():
        transient = sorted(module._non_persistent_buffers_set)
        if not transient:
            continue
        if getattr(module, "config", None) is None:
            raise RuntimeError(f"cannot rebuild the unsaved buffers {transient} of {name!r} "
                               f"({type(module).__name__} has no config to rebuild it from)")
        with torch.device("cpu"):
            fresh = type(module)(module.config)
        for buffer in transient:
            module._buffers[buffer] = getattr(fresh, buffer)
    left = [n for n, t in [*policy.named_parameters(), *policy.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"tensors {left[:4]} were neither loaded nor rebuilt")
    return policy


def load_quantized(directory: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a policy saved by save_quantized: the architecture from config.json with
    MixedBitLinear shells shaped by plan.json, then the packed tensors from model.safetensors.

    Everything is checked before anything is allocated: the tensors named in the safetensors
    header must be exactly those of the skeleton (built on the meta device), so a config.json or
    plan.json edited to describe a huge model, or a file with a tensor missing or reshaped, is
    refused with CheckpointError/PlanError naming the file and the tensor. The float Linears the
    plan replaces are never built; memory is what the file holds."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..policy import CheckpointError

    directory = Path(directory)
    for name in (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, PLAN_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"quantized checkpoint {directory} has no {name}")
    config, tokenizer = _read_config(directory)
    plan = BitPlan.load(directory / PLAN_FILE)
    skeleton = _quantized_skeleton(directory, config, tokenizer, plan, _stored_tensors(directory / WEIGHTS_FILE))
    try:
        state = load_file(directory / WEIGHTS_FILE)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{directory / WEIGHTS_FILE} is corrupt: {exc}") from None
    for name in plan.layers:
        index = state[f"{name}.row_index"]
        n = plan.layers[name].out_features
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n or index.unique().numel() != index.numel()):
            raise CheckpointError(f"{directory / WEIGHTS_FILE}: {name}.row_index is not a set of distinct channels < {n}")
    policy = _materialize(skeleton, state)
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
