"""QVLA: action-centric, channel-wise mixed-bit quantization of VLA policies.

    frames -> sensitivity.py (S[layer][channel][bits], in action space)
           -> allocate.py    (global knapsack under a bits-per-parameter budget)
           -> plan.py        (BitPlan file)
           -> api.py         (quantize_(policy, plan): packed MixedBitLinear layers)
           -> checkpoint.py  (save_quantized / load_quantized: the one quantized-checkpoint format)

The packed layout (packing.py) and the one weight quantizer (quantizer.py) are shared with the
baselines and the GPU kernels. Names are imported lazily so `import qvla_ros.quant` stays cheap.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "quantize_rows": "quantizer", "dequantize_rows": "quantizer", "fake_quantize_rows": "quantizer",
    "fake_quantize_activations": "quantizer", "ALL_BITS": "quantizer", "QUANT_BITS": "quantizer",
    "PackedWeight": "packing", "PackedGroup": "packing", "pack_codes": "packing",
    "unpack_codes": "packing", "row_bits": "packing", "predicted_nbytes": "packing",
    "MixedBitLinear": "mixed_linear",
    "BitPlan": "plan", "PlanError": "plan", "LayerPlan": "plan", "model_fingerprint": "plan",
    "QuantTargets": "targets", "quantizable_linears": "targets",
    "quantize_": "api", "load_quantized_policy": "api", "save_quantized": "checkpoint",
    "load_quantized": "checkpoint", "quantized_weight_nbytes": "api",
    "SensitivityTable": "sensitivity", "exact_sensitivity": "sensitivity",
    "jacobian_sensitivity": "sensitivity",
    "rescale_to_exact": "sensitivity", "compare_tables": "sensitivity",
    "allocate": "allocate", "Allocation": "allocate", "BudgetError": "allocate",
    "plan_from_bits": "plan", "CalibrationFrames": "calibration", "frames_from_demos": "calibration",
    "set_dequant_cache": "api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qvla_ros.quant' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
