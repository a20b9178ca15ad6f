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
