"""Mixed-bit GEMM kernels for QVLA's quantized Linear (imported as qvla_ros.kernels).

    weights = prepare_packed(packed_weight, device="cuda")   # once per layer (kernel layout)
    y = mixed_bit_linear(x, weights, bias, act_bits=16 | 8)  # every forward

    layer = PreparedLinear(weights, bias, act_bits)           # once: the lean per-call path
    y = layer(x)                                              # what MixedBitLinear runs

On CUDA tensors `ops.route()` is the whole routing table: 8-bit activations run the grouped GEMM's
int8 path (after one launch that quantizes the activations; opt-in, QVLA_A8_DECODE_MIN_TOKENS=24: from
that many tokens on, one int8 tensor-core GEMM over the layer decoded to int8 codes, triton_a8.py);
with 16-bit activations one token runs the Triton small-M kernel (triton_gemv.py), 2-23 tokens the
grouped GEMM (triton_gemm.py), from DEQUANT_MIN_TOKENS (24) tokens on decode-then-cuBLAS
(triton_dequant.py). QVLA_SMALL_M_KERNEL=gemv|mma (or set_small_m_kernel()) sends 1-16 tokens to
the Triton small-M kernel or to the tensor-core CUDA kernel (mixed_gemv_mma.cu, built by nvcc on
first use). On CPU tensors the same arithmetic runs in plain torch. Triton is imported only when a
CUDA tensor arrives, so this package imports on machines without it.
"""
if __name__ == "kernels":
    # With a source checkout's root on sys.path (`python -m` run there, PYTHONPATH=.) this folder is
    # also importable as a top-level `kernels`, and libraries probe that name: transformers imports
    # it to read the version of Hugging Face's `kernels` package. A second copy of these modules
    # would register the qvla::mixed_bit_linear operator again, bound to its own settings, so
    # set_small_m_kernel() and tile overrides made through qvla_ros.kernels would stop reaching the
    # operator (seen on the H200 as the small-M switch test failing after a checkpoint test). The
    # name therefore resolves to the one package. (A guard against a second copy, not a way in: the
    # package is reached only as qvla_ros.kernels, see qvla_ros/__init__.py.)
    import sys as _sys

    import qvla_ros.kernels as _package

    _sys.modules[__name__] = _package
else:
    from .cuda_gemv import MmaConfig, launch_mma_gemv, mma_available, override_mma_configs, pick_mma_config
    from .layout import KernelWeights, prepare_groups, prepare_packed
    from .ops import (A8_DECODE_MIN_TOKENS, DEQUANT_MIN_TOKENS, GemmConfig, GemvConfig, PreparedLinear,
                      dequant_linear, launch_a8_decoded, launch_dequant, launch_gemv, launch_mixed_gemm,
                      mixed_bit_linear, override_configs, override_gemv_configs, pick_config, pick_gemv_config,
                      quantize_activations, route, runs_dequant_path, runs_small_m_kernel, set_small_m_kernel,
                      small_m_kernel, small_m_route, triton_available)
    from .reference import dequantize_kernel_weights, mixed_bit_linear_reference, quantize_activations_reference

__all__ = [
    "KernelWeights", "prepare_groups", "prepare_packed", "A8_DECODE_MIN_TOKENS", "DEQUANT_MIN_TOKENS",
    "launch_a8_decoded", "GemmConfig", "GemvConfig",
    "PreparedLinear", "dequant_linear", "launch_dequant", "launch_gemv", "route",
    "launch_mixed_gemm", "mixed_bit_linear", "override_configs", "override_gemv_configs", "pick_config",
    "pick_gemv_config", "quantize_activations", "runs_dequant_path", "runs_small_m_kernel",
    "set_small_m_kernel", "small_m_kernel", "small_m_route", "triton_available",
    "MmaConfig", "launch_mma_gemv", "mma_available", "override_mma_configs", "pick_mma_config",
    "dequantize_kernel_weights", "mixed_bit_linear_reference", "quantize_activations_reference",
]
