#!/usr/bin/env bash
# One device call (nvidia-h200, 16 CPU cores): the closed-loop comparison of QVLA against the
# baselines on the shipped policy (`qvla compare`), run where there are enough cores for it.
#
# Run from the repository root, on the device (carry: .mwbundle .gl; results land in $OUT):
#   EPS=20 TOTAL_S=480 bash bench/gpu/final_evals.sh
# Local dry run of the logic:
#   OUT=/tmp/o WORK=/tmp/w EPS=1 DEMO_EPS=1 TASKS=drawer-open WORKERS=2 SETUP=0 PY=.venv/bin/python \
#   METHODS=fp,rtn-w4 bash bench/gpu/final_evals.sh
#
# Setup (MetaWorld bundle, GL loaders) comes from device_setup.sh, as for train_tiny.sh. Every
# stage runs under one deadline, and `qvla compare` caches each finished method, so the call always ends with what
# finished packed into $OUT/compare.tgz.
set -u
START=$(date +%s)
TOTAL_S=${TOTAL_S:-480}
OUT=${OUT:-/tmp/qvla_out}
WORK=${WORK:-/tmp/qvla_work}
PY=${PY:-python3}
WORKERS=${WORKERS:-16}
EPS=${EPS:-20}
DEMO_EPS=${DEMO_EPS:-10}
TASKS=${TASKS:-}
METHODS=${METHODS:-fp,qvla-b4.0,qvla-b3.0,rtn-w4,rtn-w3,gptq-w4,gptq-w3,awq-w4,awq-w3,sq-w8a8,sq-w4a8}
mkdir -p "$OUT" "$WORK"
LOG=$OUT/log.txt
log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
task_args=(); [ -n "$TASKS" ] && task_args=(--tasks "$TASKS")

. bench/gpu/device_setup.sh
log "setup done; $(nvidia-smi -L 2>/dev/null | head -1); $(nproc) cores; $(lscpu 2>/dev/null | grep 'Model name' | head -1)"

# Calibration ('train' split) and offline ('val' split) frames.
log "demos: $DEMO_EPS per task"
timeout $(( $(left) - 60 )) $PY -m qvla_ros.cli demos --out "$WORK/demos" "${task_args[@]}" \
  --episodes-per-task "$DEMO_EPS" --workers "$WORKERS" --quiet >>"$LOG" 2>&1 || log "demos ended early ($?)"

log "compare: $METHODS at $EPS episodes per task"
timeout $(( $(left) - 25 )) $PY -m qvla_ros.cli compare --data "$WORK/demos" "${task_args[@]}" \
  --methods "$METHODS" --episodes-per-task "$EPS" --workers "$WORKERS" --out "$WORK/compare" \
  --quiet >>"$LOG" 2>&1 || log "compare ended early ($?)"

cp "$WORK/compare/compare.md" "$WORK/compare/compare.json" "$WORK/compare/compare.png" "$OUT/" 2>/dev/null
tar -czf "$OUT/compare.tgz" -C "$WORK" --exclude='*.npz' compare demos/manifest.json 2>>"$LOG"
log "done; $(ls "$OUT" | tr '\n' ' ')"
