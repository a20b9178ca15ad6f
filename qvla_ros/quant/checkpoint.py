"""The quantized-checkpoint format: one writer (`save_quantized`), one reader (`load_quantized`).

QVLA (`quantize_`) and every baseline (group-wise rows, input scales around a packed layer) write
the same folder, data only (safetensors + JSON, no pickle):

    config.json, tokenizer.json, model.safetensors   the policy's save_pretrained (every tensor)
    modules.json   what replaced each Linear, and how to build it empty:
                   {"format": "qvla-quantized-modules", "version": 1, "qvla_plan_id": ... | null,
                    "modules": {"<dotted name>": {"class": "MixedBitLinear", "in_features": K, ...}}}
    plan.json      the BitPlan, when one quantized the policy: its layers are exactly the
                   MixedBitLinears modules.json lists, with the plan's row counts and widths

Loading treats the files as untrusted. The float architecture is built from config.json on the
meta device; plan.json (when present) is checked against it (architecture hash) and against
modules.json; the empty modules modules.json describes are swapped in; every tensor the
safetensors header names is checked against that skeleton (names, shapes, dtypes). Only then is
anything allocated, and the float Linears the modules replace are never built: memory is what the
file holds. Only the classes in BUILDERS can be named, so a file cannot make the loader build
anything else. (Folders of the two formats this replaced, plan.json without modules.json and
"qvla-baseline-modules" caches, are refused with a message; no shipped file uses them.)
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch
from torch import nn

from ..io import atomic_write_text
from .groupwise_linear import GroupWiseLinear
from .input_scaled import InputScaled
from .mixed_linear import MixedBitLinear
from .plan import BitPlan, PlanError

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
WEIGHTS_FILE = "model.safetensors"
MODULES_FILE = "modules.json"
PLAN_FILE = "plan.json"
MODULES_FORMAT = "qvla-quantized-modules"
MODULES_VERSION = 1
# modules.json lists one small object per replaced Linear: a 7B policy's is well under this.
MAX_MODULES_BYTES = 16 * 2 ** 20

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
                       torch.int64: "I64", torch.bool: "BOOL"}


def _checkpoint_error(message: str) -> Exception:
    from ..policy import CheckpointError

    return CheckpointError(message)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `name` by `module`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# ---- sizes read from a file ------------------------------------------------------------------
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


# ---- modules.json: describe a stored module, build it empty ------------------------------------
def _int(spec: dict, key: str, where: str) -> int:
    value = spec.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _checkpoint_error(f"{where}: {key!r} must be a non-negative integer, got {value!r}")
    return value


def _flag(spec: dict, key: str, where: str) -> bool:
    value = spec.get(key)
    if not isinstance(value, bool):
        raise _checkpoint_error(f"{where}: {key!r} must be true or false, got {value!r}")
    return value


def _mixed_counts(module: MixedBitLinear) -> dict[str, int]:
    counts = {str(b): n for b, n in module.group_layout}
    counts["0"] = module.out_features - sum(n for _, n in module.group_layout)
    return counts


def _describe(module: nn.Module, where: str) -> dict:
    """The JSON spec from which `_build` makes an empty module with the same tensors."""
    if isinstance(module, MixedBitLinear):
        return {"class": "MixedBitLinear", "in_features": module.in_features,
                "out_features": module.out_features, "counts": _mixed_counts(module),
                "bias": module.bias is not None, "act_bits": module.act_bits, "row_tile": module.row_tile}
    if isinstance(module, GroupWiseLinear):
        return {"class": "GroupWiseLinear", "in_features": module.in_features,
                "out_features": module.out_features, "bits": module.bits, "group_size": module.group_size,
                "bias": module.bias is not None}
    if isinstance(module, InputScaled):
        return {"class": "InputScaled", "in_features": module.in_features,
                "inner": _describe(module.inner, f"{where}.inner")}
    if type(module) is nn.Linear:
        return {"class": "Linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    raise _checkpoint_error(f"{where}: cannot save a {type(module).__name__} (known: {sorted(BUILDERS)})")


def _build_mixed(spec: dict, where: str) -> nn.Module:
    counts = spec.get("counts")
    if not isinstance(counts, dict) or not all(isinstance(b, str) and b.isdigit() for b in counts):
        raise _checkpoint_error(f"{where}: 'counts' must map bit-widths to row counts")
    counts = {int(b): _int(counts, b, where) for b in counts}
    return MixedBitLinear(_int(spec, "in_features", where), _int(spec, "out_features", where), counts,
                          bias=_flag(spec, "bias", where), act_bits=_int(spec, "act_bits", where),
                          row_tile=_int(spec, "row_tile", where))


def _build_group_wise(spec: dict, where: str) -> nn.Module:
    return GroupWiseLinear(_int(spec, "in_features", where), _int(spec, "out_features", where),
                           _int(spec, "bits", where), _int(spec, "group_size", where),
                           bias=_flag(spec, "bias", where))


def _build_input_scaled(spec: dict, where: str) -> nn.Module:
    inner = spec.get("inner")
    if not isinstance(inner, dict) or inner.get("class") == "InputScaled":
        raise _checkpoint_error(f"{where}: 'inner' must describe the scaled layer")
    return InputScaled(_build(inner, f"{where}.inner"), torch.ones(_int(spec, "in_features", where)))


def _build_linear(spec: dict, where: str) -> nn.Module:
    return nn.Linear(_int(spec, "in_features", where), _int(spec, "out_features", where),
                     bias=_flag(spec, "bias", where))


BUILDERS = {"MixedBitLinear": _build_mixed, "GroupWiseLinear": _build_group_wise,
            "InputScaled": _build_input_scaled, "Linear": _build_linear}


def _build(spec, where: str) -> nn.Module:
    from ..policy import CheckpointError

    if not isinstance(spec, dict) or spec.get("class") not in BUILDERS:
        got = spec.get("class") if isinstance(spec, dict) else type(spec).__name__
        raise CheckpointError(f"{where}: unknown module class {got!r} (known: {sorted(BUILDERS)})")
    try:
        return BUILDERS[spec["class"]](spec, where)
    except CheckpointError:
        raise
    except (ValueError, TypeError, RuntimeError) as exc:  # the module's own argument checks
        raise CheckpointError(f"{where}: {exc}") from None


def replaced_modules(policy: nn.Module, float_policy: nn.Module) -> dict[str, dict]:
    """{dotted name: spec} of the outermost modules of `policy` that differ in class from the
    float policy's module of the same name (the Linears a quantizer replaced)."""
    reference = {name: type(m) for name, m in float_policy.named_modules()}
    found: dict[str, dict] = {}
    for name, module in policy.named_modules():
        if any(name.startswith(f"{outer}.") for outer in found):
            continue
        if name not in reference:
            raise _checkpoint_error(f"{name!r} ({type(module).__name__}) is not part of the float policy")
        if type(module) is not reference[name]:
            found[name] = _describe(module, name)
    return found


# ---- the skeleton: built on the meta device, checked against the header ----------------------
def _float_skeleton(directory: Path, stored: dict[str, tuple[tuple[int, ...], str]]) -> nn.Module:
    """The float policy config.json describes, on the meta device (no storage)."""
    from ..policy.modeling_vla import meta_skeleton, read_checkpoint_config

    config, tokenizer = read_checkpoint_config(directory)
    # The weights' dtype as stored (a bf16 policy saved on a GPU stays bf16), read off one tensor
    # every policy has and no quantizer replaces.
    # (VLAPolicy: action_queries; OFTPolicy: projector.fc1.weight.)
    probe = stored.get("action_queries") or stored.get("projector.fc1.weight") or ((), "F32")
    dtype = {"BF16": torch.bfloat16, "F16": torch.float16}.get(probe[1])
    return meta_skeleton(directory, config, tokenizer, len(stored), dtype=dtype)


def _swap_in(skeleton: nn.Module, modules: dict, directory: Path) -> nn.Module:
    with torch.device("meta"):
        for name, spec in modules.items():
            try:
                skeleton.get_submodule(name)
            except AttributeError:
                raise _checkpoint_error(f"{directory / MODULES_FILE}: the policy has no module {name!r}") from None
            set_submodule(skeleton, name, _build(spec, f"{directory / MODULES_FILE}: {name}"))
    return skeleton


def _check_header(skeleton: nn.Module, stored: dict[str, tuple[tuple[int, ...], str]], path: Path,
                  sources: str) -> None:
    """Raise CheckpointError unless the stored tensors are exactly the skeleton's, name for name,
    shape for shape and dtype for dtype (`sources`: the files that shaped the skeleton)."""
    from ..policy.checkpoint_files import check_tensor_names

    expected = {k: (tuple(v.shape), _SAFETENSORS_DTYPES.get(v.dtype, str(v.dtype)))
                for k, v in skeleton.state_dict().items()}
    check_tensor_names(path, expected, stored, sources)
    for key, (shape, dtype) in stored.items():
        if (shape, dtype) != expected[key]:
            raise _checkpoint_error(f"{path}: tensor {key} is {dtype} {shape}, {sources} imply "
                                    f"{expected[key][1]} {expected[key][0]}")


def _check_plan(plan: BitPlan, plan_id: str | None, modules: dict, float_skeleton: nn.Module,
                directory: Path) -> None:
    """plan.json against config.json (architecture hash, layer shapes) and against modules.json
    (the same plan id; every planned layer, and only those, a MixedBitLinear shaped as planned)."""
    try:
        plan.check_model(float_skeleton, check_weights=False, fingerprint=architecture_fingerprint(float_skeleton))
        for name in plan.layers:
            if not isinstance(float_skeleton.get_submodule(name), nn.Linear):
                raise PlanError(f"layer {name!r} is a {type(float_skeleton.get_submodule(name)).__name__}, "
                                "not an nn.Linear")
    except PlanError as exc:
        raise PlanError(f"{directory / PLAN_FILE} does not match {CONFIG_FILE}: {exc}") from None
    where = f"{directory / MODULES_FILE} does not match {PLAN_FILE}"
    if plan_id != plan.plan_id:
        raise _checkpoint_error(f"{where}: it names plan {plan_id!r}, {PLAN_FILE} is {plan.plan_id!r}")
    if set(modules) != set(plan.layers):
        odd = sorted(set(modules) ^ set(plan.layers))
        raise _checkpoint_error(f"{where}: the planned layers and the stored modules differ at "
                                f"{odd[:4]}{'...' if len(odd) > 4 else ''}")
    for name, layer in plan.layers.items():
        spec = modules[name]
        want = {str(b): n for b, n in layer.counts.items() if n}
        got = spec.get("counts") if isinstance(spec, dict) else None
        got = {b: n for b, n in got.items() if n} if isinstance(got, dict) else got
        if (not isinstance(spec, dict) or spec.get("class") != "MixedBitLinear" or got != want
                or spec.get("act_bits") != layer.act_bits or spec.get("row_tile") != plan.row_tile):
            raise _checkpoint_error(f"{where}: layer {name!r} is stored as {spec!r}, the plan has rows "
                                    f"{want}, act_bits {layer.act_bits}, row_tile {plan.row_tile}")


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


def _checked_skeleton(directory: Path, modules: dict, plan_id: str | None) -> nn.Module:
    """Float skeleton from config.json, plan.json checked (when there is one), modules swapped in,
    the header checked against the result: everything short of reading tensor data."""
    from ..policy.checkpoint_files import stored_tensor_specs

    stored = stored_tensor_specs(directory / WEIGHTS_FILE)
    skeleton = _float_skeleton(directory, stored)
    sources = f"{CONFIG_FILE} and {MODULES_FILE}"
    if (directory / PLAN_FILE).is_file():
        _check_plan(BitPlan.load(directory / PLAN_FILE), plan_id, modules, skeleton, directory)
        sources = f"{CONFIG_FILE}, {MODULES_FILE} and {PLAN_FILE}"
    _swap_in(skeleton, modules, directory)
    _check_header(skeleton, stored, directory / WEIGHTS_FILE, sources)
    return skeleton


# ---- the writer and the reader ----------------------------------------------------------------
def save_quantized(model: nn.Module, plan: BitPlan | None, directory: str | os.PathLike) -> Path:
    """Write a quantized policy as the folder described above; `plan`: the BitPlan that quantized
    it (quantize_), written as plan.json, or None (a baseline that no plan describes whole).

    modules.json is written last, so a folder without it is incomplete. Before that the folder is
    read back as far as its description goes (skeleton against header, plan against modules): a
    module this format cannot describe fails here, at save time, not when the folder is loaded.
    """
    plan_id = getattr(model, "qvla_plan_id", None)
    if plan is not None:
        if not any(isinstance(m, MixedBitLinear) for m in model.modules()):
            raise ValueError("model has no MixedBitLinear layers; run quantize_(model, plan) first")
        if plan_id != plan.plan_id:
            raise PlanError(f"model was quantized with plan {plan_id!r}, not {plan.plan_id!r}")
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} has no save_pretrained(); cannot write a policy checkpoint")
    from ..policy.checkpoint_files import stored_tensor_specs

    out = Path(directory)
    (out / MODULES_FILE).unlink(missing_ok=True)
    (out / PLAN_FILE).unlink(missing_ok=True)
    model.save_pretrained(out)
    modules = replaced_modules(model, _float_skeleton(out, stored_tensor_specs(out / WEIGHTS_FILE)))
    if plan is not None:
        plan.save(out / PLAN_FILE)
    _checked_skeleton(out, modules, plan_id)
    doc = {"format": MODULES_FORMAT, "version": MODULES_VERSION, "qvla_plan_id": plan_id, "modules": modules}
    atomic_write_text(out / MODULES_FILE, json.dumps(doc, indent=1) + "\n")
    return out


def _read_modules(directory: Path) -> tuple[dict, str | None]:
    path = directory / MODULES_FILE
    if not path.is_file():
        if (directory / PLAN_FILE).is_file():
            raise _checkpoint_error(f"{directory} has {PLAN_FILE} but no {MODULES_FILE}: a quantized checkpoint "
                                    "of an older qvla_ros (or a save that did not finish); quantize it again")
        raise _checkpoint_error(f"{directory} has no {MODULES_FILE}: not a quantized checkpoint "
                                "(or its save did not finish)")
    if path.stat().st_size > MAX_MODULES_BYTES:
        raise _checkpoint_error(f"{path} is larger than any {MODULES_FILE} ({MAX_MODULES_BYTES} bytes)")
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise _checkpoint_error(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != MODULES_FORMAT or doc.get("version") != MODULES_VERSION:
        raise _checkpoint_error(f"{path} is not a {MODULES_FORMAT} version {MODULES_VERSION} file")
    modules, plan_id = doc.get("modules"), doc.get("qvla_plan_id")
    if not isinstance(modules, dict) or not (plan_id is None or isinstance(plan_id, str)):
        raise _checkpoint_error(f"{path}: 'modules' must be an object and 'qvla_plan_id' a string or null")
    return modules, plan_id


def load_quantized(directory: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Read a folder written by save_quantized. Everything is checked before anything is allocated
    (module docstring), so a config.json, modules.json or plan.json edited to describe a huge
    model, or a file with a tensor missing or reshaped, is refused with CheckpointError/PlanError
    naming the file and the tensor. The returned policy has `qvla_plan_id`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    modules, plan_id = _read_modules(directory)
    for name in (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise _checkpoint_error(f"quantized checkpoint {directory} has no {name}")
    skeleton = _checked_skeleton(directory, modules, plan_id)
    try:
        state = load_file(directory / WEIGHTS_FILE)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _checkpoint_error(f"{directory / WEIGHTS_FILE} is corrupt: {exc}") from None
    for name, module in skeleton.named_modules():
        if isinstance(module, MixedBitLinear):
            index, n = state[f"{name}.row_index"], module.out_features
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n
                                  or index.unique().numel() != index.numel()):
                raise _checkpoint_error(f"{directory / WEIGHTS_FILE}: {name}.row_index is not a set of "
                                        f"distinct channels < {n}")
    policy = _materialize(skeleton, state)
    policy.qvla_plan_id = plan_id
    return policy.to(device).eval()


def looks_quantized(directory: str | os.PathLike) -> bool:
    """Whether `directory` claims to be a quantized checkpoint (of this format or an older one):
    what decides between load_quantized (which then names any problem) and a float policy."""
    return (Path(directory) / MODULES_FILE).is_file() or (Path(directory) / PLAN_FILE).is_file()


def is_quantized_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds weights and a modules.json of this format and version (a cache
    check: an older folder answers False and is written again)."""
    directory = Path(directory)
    if not (directory / WEIGHTS_FILE).is_file():
        return False
    try:
        _read_modules(directory)
    except ValueError:
        return False
    return True
