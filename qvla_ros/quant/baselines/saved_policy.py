"""A baseline-quantized policy as files that hold data only: safetensors + JSON, no pickle.

Baselines leave modules the packed checkpoint of `save_quantized` cannot describe (group-wise
rows, explicit input scales around a packed layer), so `qvla compare` keeps each quantized policy
as a folder:

    config.json, tokenizer.json, model.safetensors   the policy's save_pretrained (every tensor)
    modules.json                                      what replaced each Linear, and how to build it

    {"format": "qvla-baseline-modules", "version": 1, "qvla_plan_id": ... | null,
     "modules": {"<dotted name>": {"class": "MixedBitLinear", "in_features": K, ...}, ...}}

Loading builds the float architecture from config.json on the meta device, swaps in empty modules
as modules.json describes them, checks every tensor of the safetensors header against that
skeleton (names, shapes, dtypes), and only then allocates and fills it. Only the classes in
BUILDERS can be named, so a folder cannot make the loader build anything else.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ...io import atomic_write_text
from ..api import (CONFIG_FILE, WEIGHTS_FILE, _check_header, _float_skeleton, _materialize, _read_config,
                   _set_module, _stored_tensors)
from ..mixed_linear import MixedBitLinear
from .groupwise import GroupWiseLinear
from .smoothing import InputScaled

MODULES_FILE = "modules.json"
MODULES_FORMAT = "qvla-baseline-modules"
MODULES_VERSION = 1
# modules.json lists one small object per replaced Linear: a 7B policy's is well under this.
MAX_MODULES_BYTES = 16 * 2 ** 20


class SavedPolicyError(ValueError):
    """A saved baseline policy folder is missing, damaged, or inconsistent."""


def _int(spec: dict, key: str, where: str) -> int:
    value = spec.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SavedPolicyError(f"{where}: {key!r} must be a non-negative integer, got {value!r}")
    return value


def _flag(spec: dict, key: str, where: str) -> bool:
    value = spec.get(key)
    if not isinstance(value, bool):
        raise SavedPolicyError(f"{where}: {key!r} must be true or false, got {value!r}")
    return value


def _describe(module: nn.Module, where: str) -> dict:
    """The JSON spec from which `_build` makes an empty module with the same tensors."""
    if isinstance(module, MixedBitLinear):
        counts = {str(b): n for b, n in module.group_layout}
        counts["0"] = module.out_features - sum(n for _, n in module.group_layout)
        return {"class": "MixedBitLinear", "in_features": module.in_features,
                "out_features": module.out_features, "counts": counts, "bias": module.bias is not None,
                "act_bits": module.act_bits, "row_tile": module.row_tile}
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
    raise SavedPolicyError(f"{where}: cannot save a {type(module).__name__} (known: {sorted(BUILDERS)})")


def _build_mixed(spec: dict, where: str) -> nn.Module:
    counts = spec.get("counts")
    if not isinstance(counts, dict) or not all(isinstance(b, str) and b.isdigit() for b in counts):
        raise SavedPolicyError(f"{where}: 'counts' must map bit-widths to row counts")
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
        raise SavedPolicyError(f"{where}: 'inner' must describe the scaled layer")
    return InputScaled(_build(inner, f"{where}.inner"), torch.ones(_int(spec, "in_features", where)))


def _build_linear(spec: dict, where: str) -> nn.Module:
    return nn.Linear(_int(spec, "in_features", where), _int(spec, "out_features", where),
                     bias=_flag(spec, "bias", where))


BUILDERS = {"MixedBitLinear": _build_mixed, "GroupWiseLinear": _build_group_wise,
            "InputScaled": _build_input_scaled, "Linear": _build_linear}


def _build(spec, where: str) -> nn.Module:
    if not isinstance(spec, dict) or spec.get("class") not in BUILDERS:
        got = spec.get("class") if isinstance(spec, dict) else type(spec).__name__
        raise SavedPolicyError(f"{where}: unknown module class {got!r} (known: {sorted(BUILDERS)})")
    try:
        return BUILDERS[spec["class"]](spec, where)
    except SavedPolicyError:
        raise
    except (ValueError, TypeError, RuntimeError) as exc:  # the module's own argument checks
        raise SavedPolicyError(f"{where}: {exc}") from None


def replaced_modules(policy: nn.Module, float_policy: nn.Module) -> dict[str, dict]:
    """{dotted name: spec} of the outermost modules of `policy` that differ in class from the
    float policy's module of the same name (the Linears a baseline replaced)."""
    reference = {name: type(m) for name, m in float_policy.named_modules()}
    found: dict[str, dict] = {}
    for name, module in policy.named_modules():
        if any(name.startswith(f"{outer}.") for outer in found):
            continue
        if name not in reference:
            raise SavedPolicyError(f"{name!r} ({type(module).__name__}) is not part of the float policy")
        if type(module) is not reference[name]:
            found[name] = _describe(module, name)
    return found


def _skeleton(directory: Path, modules: dict, stored: dict) -> nn.Module:
    config, tokenizer = _read_config(directory)
    skeleton = _float_skeleton(directory, config, tokenizer, stored)
    with torch.device("meta"):
        for name, spec in modules.items():
            try:
                skeleton.get_submodule(name)
            except AttributeError:
                raise SavedPolicyError(f"{directory / MODULES_FILE}: the policy has no module {name!r}") from None
            _set_module(skeleton, name, _build(spec, f"{directory / MODULES_FILE}: {name}"))
    return skeleton


def save_policy(policy: nn.Module, float_policy: nn.Module, directory: str | os.PathLike) -> Path:
    """Write `policy` (a baseline-quantized copy of `float_policy`) as the folder described above.

    modules.json is written last, so a folder without it is incomplete. Before that, the folder is
    read back as far as its description goes (skeleton against header): a module this format
    cannot describe fails here, at save time, not when the folder is loaded.
    """
    out = Path(directory)
    modules = replaced_modules(policy, float_policy)
    (out / MODULES_FILE).unlink(missing_ok=True)
    policy.save_pretrained(out)
    stored = _stored_tensors(out / WEIGHTS_FILE)
    _check_header(_skeleton(out, modules, stored), stored, out / WEIGHTS_FILE, f"{CONFIG_FILE} and {MODULES_FILE}")
    doc = {"format": MODULES_FORMAT, "version": MODULES_VERSION,
           "qvla_plan_id": getattr(policy, "qvla_plan_id", None), "modules": modules}
    atomic_write_text(out / MODULES_FILE, json.dumps(doc, indent=1) + "\n")
    return out


def is_saved_policy(directory: str | os.PathLike) -> bool:
    return (Path(directory) / MODULES_FILE).is_file() and (Path(directory) / WEIGHTS_FILE).is_file()


def load_policy(directory: str | os.PathLike) -> nn.Module:
    """Read a folder written by save_policy (see the module docstring for what is checked)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ...policy import CheckpointError

    directory = Path(directory)
    path = directory / MODULES_FILE
    if not path.is_file():
        raise SavedPolicyError(f"{directory} has no {MODULES_FILE}: not a saved baseline policy "
                               "(or its save did not finish)")
    if path.stat().st_size > MAX_MODULES_BYTES:
        raise SavedPolicyError(f"{path} is larger than any {MODULES_FILE} ({MAX_MODULES_BYTES} bytes)")
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise SavedPolicyError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != MODULES_FORMAT or doc.get("version") != MODULES_VERSION:
        raise SavedPolicyError(f"{path} is not a {MODULES_FORMAT} version {MODULES_VERSION} file")
    modules, plan_id = doc.get("modules"), doc.get("qvla_plan_id")
    if not isinstance(modules, dict) or not (plan_id is None or isinstance(plan_id, str)):
        raise SavedPolicyError(f"{path}: 'modules' must be an object and 'qvla_plan_id' a string or null")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"saved policy {directory} has no {name}")
    stored = _stored_tensors(directory / WEIGHTS_FILE)
    skeleton = _skeleton(directory, modules, stored)
    _check_header(skeleton, stored, directory / WEIGHTS_FILE, f"{CONFIG_FILE} and {MODULES_FILE}")
    try:
        state = load_file(directory / WEIGHTS_FILE)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{directory / WEIGHTS_FILE} is corrupt: {exc}") from None
    for name, module in skeleton.named_modules():
        if isinstance(module, MixedBitLinear):
            index, n = state[f"{name}.row_index"], module.out_features
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n
                                  or index.unique().numel() != index.numel()):
                raise CheckpointError(f"{directory / WEIGHTS_FILE}: {name}.row_index is not a set of "
                                      f"distinct channels < {n}")
    policy = _materialize(skeleton, state)
    policy.qvla_plan_id = plan_id
    return policy.eval()
