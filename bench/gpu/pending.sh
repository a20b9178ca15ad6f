#!/usr/bin/env bash
# The GPU runs that wait for a card, as one device call: each named step runs under `timeout`
# against one deadline (TOTAL_S from the start), in the order given, and what it measured lands in
# $OUT (at most 8 files come back from a call, so every step's output goes into run.log and only
# result JSONs sit beside it).
#
#   bash bench/gpu/pending.sh gputests serve           (on the device, carry .mwbundle .gl; results in $OUT)
#   bash bench/gpu/pending.sh chain rosnode inloop     (carry .rosbundle for rosnode)
#   SMOKE=1 OUT=/tmp/p PY=.venv/bin/python bash bench/gpu/pending.sh serve chain inloop   # CPU check
#
# Steps (seconds each may take at most, unless the deadline comes first):
#   gputests the kernel, graph and compare GPU tests, direct launches on (#17, #22, #19/#20) 330
#            (an H100 took 204 s with 16 workers on 2026-12-07; 8 workers did not end in 200)
#   serve    bench/serve/serve.py on the published-architecture oft-7b (#17, #18)           380
#   chain    bench/scale/oft7b_chain.py: calibrate -> allocate -> quantize -> fresh load (#18) 330
#   rosnode  bench/ros/gpu_node.sh: the ROS node's graph path on the card (#21)             240
#   inloop   bench/kernels/inloop_probe.py: decode-in-the-GEMM ceilings (#17)               200
#   a8       bench/kernels/a8_probe.py: the decoded-codes int8 GEMM against its peers (#17)   200
set -u
START=$(date +%s)
TOTAL_S=${TOTAL_S:-570}
PY=${PY:-python3}
OUT=${OUT:-/tmp/qvla_pending}
SMOKE=${SMOKE:-0}
mkdir -p "$OUT"
LOG="$OUT/run.log"
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
log() { printf '[pending %4ds] %s\n' "$(( $(date +%s) - START ))" "$*" | tee -a "$LOG" >&2; }

# Runs "$@" for at most $1 seconds, fewer if the deadline is nearer; its output goes to run.log.
budgeted() {
  local want=$1; shift
  local left=$(( TOTAL_S - ($(date +%s) - START) ))
  local limit=$(( want < left ? want : left ))
  if (( limit < 20 )); then log "skipped (deadline): $*"; return 124; fi
  log "run (<= ${limit}s): $*"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  log "rc $rc"
  return $rc
}

{ nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} >>"$LOG" 2>&1

smoke=(); [[ $SMOKE = 1 ]] && smoke=(--smoke)
for step in "$@"; do
  case $step in
    gputests)
      # test_compare_gpu.py needs language_world (qvla_ros.sim's task list) and, for its closed
      # loop, MetaWorld with EGL: carry .mwbundle and .gl (bench/gpu/README.md).
      [[ $SMOKE = 1 ]] || . bench/gpu/device_setup.sh
      budgeted 330 "$PY" -m pytest -q -n 16 -p no:cacheprovider -rfE \
        test/test_kernels_gpu.py test/test_kernels_mma_gpu.py test/test_policy_graphed_gpu.py \
        test/test_kernels_fp8_gpu.py test/test_kernels_inloop_gpu.py test/test_compare_gpu.py ;;
    serve)
      variants=("A16 avg4,A16 avg3,A8 avg4,A8 avg4 decoded,fp8 W8A8 cuBLAS"); [[ $SMOKE = 1 ]] && variants=("A16 avg4")
      budgeted 380 "$PY" bench/serve/serve.py "${smoke[@]}" --skip-layers --variants "${variants[@]}" \
        --out "$OUT/serve_oft7b.json" ;;
    chain)
      budgeted 330 "$PY" bench/scale/oft7b_chain.py "${smoke[@]}" --frames 12 --budgets 4.0,3.0 \
        --gptq-budgets "" --out "$OUT/oft7b_chain.json" ;;
    rosnode)
      # gpu_node.sh writes four files; only its figures come back beside run.log.
      OUT="$OUT/.rosnode" PY="$PY" budgeted 240 bash bench/ros/gpu_node.sh
      cat "$OUT/.rosnode/env.txt" "$OUT/.rosnode/pytest.log" >>"$LOG" 2>/dev/null
      cp "$OUT/.rosnode/ros_node_gpu.json" "$OUT/" 2>/dev/null
      rm -rf "$OUT/.rosnode" ;;
    inloop)
      budgeted 200 "$PY" bench/kernels/inloop_probe.py "${smoke[@]}" --budget 150 --out "$OUT/inloop.json" ;;
    a8)
      budgeted 200 "$PY" bench/kernels/a8_probe.py "${smoke[@]}" --out "$OUT/a8.json" ;;
    *) log "unknown step $step (gputests serve chain rosnode inloop a8)" ;;
  esac
done
# A finished step's final JSON makes its partial copy redundant (and files back are few).
for f in "$OUT"/*.partial.json; do [[ -f ${f%.partial.json}.json ]] && rm -f "$f"; done
log "done; files: $(cd "$OUT" && ls | tr '\n' ' ')"
