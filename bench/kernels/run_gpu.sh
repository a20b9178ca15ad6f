#!/usr/bin/env bash
# One call on the GPU machine: the GPU tests and the kernels' compilation side by side (both are
# CPU-bound: Triton compiles one kernel per process), then the benchmark alone on the card.
#   OUT=/some/dir bench/kernels/run_gpu.sh              # everything (runs 1 and 2)
#   SMALL_M=1 OUT=/some/dir bench/kernels/run_gpu.sh    # run 3: 1 and 16 tokens, the grouped GEMM next
#                                                       # to the small-M kernel (triton_gemv.py) and bf16
set -o pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench/kernels/results/out}
export PYTHONPATH=. PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
mkdir -p "$OUT"
MODE=()
TESTS=(test/test_kernels_gpu.py)
if [ -n "${SMALL_M:-}" ]; then
  MODE=(--small-m)
  TESTS=(test/test_kernels_gpu.py -k "gemv or one_copy or small_m or every_mix")
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv | tee "$OUT/log"
t0=$SECONDS
python3 bench/kernels/bench_kernels.py --warm --workers "${WARM_WORKERS:-8}" "${MODE[@]}" > "$OUT/warm.log" 2>&1 &
warm=$!
timeout 240 python3 -m pytest -q -n "${TEST_WORKERS:-6}" -p no:cacheprovider "${TESTS[@]}" > "$OUT/pytest.log" 2>&1
echo "pytest rc=$? after $((SECONDS - t0))s" | tee -a "$OUT/log"
tail -25 "$OUT/pytest.log" | tee -a "$OUT/log"
wait $warm
echo "warm rc=$? after $((SECONDS - t0))s" | tee -a "$OUT/log"
grep -c FAILED "$OUT/warm.log" | xargs echo "warm failures:" | tee -a "$OUT/log"
python3 bench/kernels/bench_kernels.py --out "$OUT" "${MODE[@]}" 2>&1 | tee -a "$OUT/log"
echo "bench done after $((SECONDS - t0))s" | tee -a "$OUT/log"
# Nsight Compute on one launch of each kind (gate/up, avg4): 1 token A16 and 590 tokens A8 with the
# grouped GEMM; with SMALL_M, 1 and 16 tokens with both kernels
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
  timeout 150 "$NCU" --clock-control none -k "regex:mixed_gemm|gemv_kernel" --launch-count "${NCU_LAUNCHES:-4}" \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis_Tables python3 bench/kernels/profile_kernels.py "${MODE[@]}" \
    > "$OUT/ncu.txt" 2>&1
  echo "ncu rc=$? after $((SECONDS - t0))s" | tee -a "$OUT/log"
fi
