"""Mixed-bit GEMM kernels for QVLA's quantized Linear (imported as qvla_ros.kernels).

    weights = prepare_packed(packed_weight, device="cuda")   # once per layer (kernel layout)
    y = mixed_bit_linear(x, weights, bias, act_bits=16 | 8)  # every forward

On CUDA tensors the layer is one Triton launch over all its bit groups (plus one for the int8
activations when act_bits=8); up to 16 tokens with 16-bit activations either the grouped GEMM or the
small-M kernel (triton_gemv.py) runs it, as QVLA_SMALL_M_KERNEL=auto|gemm|gemv or
set_small_m_kernel() says (auto: the small-M kernel for one token, where it timed fastest on the
H200); on CPU tensors the same arithmetic runs in plain torch. Triton is imported only when a
CUDA tensor arrives, so this package imports on machines without it.
"""
from .layout import KernelWeights, prepare_groups, prepare_packed
from .ops import (GemmConfig, GemvConfig, launch_gemv, launch_mixed_gemm, mixed_bit_linear, override_configs,
                  override_gemv_configs, pick_config, pick_gemv_config, quantize_activations, set_small_m_kernel,
                  runs_small_m_kernel, small_m_kernel, triton_available)
from .reference import dequantize_kernel_weights, mixed_bit_linear_reference, quantize_activations_reference

__all__ = [
    "KernelWeights", "prepare_groups", "prepare_packed", "GemmConfig", "GemvConfig", "launch_gemv",
    "launch_mixed_gemm", "mixed_bit_linear", "override_configs", "override_gemv_configs", "pick_config",
    "pick_gemv_config", "quantize_activations", "runs_small_m_kernel", "set_small_m_kernel", "small_m_kernel",
    "triton_available",
    "dequantize_kernel_weights", "mixed_bit_linear_reference", "quantize_activations_reference",
]
