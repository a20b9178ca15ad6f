#!/usr/bin/env bash
# One call on the GPU machine for the tensor-core small-M kernel: build it (nvcc, once), time it
# beside bf16 and the shipped Triton paths (bench_mma.py), then the GPU tests.
#   OUT=/some/dir bench/kernels/run_mma.sh      (TOKENS=1,16 MIXES=avg4 narrow the benchmark)
# FIXED=1 first fits each one-token kernel's fixed cost and streaming rate (fixed_cost.py); NCU=1
# profiles the gate/up layer's kernels at 1 and 16 tokens with Nsight Compute (profile_kernels.py).
set -o pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench/kernels/results/out}
export PYTHONPATH=. PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
export QVLA_KERNEL_CACHE=${QVLA_KERNEL_CACHE:-/tmp/qvla-kernels}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv | tee "$OUT/log"
t0=$SECONDS
python3 -c "from qvla_ros.kernels.cuda_gemv import mma_available; print('mma built:', mma_available())" 2>&1 | tee -a "$OUT/log"
echo "build after $((SECONDS - t0))s" | tee -a "$OUT/log"
if [ -n "${FIXED:-}" ]; then
  timeout "${FIXED_S:-200}" python3 bench/kernels/fixed_cost.py --out "$OUT" > "$OUT/fixed.log" 2>&1
  echo "fixed_cost rc=$? after $((SECONDS - t0))s" | tee -a "$OUT/log"
  grep -E "fixed|kernel in a graph" "$OUT/fixed.log" | cut -c1-110 | tee -a "$OUT/log"
fi
if [ -n "${NCU:-}" ]; then
  NCU_BIN=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  timeout "${NCU_S:-240}" "$NCU_BIN" --clock-control none -k "regex:gemv|gemm|nvjet|xmma|cutlass" \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    --section MemoryWorkloadAnalysis python3 bench/kernels/profile_kernels.py --mma > "$OUT/ncu.txt" 2>&1
  echo "ncu rc=$? after $((SECONDS - t0))s" | tee -a "$OUT/log"
  grep -E "^  [a-zA-Z_].*\(|Duration|DRAM Throughput|Achieved Occupancy|Registers Per" "$OUT/ncu.txt" \
    | cut -c1-100 | tee -a "$OUT/log"
fi
timeout "${BENCH_S:-240}" python3 bench/kernels/bench_mma.py --out "$OUT" --tokens "${TOKENS:-1,4,8,16}" \
  --mixes "${MIXES:-avg4,avg3,avg8}" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
echo "bench rc=$? after $((SECONDS - t0))s" | tee -a "$OUT/log"
grep -E "decoder|!!|--|total|chosen" "$OUT/bench.log" | cut -c1-220 | tee -a "$OUT/log"
timeout "${TEST_S:-240}" python3 -m pytest -q -n "${TEST_WORKERS:-12}" -p no:cacheprovider ${TESTS:-test/test_kernels_mma_gpu.py} \
  > "$OUT/pytest.log" 2>&1
echo "pytest rc=$? after $((SECONDS - t0))s" | tee -a "$OUT/log"
tail -25 "$OUT/pytest.log" | tee -a "$OUT/log"
