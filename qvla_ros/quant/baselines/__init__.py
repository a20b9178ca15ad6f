"""The LLM-derived baselines QVLA is compared against, behind one interface.

    quantize_baseline(policy, "rtn-w4" | "rtn-g128-w3" | "sq-w8a8" | "gptq-w4" | "awq-w3" | ...,
                      calibration_batches) -> QuantResult(policy, memory, info)

Every method quantizes the same Linears (the QVLA core's `quantizable_linears`) with the
project's one RTN quantizer and packer where its storage fits MixedBitLinear (per-channel RTN,
SmoothQuant, GPTQ, AWQ), or its own documented packed format where it does not (group-wise RTN,
GPTQ and AWQ, e.g. "gptq-g128-w4": quant/groupwise_linear.py). Memory is measured from the stored tensors (memory.py). `qvla compare`
(sim/compare.py, a benchmark driver above this package) runs them and QVLA at matched memory
through the closed-loop benchmark.
"""
from .api import QuantResult, pack_group_wise, pack_per_channel, quantize_baseline
from ..groupwise_linear import GroupWiseLinear
from .memory import WeightMemory, weight_memory
from .methods import DEFAULT_METHODS, MethodError, MethodSpec, parse_method, resolve_order
from ..input_scaled import InputScaled

__all__ = ["QuantResult", "quantize_baseline", "pack_per_channel", "pack_group_wise",
           "GroupWiseLinear", "InputScaled", "WeightMemory", "weight_memory", "DEFAULT_METHODS",
           "MethodError", "MethodSpec", "parse_method", "resolve_order"]
