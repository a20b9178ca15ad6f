"""QVLA at a given memory: the QVLA core's calibrate -> allocate -> quantize_, nothing re-implemented.

`qvla compare` builds one `QvlaRunner` over the same calibration frames the baselines use and
calls it with a budget equal to a baseline's MEASURED bits/param, so both sides are charged for
every stored byte (codes, scales, zeros, row indices, group scales, explicit input scales).
The action-space sensitivity table depends only on the float policy and the frames: it is measured
once and cached (in memory, and on disk when `cache_dir` is given).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import nn

from ..allocate import allocate
from ..api import quantize_
from ..calibration import CalibrationFrames
from ..plan import model_fingerprint
from ..quantizer import ALL_BITS
from ..sensitivity import SensitivityTable, exact_sensitivity, jacobian_sensitivity
from ..targets import quantizable_linears
from .gptq import apply_gptq, gptq_weight_deltas
from .methods import MethodSpec

ESTIMATORS = ("jacobian", "exact")


class QvlaRunner:
    """Callable (policy, batches, spec, budget) -> info with the applied plan under "plan".

    Args:
        frames: the calibration frames (the baselines get the same frames as batches).
        estimator: "jacobian" (first order, one backward per projection) or "exact".
        projections: the jacobian estimator's random projections of the action chunk per frame
            (None: its default, every action number when the chunk has at most 64).
        cache_dir: where sensitivity tables are kept between runs (None: memory only).
        max_prune_fraction: the allocator's cap on pruned rows per layer.
        layout: how the allocator prices a row: "packed" (the packed buffers, what a CPU holds
            and a checkpoint stores) or "kernel" (what the GPU kernels hold resident: fp32 scales
            and zeros, K padded to whole blocks). None: the layout of the device the policy is
            on, the one whose bytes `weight_memory` then measures, so QVLA's measured memory keeps
            to the matched baseline's.
    """

    def __init__(self, frames: CalibrationFrames, *, estimator: str = "jacobian",
                 cache_dir: str | Path | None = None, max_prune_fraction: float = 0.5,
                 projections: int | None = None, seed: int = 0, progress: bool = True,
                 layout: str | None = None):
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if layout not in (None, "packed", "kernel"):
            raise ValueError(f"layout must be 'packed', 'kernel' or None (by device), got {layout!r}")
        self.layout = layout
        self.frames = frames
        self.estimator = estimator
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.max_prune_fraction = max_prune_fraction
        self.projections = projections
        self.seed = seed
        self.progress = progress
        self._tables: dict[str, SensitivityTable] = {}

    def table_key(self, policy: nn.Module, rounding: str = "rtn") -> str:
        doc = {"weights": model_fingerprint(policy)["weights"], "frames": self.frames.source,
               "n_frames": len(self.frames), "estimator": self.estimator, "seed": self.seed}
        if rounding != "rtn":
            doc["rounding"] = rounding
        if self.projections is not None:
            doc["projections"] = self.projections
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def sensitivity(self, policy: nn.Module, rounding: str = "rtn",
                    batches: Sequence[Mapping] = ()) -> SensitivityTable:
        """The action-space sensitivity table of the float `policy` (cached), for rows rounded the
        way they will be stored: to nearest, or by GPTQ (then S measures GPTQ's rows at each
        width, from `batches`' input Hessians; jacobian estimator only)."""
        key = self.table_key(policy, rounding)
        if key in self._tables:
            return self._tables[key]
        path = None if self.cache_dir is None else self.cache_dir / f"sensitivity-{key}.safetensors"
        if path is not None and path.is_file():
            table = SensitivityTable.load(path)
        else:
            if rounding == "gptq":
                if self.estimator != "jacobian":
                    raise ValueError("QVLA with GPTQ rows measures sensitivity with the jacobian "
                                     f"estimator; this runner uses {self.estimator!r}")
                modules = quantizable_linears(policy)
                deltas = gptq_weight_deltas(policy, modules, batches, ALL_BITS, progress=self.progress)
                table = jacobian_sensitivity(policy, self.frames, bits=ALL_BITS, layers=list(modules),
                                             deltas=deltas, projections=self.projections, seed=self.seed,
                                             progress=self.progress)
                table.meta["rounding"] = "gptq"
            else:
                if self.estimator == "jacobian":
                    table = jacobian_sensitivity(policy, self.frames, projections=self.projections,
                                                 seed=self.seed, progress=self.progress)
                else:
                    table = exact_sensitivity(policy, self.frames, seed=self.seed, progress=self.progress)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                table.save(path)
        self._tables[key] = table
        return table

    def __call__(self, policy: nn.Module, batches: Sequence[Mapping], spec: MethodSpec,
                 budget: float) -> dict:
        table = self.sensitivity(policy, spec.rounding, batches)
        layout = self.layout or ("kernel" if next(policy.parameters()).device.type == "cuda" else "packed")
        result = allocate(table, budget, max_prune_fraction=self.max_prune_fraction, layout=layout,
                          scope=spec.scope)
        plan = result.to_plan(table, act_bits=spec.abits,
                              provenance={"method": spec.name, "rounding": spec.rounding})
        info = {}
        if spec.rounding == "gptq":
            # The widths were chosen for GPTQ's rows; GPTQ now rounds them on the already-quantized
            # prefix (as it does alone). Same grid per row, so the packed bytes are the plan's; the
            # weights then differ from the float ones the plan names.
            modules = {n: policy.get_submodule(n) for n in plan.layers}
            rel = apply_gptq(policy, modules, batches, plan.row_bits(), progress=self.progress)
            info["mean_relative_layer_error"] = sum(rel.values()) / len(rel)
            quantize_(policy, plan, check_weights=False)
        else:
            quantize_(policy, plan)
        return {"plan": plan, "plan_id": plan.plan_id, "budget_bits_per_param": budget,
                "estimator": self.estimator, "rounding": spec.rounding, "allocation": result.report(),
                "bits_histogram": {str(b): n for b, n in plan.totals().items()}, **info}
