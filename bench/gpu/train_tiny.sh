#!/usr/bin/env bash
# One device call (nvidia-h200, 16 cores): demonstrations -> tiny policy training -> closed-loop
# evaluation (10 tasks x 50 held-out episodes) -> language-swap test, plus the oft-7b build/memory
# measurement on the GPU while the demonstrations are generated on the CPUs.
#
# Run from the repository root, on the device:
#   bash bench/gpu/train_tiny.sh            (carry: .mwbundle .gl; results land in $OUT)
# Local dry run of the logic (CPU, seconds of each stage):
#   OUT=/tmp/o WORK=/tmp/w EPISODES1=1 EPISODES2=1 TASKS=drawer-open,faucet-close EVAL_EPS=1 \
#   SWAP_EPS=1 MAX_STEPS=8 STEPS=4 BATCH=8 TOTAL_S=400 DEVICE=cpu SETUP=0 PY=.venv/bin/python \
#   bash bench/gpu/train_tiny.sh
#
# .mwbundle holds .mwbundle/metaworld312.tar.xz (scripts/make_metaworld_bundle.sh, git-ignored,
# ~8 MiB): the MetaWorld runtime the device image lacks (metaworld 3.1.1 with the ten tasks'
# assets, mujoco 3.3.0 for cp312, gymnasium, language_world, farama_notifications, glfw, PyOpenGL),
# which bench/gpu/device_setup.sh unpacks to /tmp/metaworld312 and puts on PYTHONPATH. It replaces
# .whl_train (the same packages as wheels, 47 MB: with the ~27 MB tree over a call's 64 MiB), which
# device_setup.sh still installs where it is carried. .gl holds the GL loader debs of the device
# README (libegl1, libglvnd0, libopengl0, ...). bench/gpu/README.md: what each script carries.
#
# Every stage runs under `timeout`, against one deadline (TOTAL_S from the start), so the call
# always ends with the checkpoint and whatever results exist copied to $OUT (<= 8 files).
set -u
START=$(date +%s)
TOTAL_S=${TOTAL_S:-510}
DEMOS_END_S=${DEMOS_END_S:-110}   # the demo passes should be over this long after the start
OUT=${OUT:-/tmp/qvla_out}
WORK=${WORK:-/tmp/qvla_work}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
WORKERS=${WORKERS:-16}
EPISODES1=${EPISODES1:-60}    # first pass: every task gets this many demonstrations
EPISODES2=${EPISODES2:-150}   # second pass (same folder, resumed) tops up to this many, time allowing
TASKS=${TASKS:-}
STEPS=${STEPS:-40000}
BATCH=${BATCH:-512}
LR=${LR:-5e-4}
SEED=${SEED:-0}
INIT=${INIT:-}                # a checkpoint to continue from (new optimizer and schedule)
EVAL_EPS=${EVAL_EPS:-50}
SWAP_EPS=${SWAP_EPS:-20}
MAX_STEPS=${MAX_STEPS:-}
EVAL_S=${EVAL_S:-100}
SWAP_S=${SWAP_S:-60}
mkdir -p "$OUT" "$WORK"
LOG=$OUT/log.txt
log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
task_args=(); [ -n "$TASKS" ] && task_args=(--tasks "$TASKS")
init_args=(); [ -n "$INIT" ] && init_args=(--init "$INIT")
step_args=(); [ -n "$MAX_STEPS" ] && step_args=(--max-steps "$MAX_STEPS")

# -- setup: carried wheels and GL libraries -------------------------------------------------------
. bench/gpu/device_setup.sh
log "setup done; $(nvidia-smi -L 2>/dev/null | head -1); $(nproc) cores"
$PY -c "import torch, transformers, metaworld, mujoco; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'mujoco', mujoco.__version__)" >>"$LOG" 2>&1

# -- oft-7b on the GPU, in the background while the CPUs make demonstrations ----------------------
if [ "$DEVICE" = cuda ] && [ "${OFT:-1}" = 1 ]; then
  timeout 120 $PY bench/policy/oft7b_memory.py --out "$WORK/oft7b.json" >"$WORK/oft7b.log" 2>&1 &
  OFT_PID=$!
fi

# -- demonstrations: a guaranteed first pass, then a top-up under the remaining demo budget -------
DEMOS=$WORK/demos
log "demos pass 1: $EPISODES1 per task"
# Pass 1 may run past DEMOS_END_S (every task must have data), eating into training, up to 2 min.
timeout $(( DEMOS_END_S + 120 - ($(date +%s) - START) )) $PY -m qvla_ros.cli demos --out "$DEMOS" "${task_args[@]}" \
  --episodes-per-task "$EPISODES1" --workers "$WORKERS" --quiet >>"$LOG" 2>&1 || log "demos pass 1 ended early ($?)"
budget=$(( DEMOS_END_S - ($(date +%s) - START) ))
if [ "$EPISODES2" -gt "$EPISODES1" ] && [ "$budget" -gt 20 ]; then
  log "demos pass 2: up to $EPISODES2 per task within ${budget}s"
  timeout "$budget" $PY -m qvla_ros.cli demos --out "$DEMOS" "${task_args[@]}" \
    --episodes-per-task "$EPISODES2" --workers "$WORKERS" --quiet >>"$LOG" 2>&1 || log "demos pass 2 ended early ($?)"
fi
log "demos: $(find "$DEMOS" -name 'seed_*.npz' | wc -l) episodes, $(du -sh "$DEMOS" | cut -f1)"
[ -n "${OFT_PID:-}" ] && { wait "$OFT_PID"; log "oft-7b measured ($?)"; }

# -- training ---------------------------------------------------------------------------------------
POLICY=$WORK/policy
train_s=$(( $(left) - EVAL_S - SWAP_S - 45 ))
log "train: up to $STEPS steps, batch $BATCH, ${train_s}s"
timeout $(( train_s + 30 )) $PY -m qvla_ros.cli train --data "$DEMOS" --out "$POLICY" --config tiny \
  --steps "$STEPS" --batch-size "$BATCH" --lr "$LR" --seed "$SEED" --time-limit "$train_s" \
  --checkpoint-every 2000 --allow-incomplete --device "$DEVICE" "${init_args[@]}" >>"$WORK/train.log" 2>&1 || log "train ended early ($?)"
tail -c 600 "$WORK/train.log" | tr '\r' '\n' | tail -3 >>"$LOG"

# -- closed-loop evaluation and the language-swap test ---------------------------------------------
log "eval: $EVAL_EPS episodes per task"
timeout "$EVAL_S" $PY -m qvla_ros.cli eval --policy "$POLICY" --out "$WORK/eval" "${task_args[@]}" \
  --episodes-per-task "$EVAL_EPS" --workers "$WORKERS" "${step_args[@]}" --quiet --force >>"$LOG" 2>&1 || log "eval ended early ($?)"
swap_s=$(( $(left) - 10 ))
log "language swap: $SWAP_EPS episodes per task within ${swap_s}s"
swap_args=(); [ -n "$MAX_STEPS" ] && swap_args=(--max-steps "$MAX_STEPS")
[ "$swap_s" -gt 20 ] && timeout "$swap_s" $PY bench/policy/language_swap.py --policy "$POLICY" --out "$WORK/swap" \
  --episodes-per-task "$SWAP_EPS" --workers "$WORKERS" --baseline "$WORK/eval/results.json" \
  "${swap_args[@]}" >>"$WORK/swap.log" 2>&1 || log "swap ended early ($?)"
tail -n 14 "$WORK/swap.log" >>"$LOG"

# -- back to the caller: checkpoint files + one archive of results (8 files at most) --------------
for f in model.safetensors config.json tokenizer.json training.json; do
  [ -f "$POLICY/$f" ] && cp "$POLICY/$f" "$OUT/$f"
done
cp "$DEMOS/manifest.json" "$WORK/demos_manifest.json" 2>/dev/null
tar -czf "$OUT/results.tgz" -C "$WORK" --ignore-failed-read eval swap oft7b.json oft7b.log train.log \
  swap.log demos_manifest.json 2>/dev/null
log "done; $(ls "$OUT" | tr '\n' ' ')"
