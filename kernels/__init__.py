"""Mixed-bit GEMM kernels for QVLA's quantized Linear (imported as qvla_ros.kernels)."""
