#!/usr/bin/env bash
# oft-small (OpenVLA-OFT architecture, 54.4 M parameters, qvla_ros/policy/configuration_oft.py)
# trained on the language MetaWorld demonstrations on one H200, over as many device calls as it
# takes, each inside 9.5 minutes. Call it again until it prints "TRAINING FINISHED":
#
#   bash bench/gpu/train_oft_small.sh          (carry: .mwbundle .gl, as bench/gpu/train_tiny.sh)
#
# Every call: setup -> demonstrations until the folder is complete (first call; a later call
# completes a folder a call left unfinished) -> `qvla train --preset oft-small --resume
# --stop-after ...` for what is left of the call -> training.json, config.json, tokenizer.json
# and the logs into $OUT. Once the schedule is finished, a closed-loop evaluation (EVAL_EPS
# episodes per task, the policy on the GPU) runs in what is left of that call or in the next one,
# and the call says "EVALUATED" (eval_results.json). Then, in what is left of that call and the
# next ones, `qvla compare --device cuda --dtype $COMPARE_DTYPE` (COMPARE_METHODS, COMPARE_EPS
# episodes per task; issue #19's table: float, the group-wise baselines users run, QVLA at their
# measured memory and at whole-policy budgets), resumed from its cache folder on each call, until
# the call says "COMPARED" (compare.json, compare.png); then bench/robustness/robustness.py on the
# comparison's ROBUST_PLANS rows (resumed likewise) until it says "ROBUSTNESS" (robustness.json).
#
# State: demonstrations and the run (checkpoint + training_state.safetensors: weights, AdamW
# moments, step, RNG) live in $WORK, by default /tmp/qvla_oft_small on the device. That survives
# between calls only while the machine stays warm (one lease: 30 minutes held at most, and
# the session's device time). It cannot travel back: model.safetensors alone is 218 MB and the
# training state 650 MB, over $OUT's 16 MiB a file and 64 MiB in all. A call on a fresh machine
# starts again from nothing, and says so. Plan the calls back to back on one warm machine.
#
# Schedule: STEPS optimizer steps, but the learning rate follows whichever of steps or the whole
# run's training time (TRAIN_TOTAL_S, summed over calls) is further along, so the cosine decay
# ends within TRAIN_TOTAL_S however fast the GPU turns out to be; the run ends at whichever comes
# first. Measured on an H100, 2026-12-07 (bench/compare/oft_small_h100/README.md): demonstrations
# (100 per task, 16 workers) 91 s; eager training 6.0 steps/s at batch 256 (COMPILE=1, the default
# now, is untried on a card: its steps/s is the figure to read first); evaluation 200 episodes
# in 35-40 s; compare ~40 s of rollouts per method at 20 episodes per task, plus quantizing (QVLA's
# GPTQ-row sensitivity ~55 s once, AWQ ~13 s, GPTQ ~9 s per method); machine start ~90 s. A
# session's 30 minutes hold three full calls after the start: with the defaults the second ends
# training and evaluates, the third compares, and robustness gets what is left.
#
# CPU smoke check of the logic (oft-smoke preset, 1 demonstration of 2 tasks, a few steps; two
# calls on 2 cores, 2026-12-07: 220 s, robustness cut short, then 105 s finishing it):
#   SMOKE=1 OUT=/tmp/o WORK=/tmp/w bash bench/gpu/train_oft_small.sh
# and of a run split over calls: STOP_AFTER caps each call's training seconds, so
#   SMOKE=1 STEPS=40 STOP_AFTER=6 OUT=/tmp/o WORK=/tmp/w2 bash bench/gpu/train_oft_small.sh   (twice or more)
# stops unfinished, then resumes.
#
# LIBERO (issue #20): SUITE=libero-object (or libero-spatial) runs the same stages on that suite:
# demonstrations from its 30 demonstration initial states (batches of one: a scene takes ~10 s to
# build), the oft-small-libero preset (oft-small on LIBERO's 8 proprio values and 7-d actions),
# evaluation and comparison on its held-out states 30-49. Carry .libbundle (scripts/make_libero_bundle.sh)
# and .gl; bench/gpu/device_setup.sh unpacks the bundle. No held-out phrasings there, so its
# robustness runs brightness and shifts only. CPU smoke check (198 s on 2 cores, with robustness):
#   SMOKE=1 SUITE=libero-object OUT=/tmp/lo WORK=/tmp/lw bash bench/gpu/train_oft_small.sh
set -u
START=$(date +%s)
SMOKE=${SMOKE:-0}
SUITE=${SUITE:-metaworld}
LIBERO=0; case $SUITE in libero-*) LIBERO=1 ;; esac
if [ "$SMOKE" = 1 ] && [ "$LIBERO" = 1 ]; then
  # One demonstration of one task (LIBERO's expert needs ~120 steps), a few steps of everything else.
  : "${PRESET:=oft-smoke-libero}" "${TASKS:=0}" "${EVAL_MAX_STEPS:=16}" "${COMPARE_METHODS:=fp,rtn-w4}"
fi
if [ "$SMOKE" = 1 ]; then
  # Everything small, on the CPU, with the checkout's venv and no installs.
  : "${PRESET:=oft-smoke}" "${DEVICE:=cpu}" "${SETUP:=0}" "${PY:=.venv/bin/python}" "${EPISODES:=1}"
  : "${TASKS:=drawer-open,faucet-close}" "${STEPS:=6}" "${BATCH:=8}" "${CKPT_EVERY:=2}" "${WORKERS:=2}"
  : "${CALL_S:=240}" "${STOP_STEPS_S:=20}" "${TRAIN_TOTAL_S:=600}" "${EVAL_EPS:=1}" "${EVAL_MAX_STEPS:=30}"
  : "${COMPARE_EPS:=1}" "${COMPARE_METHODS:=fp,rtn-g32-w4,qvla@rtn-g32-w4}" "${COMPARE_OFFLINE:=0}"
  : "${ROBUST_PLANS:=fp,qvla@rtn-g32-w4}" "${ROBUST_EPS:=1}" "${COMPILE:=0}"
  : "${WORK:=/tmp/qvla_oft_smoke}" "${OUT:=/tmp/qvla_oft_smoke_out}"
  export SETUP
fi
CALL_S=${CALL_S:-570}              # this call's budget: 9.5 minutes
OUT=${OUT:-/tmp/qvla_out}
WORK=${WORK:-/tmp/qvla_oft_small}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
WORKERS=${WORKERS:-16}
if [ "$LIBERO" = 1 ]; then
  PRESET=${PRESET:-oft-small-libero}
  EPISODES=${EPISODES:-30}         # every demonstration initial state (0-29); 3 of them held out as val
  DEMO_ARGS=(--suite "$SUITE" --batch-size 1)
else
  PRESET=${PRESET:-oft-small}
  EPISODES=${EPISODES:-100}        # demonstrations per task (10 tasks; ~10 % held out as val)
  DEMO_ARGS=()
fi
TASKS=${TASKS:-}
STEPS=${STEPS:-12000}
BATCH=${BATCH:-256}
LR=${LR:-3e-4}
SEED=${SEED:-0}
CKPT_EVERY=${CKPT_EVERY:-500}      # a call cut short by its hard timeout loses at most this many steps
TRAIN_TOTAL_S=${TRAIN_TOTAL_S:-780}    # the whole run's training time over all calls (see Schedule)
COMPILE=${COMPILE:-1}              # torch.compile the training forward (eager where it fails)
STOP_STEPS_S=${STOP_STEPS_S:-75}   # kept back at the end of a call: the last save (val L1, ~1 GB written), copies
EVAL_EPS=${EVAL_EPS:-50}           # the issue's 50 held-out episodes per task
STOP_AFTER=${STOP_AFTER:-}         # cap on this call's training seconds (default: all the call has left)
EVAL_MAX_STEPS=${EVAL_MAX_STEPS:-}   # evaluation episode length (default: the suite's 300)
COMPARE_EPS=${COMPARE_EPS:-20}     # closed-loop episodes per task and method in the comparison (0: none)
COMPARE_OFFLINE=${COMPARE_OFFLINE:-512}   # held-out frames for its offline metrics (the smoke has none)
# The policy in bf16 as a robot runs it (the float row 16 whole bits); the g128 baselines users run
# at 4, 3 and 2 bits (whole: ~5.3, ~4.4, ~3.5 with the bf16 rest) and QVLA at the issue's whole-policy
# budgets, GPTQ-rounded rows. In the order they run (what the issue asks first), as the lease may
# end before the last: a later call resumes at the first unfinished one.
COMPARE_DTYPE=${COMPARE_DTYPE:-bfloat16}
COMPARE_METHODS=${COMPARE_METHODS:-fp,qvla-gptq-b4.0-whole,gptq-g128-w3,qvla-gptq-b3.0-whole,gptq-g128-w2,gptq-g128-w4,awq-g128-w3,awq-g128-w4,qvla-gptq@gptq-g128-w3,qvla-gptq-b2.5-whole}
# Robustness (bench/robustness/robustness.py) of these comparison rows after the comparison, under
# brightness x0.8 / x1.2, 2-px shifts and (MetaWorld) held-out phrasings; "" skips it.
ROBUST_PLANS=${ROBUST_PLANS:-fp,qvla-gptq-b4.0-whole}
ROBUST_EPS=${ROBUST_EPS:-20}
mkdir -p "$OUT" "$WORK"
LOG=$OUT/log.txt
log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( CALL_S - ($(date +%s) - START) )); }
task_args=(); [ -n "$TASKS" ] && task_args=(--tasks "$TASKS")
compile_args=(); [ "$COMPILE" = 1 ] && compile_args=(--compile)
step_args=(); [ -n "$EVAL_MAX_STEPS" ] && step_args=(--max-steps "$EVAL_MAX_STEPS")
DEMOS=$WORK/demos
POLICY=$WORK/policy

# -- setup: carried wheels and GL libraries (SETUP=0 skips the installs) --------------------------
. bench/gpu/device_setup.sh
log "setup done; preset $PRESET on $DEVICE; $(nvidia-smi -L 2>/dev/null | head -1); $(nproc) cores"
if [ -f "$POLICY/training.json" ]; then
  log "resuming: $($PY -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"{r['steps_done']}/{r['steps_target']} steps, {r['wall_s']:.0f} s trained, val L1 {r['val_l1']}, finished {r['finished']}\")" "$POLICY/training.json")"
elif [ -d "$DEMOS" ]; then
  log "no run yet in $WORK; demonstrations from an earlier call are there"
else
  log "nothing in $WORK: a fresh machine (or the first call); starting from the demonstrations"
fi

complete() { $PY -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1])).get('complete') else 1)" "$DEMOS/manifest.json" 2>/dev/null; }

# -- demonstrations: until the folder is complete (`qvla demos` resumes a folder) -----------------
if ! complete; then
  budget=$(( $(left) - 30 ))
  log "demos: $EPISODES per task, within ${budget}s"
  timeout "$budget" $PY -m qvla_ros.cli demos --out "$DEMOS" "${DEMO_ARGS[@]}" "${task_args[@]}" --episodes-per-task "$EPISODES" \
    --workers "$WORKERS" --quiet >>"$LOG" 2>&1 || log "demos ended early ($?)"
  log "demos: $(find "$DEMOS" -name 'seed_*.npz' | wc -l) episodes, $(du -sh "$DEMOS" 2>/dev/null | cut -f1)"
fi

# -- training: what is left of this call, resumed from the last save -------------------------------
finished() { $PY -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1])).get('finished') else 1)" "$POLICY/training.json" 2>/dev/null; }
if ! complete; then
  # Training on part of the folder would tie the run to that part (resume checks the manifest).
  log "the demonstrations are not complete yet: call again"
elif finished; then
  log "training already finished"
else
  train_s=$(( $(left) - STOP_STEPS_S ))
  if [ "$train_s" -lt 30 ]; then
    log "only ${train_s}s left for training in this call: call again"
  else
    [ -n "$STOP_AFTER" ] && [ "$STOP_AFTER" -lt "$train_s" ] && train_s=$STOP_AFTER
    log "train: $PRESET, up to $STEPS steps, batch $BATCH, ${train_s}s in this call, ${TRAIN_TOTAL_S}s in all"
    # --stop-after ends this call's share (the schedule stays on the run's); timeout, at the
    # call's end, is the hard stop behind it (the last periodic save is then what a resume reads).
    timeout $(( $(left) - 15 )) $PY -m qvla_ros.cli train --data "$DEMOS" --out "$POLICY" \
      --preset "$PRESET" --steps "$STEPS" --batch-size "$BATCH" --lr "$LR" --seed "$SEED" \
      --checkpoint-every "$CKPT_EVERY" --time-limit "$TRAIN_TOTAL_S" --stop-after "$train_s" \
      --device "$DEVICE" "${compile_args[@]}" --resume >>"$WORK/train.log" 2>&1 || log "train ended early ($?)"
    grep -a "^qvla train" "$WORK/train.log" | tail -4 >>"$LOG"
  fi
fi

# -- evaluation, on the call after the one that finished (whatever time it has) --------------------
if finished && [ "$EVAL_EPS" -gt 0 ] && [ ! -f "$WORK/eval/results.json" ]; then
  eval_s=$(( $(left) - 20 ))
  if [ "$eval_s" -gt 60 ]; then
    log "eval: $EVAL_EPS episodes per task within ${eval_s}s"
    timeout "$eval_s" $PY -m qvla_ros.cli eval --suite "$SUITE" --policy "$POLICY" --out "$WORK/eval" "${task_args[@]}" \
      --episodes-per-task "$EVAL_EPS" --workers "$WORKERS" --device "$DEVICE" "${step_args[@]}" --quiet --force \
      >>"$LOG" 2>&1 || log "eval ended early ($?)"
  fi
fi

# -- the comparison, after the evaluation (resumes from $WORK/compare, its cache) -------------------
compared() { [ -f "$WORK/compare/.complete" ]; }
if finished && [ -f "$WORK/eval/results.json" ] && [ "$COMPARE_EPS" -gt 0 ] && ! compared; then
  compare_s=$(( $(left) - 20 ))
  if [ "$compare_s" -gt 60 ]; then
    log "compare: $COMPARE_METHODS, $COMPARE_EPS episodes per task, within ${compare_s}s"
    timeout "$compare_s" $PY -m qvla_ros.cli compare --suite "$SUITE" --policy "$POLICY" --data "$DEMOS" --device "$DEVICE" --dtype "$COMPARE_DTYPE" \
      --methods "$COMPARE_METHODS" --episodes-per-task "$COMPARE_EPS" --offline-frames "$COMPARE_OFFLINE" --workers "$WORKERS" \
      "${task_args[@]}" "${step_args[@]}" --out "$WORK/compare" --quiet >>"$WORK/compare.log" 2>&1 \
      && touch "$WORK/compare/.complete" || log "compare ended early ($?): call again to resume it"
    tail -3 "$WORK/compare.log" >>"$LOG"
  fi
fi

# -- robustness of some comparison rows, after the comparison (its run folders hold their policies) --
robust_done() { [ -f "$WORK/robustness.json.complete" ]; }
if compared && [ -n "$ROBUST_PLANS" ] && ! robust_done; then
  robust_s=$(( $(left) - 20 ))
  plans="" reference=""
  for method in ${ROBUST_PLANS//,/ }; do   # a method's run folder: runs/<method, '@' as _at_>-<id>/policy
    run=$(ls -d "$WORK/compare/runs/${method//@/_at_}"-*/policy 2>/dev/null | head -1)
    [ -n "$run" ] && plans="$plans${plans:+,}$run" || log "robustness: no run of $method in the comparison"
    [ "$method" = fp ] && reference=$run   # the others pair with the comparison's own float row
  done
  conditions=plain,brightness=0.8,brightness=1.2,shift=2; [ "$LIBERO" = 1 ] || conditions=$conditions,rephrase
  if [ "$robust_s" -gt 60 ] && [ -n "$plans" ]; then
    log "robustness: $ROBUST_PLANS under $conditions, $ROBUST_EPS episodes per task, within ${robust_s}s"
    timeout "$robust_s" $PY bench/robustness/robustness.py --policy "$POLICY" --plans "$plans" --suite "$SUITE" \
      --conditions "$conditions" --episodes "$ROBUST_EPS" --workers "$WORKERS" --device "$DEVICE" "${task_args[@]}" \
      ${reference:+--reference "$reference"} \
      "${step_args[@]}" --resume --out "$WORK/robustness.json" >>"$WORK/robustness.log" 2>&1 \
      && touch "$WORK/robustness.json.complete" || log "robustness ended early ($?): what finished is in robustness.json"
  fi
fi

# -- back to the caller: the record, the small checkpoint files, logs (8 files at most) ------------
for f in training.json config.json tokenizer.json; do
  [ -f "$POLICY/$f" ] && cp "$POLICY/$f" "$OUT/$f"
done
[ -f "$WORK/train.log" ] && tail -c 200000 "$WORK/train.log" | tr '\r' '\n' | grep -av "it/s\]$" >"$OUT/train_log.txt"
[ -f "$WORK/eval/results.json" ] && cp "$WORK/eval/results.json" "$OUT/eval_results.json"
for f in compare.json compare.png; do   # compare.md follows from compare.json (compare_report.write_markdown)
  [ -f "$WORK/compare/$f" ] && cp "$WORK/compare/$f" "$OUT/$f"
done
[ -f "$WORK/robustness.json" ] && cp "$WORK/robustness.json" "$OUT/robustness.json"
# At most 8 files come back: once the comparison has run, config.json and tokenizer.json (back
# from the first call already) make room.
if compared; then rm -f "$OUT/config.json" "$OUT/tokenizer.json"; fi
if finished && compared && { [ -z "$ROBUST_PLANS" ] || robust_done; }; then
  log "TRAINING FINISHED; EVALUATED (eval_results.json); COMPARED (compare.json, compare.png); ROBUSTNESS (robustness.json)"
elif finished && compared; then
  log "TRAINING FINISHED; EVALUATED (eval_results.json); COMPARED (compare.json, compare.png); call again for robustness"
elif finished && [ -f "$WORK/eval/results.json" ]; then
  log "TRAINING FINISHED; EVALUATED (eval_results.json); call again to compare"
elif finished; then
  log "TRAINING FINISHED; call again to evaluate"
else
  log "not finished: call again (on this warm machine: $WORK is the state)"
fi
