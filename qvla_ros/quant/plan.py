"""BitPlan: which bit-width every output channel of every quantized Linear gets, as a file.

One JSON document, readable by people except for the per-channel widths, which are stored as
zlib-compressed base64 of a uint8 array (1.4 M channels of a 7B model take well under 1 MB):

    {
      "format": "qvla-bitplan", "version": 2 | 3,
      "plan_id": "<16 hex digits: sha256 of everything else but 'created'>",
      "created": "<UTC time>",
      "model": {"class": ..., "config": ..., "architecture": "<sha256>", "weights": "<sha256>",
                "params": ...},
      "budget": {"bits_per_param": 4.0, "scope": "whole" | "planned", "counts": "<what a bit is counted for>"},
      "whole": {"params": ..., "rest_bits": ..., "counts": ...} | null,
      "candidate_bits": [0, 2, 3, 4, 8, 16], "row_tile": 16,
      "predicted": {"action_cost": ..., "weight_bytes": ..., "bits_per_param": ..., "params": ...,
                    "whole_bits_per_param": ..., "whole_bytes": ...},
      "provenance": {"calibration": {...}, "allocation": {...}},
      "totals": {"16": rows, "8": rows, ...},
      "layers": [{"name": ..., "in_features": K, "out_features": N, "act_bits": 16,
                  "counts": {"16": rows, ...}, "bits": "<zlib+base64 uint8 [N]>"}, ...]
    }

"bits_per_param" figures without "whole" count the planned layers only. "whole" records the rest of
the policy (accounting.py): every weight of the float policy ("params") and the stored bits of
all weights the plan does not pack ("rest_bits"), so the plan alone gives its bits per parameter
over the WHOLE policy; "budget.scope" says which of the two the budget was given in. Version 1
files (no "whole", budgets over the planned layers) still load, keep their plan id, and are
written back unchanged; their whole-policy figures need the model (`whole_record(model)`).

What a bit is counted for (`layout`): versions 1 and 2 price every row in the packed (contract)
layout (packing.row_bits), which is what the CPU holds and what a checkpoint stores. Version 3
plans price it in the GPU kernels' layout (kernels.layout.resident_row_bits: codes over whole
K-blocks, float32 scale and zero, an int32 output index for every row, plus each layer's slot
table), which is larger for every width, so a version 3 budget holds on the GPU and on the CPU
alike. A packed-priced plan resident on a GPU comes out over its budget by the kernels' padding:
4.030 whole-policy bits for a 4.0 budget on the earlier oft-7b (bench/scale/oft7b_chain.json), and several
times the packed size for 2-bit rows of layers with K < 512 (a K-block is 512 two-bit codes).
"predicted.weight_bytes" is always the packed buffers' size; version 3 adds
"predicted.kernel_layout_bytes".

Loading checks everything and raises PlanError naming the problem: truncated or edited files
(the plan id is a hash of the content), unknown widths, wrong channel counts, row groups that break
the kernels' row tile, and (with a model) a plan made for another architecture or other weights.
Saving is atomic (temp file + rename), so a reader never sees half a plan.
"""
from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from ..io import atomic_write_text
from .accounting import WHOLE_COUNTS, policy_storage, rest_of_policy
from ..kernels.layout import resident_layer_bytes
from .packing import DEFAULT_ROW_TILE, check_row_tile, predicted_nbytes, row_bits
from .quantizer import ACT_BITS, ALL_BITS

PLAN_FORMAT = "qvla-bitplan"
PLAN_VERSION = 2
#: plans whose rows are priced in the GPU kernels' layout (PLAN_VERSION: the packed layout)
KERNEL_LAYOUT_VERSION = 3
#: versions this library reads (version 1: no whole-policy record, budgets over the planned layers;
#: versions 1-2: rows priced in the packed layout, version 3: in the kernels' layout)
READ_VERSIONS = (1, 2, 3)
#: what a plan's figures price its rows in: "packed" (versions 1-2) or "kernel" (version 3)
LAYOUTS = ("packed", "kernel")
BITS_ENCODING = "zlib+base64:uint8"
BUDGET_COUNTS = ("bits of every stored byte of the quantized Linear weights (codes, fp16 scale and zero, "
                 "int32 row_index, bf16 rows) per weight parameter of those layers; biases excluded")
#: what a budget counts, by scope (version 2 files)
SCOPE_COUNTS = {
    "planned": BUDGET_COUNTS,
    "whole": ("bits of every stored byte of the policy's weights per weight parameter of the whole policy: "
              "the quantized Linears packed (codes, fp16 scale and zero, int32 row_index, bf16 rows), "
              "every other weight (other layers, biases, embeddings, norms, action head) at its stored width"),
}
BUDGET_SCOPES = tuple(SCOPE_COUNTS)
#: what a budget counts, by scope (version 3 files: rows priced in the kernels' layout)
KERNEL_LAYOUT_COUNTS = ("bits of every byte the quantized Linear weights take in the GPU kernels' layout (codes "
                        "over whole K-blocks, float32 scale and zero, int32 output index for every row, bf16 "
                        "rows, the layer's slot table)")
SCOPE_COUNTS_V3 = {
    "planned": KERNEL_LAYOUT_COUNTS + " per weight parameter of those layers; biases excluded",
    "whole": (KERNEL_LAYOUT_COUNTS + " plus every other weight of the policy (other layers, biases, embeddings, "
              "norms, action head) at its stored width, per weight parameter of the whole policy"),
}
# Plans larger than this are refused before parsing (a 7B plan is < 2 MB).
MAX_PLAN_BYTES = 256 * 2 ** 20
_CREATED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
# No Linear has more rows or columns than this.
MAX_CHANNELS = 2 ** 26
#: channels a whole plan may declare (a 7B VLA has ~1.4 M; this allows ~50x that): bounds what
#: decoding an edited plan can allocate, whatever its layer count
MAX_TOTAL_CHANNELS = 2 ** 26


class PlanError(ValueError):
    """A bit plan is malformed, inconsistent, or does not belong to the model."""


# ---- model fingerprint ------------------------------------------------------------------------
def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach()
    # Weights are hashed as bfloat16, so the same checkpoint loaded in float32 or bfloat16
    # has the same fingerprint.
    if t.is_floating_point():
        t = t.to(torch.bfloat16)
    return t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Architecture hash (class, parameter names and shapes) and weight hash of a float model."""
    state = model.state_dict()
    arch = hashlib.sha256(type(model).__name__.encode())
    weights = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        arch.update(f"{name}:{tuple(tensor.shape)};".encode())
        weights.update(name.encode())
        weights.update(_tensor_bytes(tensor))
    config = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "config": getattr(config, "name", None) if config is not None else None,
        "architecture": arch.hexdigest(),
        "weights": weights.hexdigest(),
        "params": int(sum(p.numel() for p in model.parameters())),
    }


# ---- bits encoding ----------------------------------------------------------------------------
def _encode_bits(bits: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(bits.astype(np.uint8).tobytes(), 9)).decode("ascii")


def _decode_bits(text: str, where: str, expected: int) -> np.ndarray:
    if not isinstance(text, str):
        raise PlanError(f"{where}: 'bits' must be a {BITS_ENCODING} string")
    try:
        packed = base64.b64decode(text.encode("ascii"), validate=True)
        # Never inflate more than the layer can hold: a small edited payload cannot blow up memory.
        inflater = zlib.decompressobj()
        raw = inflater.decompress(packed, expected + 1)
    except (binascii.Error, zlib.error, UnicodeEncodeError, ValueError) as exc:
        raise PlanError(f"{where}: 'bits' is not valid {BITS_ENCODING} ({exc}); the file was edited or damaged") from None
    if len(raw) > expected:
        raise PlanError(f"{where}: 'bits' holds more than {expected} channel widths")
    return np.frombuffer(raw, dtype=np.uint8).copy()


def _counts(bits: np.ndarray) -> dict[int, int]:
    return {b: int(np.count_nonzero(bits == b)) for b in ALL_BITS}


@dataclass
class LayerPlan:
    """Widths of one Linear's output channels (bits: uint8 [out_features], values in ALL_BITS)."""
    name: str
    in_features: int
    out_features: int
    bits: np.ndarray
    act_bits: int = 16
    #: how weight_bits prices the rows: "packed" (the contract layout, plan versions 1-2) or
    #: "kernel" (kernels.layout, version 3); set by the BitPlan holding the layer
    layout: str = "packed"

    def __post_init__(self) -> None:
        self.bits = np.asarray(self.bits)
        where = f"layer {self.name!r}"
        if self.bits.ndim != 1 or self.bits.shape[0] != self.out_features:
            raise PlanError(f"{where}: {self.bits.size} channel widths for {self.out_features} output channels")
        if self.bits.size and (not np.all(np.isin(self.bits, ALL_BITS))):
            unknown = sorted(set(np.unique(self.bits).tolist()) - set(ALL_BITS))
            raise PlanError(f"{where}: unknown bit-widths {unknown}; allowed {list(ALL_BITS)}")
        self.bits = self.bits.astype(np.uint8)
        if self.act_bits not in ACT_BITS:
            raise PlanError(f"{where}: activation bits {self.act_bits!r} not in {list(ACT_BITS)}")
        if self.in_features <= 0 or self.out_features <= 0:
            raise PlanError(f"{where}: bad shape in_features={self.in_features}, out_features={self.out_features}")

    @property
    def counts(self) -> dict[int, int]:
        return _counts(self.bits)

    @property
    def params(self) -> int:
        return self.in_features * self.out_features

    def weight_bits(self) -> int:
        """Bits of this layer's weights as its plan prices them (see `layout`)."""
        if self.layout == "kernel":
            return resident_layer_bytes(self.counts, self.in_features) * 8
        return sum(row_bits(b, self.in_features) * n for b, n in self.counts.items())

    def weight_nbytes(self) -> int:
        return predicted_nbytes(self.counts, self.in_features)


@dataclass
class BitPlan:
    """A bit plan for one model (see the module docstring for the file)."""
    layers: dict[str, LayerPlan]
    model: dict[str, Any]
    budget_bits_per_param: float | None = None
    row_tile: int = DEFAULT_ROW_TILE
    candidate_bits: tuple[int, ...] = ALL_BITS
    action_cost: float | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    #: the rest of the policy, {"params": every weight, "rest_bits": stored bits of what the plan
    #: does not pack} (accounting.rest_of_policy), or None when unknown
    whole: dict[str, int] | None = None
    #: what budget_bits_per_param counts: "whole" policy or "planned" layers
    budget_scope: str = "planned"
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        if self.version not in READ_VERSIONS:
            raise PlanError(f"plan version {self.version!r}; this library reads versions {list(READ_VERSIONS)}")
        if self.budget_scope not in BUDGET_SCOPES:
            raise PlanError(f"budget scope {self.budget_scope!r} is not one of {list(BUDGET_SCOPES)}")
        if self.version == 1 and (self.whole is not None or self.budget_scope != "planned"):
            raise PlanError("a version 1 plan has no whole-policy record and budgets over the planned layers only")
        if self.whole is not None:
            whole = self.whole
            if not isinstance(whole, Mapping) or any(
                    isinstance(whole.get(k), bool) or not isinstance(whole.get(k), int) for k in ("params", "rest_bits")):
                raise PlanError(f"'whole' must hold integer 'params' and 'rest_bits', got {whole!r}")
            if whole["rest_bits"] < 0 or whole["params"] < self.params:
                raise PlanError(f"'whole' says the policy has {whole['params']} weights and {whole['rest_bits']} "
                                f"other bits, but the planned layers alone have {self.params} weights")
            self.whole = {"params": int(whole["params"]), "rest_bits": int(whole["rest_bits"])}
        elif self.budget_scope == "whole":
            raise PlanError("a budget over the whole policy needs the plan's whole-policy record ('whole')")
        for layer in self.layers.values():
            layer.layout = self.layout
            try:
                check_row_tile(layer.counts, layer.out_features, self.row_tile)
            except ValueError as exc:
                raise PlanError(f"layer {layer.name!r}: {exc}") from None
            extra = set(np.unique(layer.bits).tolist()) - set(self.candidate_bits)
            if extra:
                raise PlanError(f"layer {layer.name!r} uses widths {sorted(extra)} outside the plan's "
                                f"candidate_bits {list(self.candidate_bits)}")

    # ---- derived figures ----------------------------------------------------------------------
    @property
    def layout(self) -> str:
        """What the plan's figures price rows in: "packed" (CPU, checkpoint) or "kernel" (GPU)."""
        return "kernel" if self.version >= KERNEL_LAYOUT_VERSION else "packed"

    @property
    def params(self) -> int:
        return sum(l.params for l in self.layers.values())

    def weight_nbytes(self) -> int:
        """Predicted bytes of the packed weights of all planned layers (biases excluded)."""
        return sum(l.weight_nbytes() for l in self.layers.values())

    def weight_bits(self) -> int:
        """Bits of the planned layers' weights in the plan's layout (see `layout`)."""
        return sum(l.weight_bits() for l in self.layers.values())

    def bits_per_param(self) -> float:
        """Bits per weight parameter of the PLANNED layers (see whole_bits_per_param)."""
        return self.weight_bits() / max(self.params, 1)

    def whole_record(self, model: nn.Module | None = None) -> dict[str, int] | None:
        """The rest of the policy: the plan's own record, else (version 1 plans) measured on the
        float `model` the plan was made for; None when neither is there."""
        if self.whole is not None:
            return dict(self.whole)
        if model is None:
            return None
        try:
            return rest_of_policy(policy_storage(model), {n: l.params for n, l in self.layers.items()})
        except ValueError as exc:
            raise PlanError(f"bit plan {self.plan_id}: {exc}") from None

    def whole_bits_per_param(self, model: nn.Module | None = None) -> float | None:
        """Bits per weight parameter of the WHOLE policy: the planned layers packed, every other
        weight at its stored width (accounting.py); None when the rest of the policy is unknown."""
        whole = self.whole_record(model)
        return None if whole is None else (self.weight_bits() + whole["rest_bits"]) / whole["params"]

    def whole_nbytes(self, model: nn.Module | None = None) -> int | None:
        """Predicted bytes of every weight of the quantized policy (None when unknown)."""
        whole = self.whole_record(model)
        return None if whole is None else (self.weight_bits() + whole["rest_bits"] + 7) // 8

    def totals(self) -> dict[int, int]:
        out = {b: 0 for b in ALL_BITS}
        for layer in self.layers.values():
            for b, n in layer.counts.items():
                out[b] += n
        return out

    def row_bits(self) -> dict[str, torch.Tensor]:
        """{layer name: int64 [out_features] width of each output row}, as quantizers take them."""
        return {name: torch.from_numpy(layer.bits.astype(np.int64)) for name, layer in self.layers.items()}

    @property
    def plan_id(self) -> str:
        return _content_id(self._document(with_id=False))

    # ---- serialization ------------------------------------------------------------------------
    def _document(self, with_id: bool = True) -> dict[str, Any]:
        predicted = {"action_cost": self.action_cost, "weight_bytes": self.weight_nbytes(),
                     "bits_per_param": round(self.bits_per_param(), 6), "params": self.params}
        if self.version == 1:  # written back exactly as read: same content, same plan id
            budget = {"bits_per_param": self.budget_bits_per_param, "counts": BUDGET_COUNTS}
            extra: dict[str, Any] = {}
        else:
            counts = (SCOPE_COUNTS if self.version == 2 else SCOPE_COUNTS_V3)[self.budget_scope]
            budget = {"bits_per_param": self.budget_bits_per_param, "scope": self.budget_scope, "counts": counts}
            if self.layout == "kernel":
                budget["layout"] = "kernel"
            extra = {"whole": None if self.whole is None else {**self.whole, "counts": WHOLE_COUNTS}}
            whole_bpp = self.whole_bits_per_param()
            predicted.update({"whole_bits_per_param": None if whole_bpp is None else round(whole_bpp, 6),
                              "whole_bytes": self.whole_nbytes()})
            if self.version >= 3:
                predicted["kernel_layout_bytes"] = self.weight_bits() // 8
        doc: dict[str, Any] = {
            "format": PLAN_FORMAT,
            "version": self.version,
            "model": self.model,
            "budget": budget,
            **extra,
            "candidate_bits": list(self.candidate_bits),
            "row_tile": self.row_tile,
            "predicted": predicted,
            "provenance": self.provenance,
            "totals": {str(b): n for b, n in self.totals().items()},
            "layers": [{"name": l.name, "in_features": l.in_features, "out_features": l.out_features,
                        "act_bits": l.act_bits, "counts": {str(b): n for b, n in l.counts.items()},
                        "bits": _encode_bits(l.bits)} for l in self.layers.values()],
        }
        if not with_id:
            return doc
        return {"format": PLAN_FORMAT, "version": self.version, "plan_id": _content_id(doc),
                "created": self.created or _now(), **{k: v for k, v in doc.items() if k not in ("format", "version")}}

    def to_json(self) -> str:
        return json.dumps(self._document(), indent=1, sort_keys=False) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan atomically (temp file in the same folder, then rename)."""
        return atomic_write_text(path, self.to_json())

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> "BitPlan":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"{source} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                            "the file is truncated or not a bit plan") from None
        except RecursionError:
            raise PlanError(f"{source} nests too deeply to be a bit plan") from None
        return cls.from_document(doc, source)

    @classmethod
    def from_document(cls, doc: Any, source: str = "plan") -> "BitPlan":
        if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
            raise PlanError(f"{source} is not a {PLAN_FORMAT} file")
        version = doc.get("version")
        if isinstance(version, bool) or version not in READ_VERSIONS:
            raise PlanError(f"{source} has plan version {version!r}; this library reads versions {list(READ_VERSIONS)}")
        _require(doc, {"plan_id": str, "model": dict, "budget": dict, "candidate_bits": list, "row_tile": int,
                       "predicted": dict, "provenance": dict, "layers": list}, source)
        whole, scope = None, "planned"
        if version >= 2:
            if "whole" not in doc:
                raise PlanError(f"{source} lacks 'whole'")
            whole = doc["whole"]
            if whole is not None and not isinstance(whole, dict):
                raise PlanError(f"{source}: 'whole' must be an object or null, got {type(whole).__name__}")
            if whole is not None:
                whole = {k: v for k, v in whole.items() if k != "counts"}
            scope = doc["budget"].get("scope")
            if scope not in BUDGET_SCOPES:
                raise PlanError(f"{source}: 'budget.scope' must be one of {list(BUDGET_SCOPES)}, got {scope!r}")
        candidates = tuple(doc["candidate_bits"])
        unknown = [b for b in candidates if b not in ALL_BITS]
        if unknown or not candidates:
            raise PlanError(f"{source}: unknown candidate bit-widths {unknown}; allowed {list(ALL_BITS)}")
        if doc["row_tile"] < 1:
            raise PlanError(f"{source}: row_tile must be >= 1, got {doc['row_tile']}")
        layers: dict[str, LayerPlan] = {}
        declared = 0
        for i, entry in enumerate(doc["layers"]):
            where = f"{source}: layer #{i}"
            if not isinstance(entry, dict):
                raise PlanError(f"{where} is not an object")
            _require(entry, {"name": str, "in_features": int, "out_features": int, "act_bits": int,
                             "counts": dict, "bits": str}, where)
            where = f"{source}: layer {entry['name']!r}"
            if entry["name"] in layers:
                raise PlanError(f"{where} appears twice")
            if not 0 < entry["out_features"] <= MAX_CHANNELS or not 0 < entry["in_features"] <= MAX_CHANNELS:
                raise PlanError(f"{where}: shape {entry['out_features']} x {entry['in_features']} is out of range")
            declared += entry["out_features"]
            if declared > MAX_TOTAL_CHANNELS:
                raise PlanError(f"{source}: its layers declare more than {MAX_TOTAL_CHANNELS} output "
                                "channels in all; not a plan for a model this library can build")
            bits = _decode_bits(entry["bits"], where, entry["out_features"])
            try:
                layer = LayerPlan(entry["name"], entry["in_features"], entry["out_features"], bits, entry["act_bits"])
            except PlanError as exc:
                raise PlanError(f"{source}: {exc}") from None
            stated = {int(b): n for b, n in entry["counts"].items() if str(b).isdigit()}
            if stated != layer.counts:
                raise PlanError(f"{where}: its 'counts' {stated} disagree with its bits {layer.counts}; "
                                "the file was edited")
            layers[layer.name] = layer
        budget = doc["budget"].get("bits_per_param")
        cost = doc["predicted"].get("action_cost")
        for label, value in (("budget.bits_per_param", budget), ("predicted.action_cost", cost)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise PlanError(f"{source}: '{label}' must be a number or null, got {type(value).__name__}")
        try:
            plan = cls(layers=layers, model=doc["model"], budget_bits_per_param=budget,
                       row_tile=doc["row_tile"], candidate_bits=candidates,
                       action_cost=cost, provenance=doc["provenance"],
                       created=str(doc.get("created", "")), whole=whole, budget_scope=scope, version=version)
        except PlanError as exc:
            raise PlanError(f"{source}: {exc}") from None
        created = doc.get("created", "")
        if not isinstance(created, str) or (created and not _CREATED.fullmatch(created)):
            raise PlanError(f"{source}: 'created' is not a UTC time stamp like 2026-01-31T12:00:00Z")
        # Any other edit (a count, a figure, provenance) shows as a hash that no longer matches.
        stated_id = doc["plan_id"]
        try:
            actual_id = _content_id({k: v for k, v in doc.items() if k not in ("plan_id", "created")})
            recomputed = plan.plan_id
        except ValueError as exc:  # NaN or Infinity written into the file
            raise PlanError(f"{source}: holds a value JSON cannot represent ({exc}); the file was edited") from None
        if actual_id != stated_id or recomputed != stated_id:
            raise PlanError(f"{source}: content does not match its plan_id {stated_id!r} "
                            f"(hash of content is {actual_id!r}); the file was edited or damaged")
        return plan

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> "BitPlan":
        """Read and validate a plan file; with `model`, also check that it belongs to that model."""
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"no bit plan file at {path}")
        size = path.stat().st_size
        if size > MAX_PLAN_BYTES:
            raise PlanError(f"{path} is {size} bytes, larger than any bit plan ({MAX_PLAN_BYTES})")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PlanError(f"{path} is not UTF-8 text; not a bit plan") from None
        plan = cls.from_json(text, source=str(path))
        if model is not None:
            plan.check_model(model)
        return plan

    # ---- checks against a model ---------------------------------------------------------------
    def check_model(self, model: nn.Module, check_weights: bool = True,
                    fingerprint: Mapping[str, Any] | None = None) -> None:
        """Raise PlanError unless this plan was made for `model` (architecture, weights, layer shapes)."""
        fp = dict(fingerprint) if fingerprint is not None else model_fingerprint(model)
        if fp["architecture"] != self.model.get("architecture"):
            raise PlanError(
                f"bit plan {self.plan_id} was made for another model: architecture "
                f"{str(self.model.get('architecture'))[:12]} ({self.model.get('class')}, config "
                f"{self.model.get('config')!r}), this model is {fp['architecture'][:12]} "
                f"({fp['class']}, config {fp['config']!r})")
        if check_weights and fp["weights"] != self.model.get("weights"):
            raise PlanError(f"bit plan {self.plan_id} was made for other weights of this architecture "
                            f"(weights {str(self.model.get('weights'))[:12]}, this model "
                            f"{fp['weights'][:12]}): its sensitivities do not describe this checkpoint")
        self.check_layers(model)

    def check_layers(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        for layer in self.layers.values():
            module = modules.get(layer.name)
            if module is None:
                raise PlanError(f"bit plan names layer {layer.name!r}, which the model does not have")
            shape = (getattr(module, "out_features", None), getattr(module, "in_features", None))
            if shape != (layer.out_features, layer.in_features):
                raise PlanError(f"layer {layer.name!r}: the plan has {layer.out_features} x {layer.in_features}, "
                                f"the model {shape[0]} x {shape[1]}")

    # ---- people -------------------------------------------------------------------------------
    def summary(self, model: nn.Module | None = None) -> str:
        """One line for people; `model` (the float policy) gives a version 1 plan its whole-policy figure."""
        totals = self.totals()
        n = sum(totals.values())
        widths = ", ".join(f"{b}b {100 * totals[b] / max(n, 1):.1f}%" for b in sorted(totals, reverse=True))
        cost = "n/a" if self.action_cost is None else f"{self.action_cost:.4g}"
        budget = ("n/a" if self.budget_bits_per_param is None
                  else f"{self.budget_bits_per_param:g} over the {'whole policy' if self.budget_scope == 'whole' else 'planned layers'}")
        whole = self.whole_record(model)
        if whole is None:
            overall = "whole policy: unknown (no record of the rest of the policy)"
        else:
            overall = (f"{self.whole_bits_per_param(model):.3f} bits/param over the whole policy "
                       f"({whole['params']} params, the rest at its stored width; "
                       f"{self.whole_nbytes(model) / 2 ** 20:.3f} MiB)")
        return (f"BitPlan {self.plan_id}: {len(self.layers)} layers, {n} channels, "
                f"{self.bits_per_param():.3f} bits/param over the planned layers ({self.params} params, "
                f"{self.weight_nbytes() / 2 ** 20:.3f} MiB packed), {overall}; budget {budget}; "
                f"rows: {widths}; predicted action cost {cost}")


def _require(doc: Mapping[str, Any], keys: Mapping[str, type], where: str) -> None:
    for key, kind in keys.items():
        if key not in doc:
            raise PlanError(f"{where} lacks '{key}'")
        value = doc[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise PlanError(f"{where}: '{key}' must be {kind.__name__}, got {type(value).__name__}")


def _content_id(doc: Mapping[str, Any]) -> str:
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def plan_from_bits(model: nn.Module, bits: Mapping[str, Iterable[int] | np.ndarray | torch.Tensor], *,
                   act_bits: int | Mapping[str, int] = 16, row_tile: int = DEFAULT_ROW_TILE,
                   budget_bits_per_param: float | None = None, action_cost: float | None = None,
                   candidate_bits: tuple[int, ...] = ALL_BITS, provenance: Mapping[str, Any] | None = None,
                   fingerprint: Mapping[str, Any] | None = None, budget_scope: str = "planned") -> BitPlan:
    """A BitPlan for `model` (the float policy) from {layer name: per-channel widths} (e.g. a
    uniform baseline), with its whole-policy record measured on `model`."""
    modules = dict(model.named_modules())
    layers = {}
    for name, b in bits.items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise PlanError(f"{name!r} is not a Linear layer of the model")
        arr = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b)
        if arr.ndim == 0:
            arr = np.full(module.out_features, int(arr))
        layer_act = act_bits[name] if isinstance(act_bits, Mapping) else act_bits
        layers[name] = LayerPlan(name, module.in_features, module.out_features, arr, int(layer_act))
    whole = rest_of_policy(policy_storage(model), {n: l.params for n, l in layers.items()})
    return BitPlan(layers=layers, model=dict(fingerprint or model_fingerprint(model)),
                   budget_bits_per_param=budget_bits_per_param, row_tile=row_tile,
                   candidate_bits=tuple(candidate_bits), action_cost=action_cost,
                   provenance=dict(provenance or {}), whole=whole, budget_scope=budget_scope)
