#!/usr/bin/env bash
# One call on the GPU machine: the GPU tests and the kernels' compilation side by side (both are
# CPU-bound: Triton compiles one kernel per process), then the benchmark alone on the card.
#   OUT=/some/dir bench/kernels/run_gpu.sh
set -o pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench/kernels/out}
export PYTHONPATH=. PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv | tee "$OUT/log"
t0=$SECONDS
python3 bench/kernels/bench_kernels.py --warm --workers "${WARM_WORKERS:-8}" > "$OUT/warm.log" 2>&1 &
warm=$!
timeout 240 python3 -m pytest -q -n "${TEST_WORKERS:-6}" -p no:cacheprovider test/test_kernels_gpu.py > "$OUT/pytest.log" 2>&1
echo "pytest rc=$? after $((SECONDS - t0))s" | tee -a "$OUT/log"
tail -25 "$OUT/pytest.log" | tee -a "$OUT/log"
wait $warm
echo "warm rc=$? after $((SECONDS - t0))s" | tee -a "$OUT/log"
python3 bench/kernels/bench_kernels.py --out "$OUT" 2>&1 | tee -a "$OUT/log"
echo "bench done after $((SECONDS - t0))s" | tee -a "$OUT/log"
# Nsight Compute on one launch of each kind (gate/up, avg4: 1 token A16, 590 tokens A8)
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
  timeout 150 "$NCU" --clock-control none -k regex:mixed_gemm --launch-count 2 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis_Tables python3 bench/kernels/profile_kernels.py > "$OUT/ncu.txt" 2>&1
  echo "ncu rc=$? after $((SECONDS - t0))s" | tee -a "$OUT/log"
fi
