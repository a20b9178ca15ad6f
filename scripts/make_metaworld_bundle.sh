#!/usr/bin/env bash
# Build a trimmed MetaWorld runtime for CPython 3.12 (the GPU machine's interpreter), packed as one
# archive small enough for the device tool's `carry` (64 MiB a call, working tree included): the
# wheels bench/gpu/train_*.sh used to carry (.whl_train, 47 MB) no longer fit beside the tree,
# and of MetaWorld's 39 MiB of assets the suite's ten tasks read a few files.
#
#   scripts/make_metaworld_bundle.sh     # -> .mwbundle/metaworld312.tar.xz (+ .txt: what is in it)
#
# Steps:
#   1. the cp312 manylinux wheel of mujoco==3.3.0 (the version metaworld 3.1.1 pins; downloaded
#      unless MW_WHEELS names a folder that holds it), unpacked as site-packages (a wheel is a zip);
#   2. the files the ten tasks use: every task built through the project's SuiteEnv, reset,
#      stepped and rendered (qvla_ros/sim/metaworld_bundle.py: files Python opens, the model XML
#      with its includes, every file the compiled XML names), run under strace where strace
#      exists, whose openat calls are added;
#   3. staged from the project's venv: metaworld's Python code in full and of metaworld/assets only
#      the files of step 2; and the pure-Python packages a MetaWorld rollout imports that the GPU
#      image lacks (PURE below; the image has numpy, scipy, imageio, cloudpickle, packaging,
#      typing_extensions), with their dist-info folders;
#   4. packed with xz -9.
# bench/gpu/device_setup.sh unpacks it there; scripts/check_metaworld_bundle.py checks it (every
# task built, stepped and rendered from the unpacked bundle alone).
#
# Environment: PY (the project's venv python, default .venv/bin/python), MW_WHEELS (folder with
# the cp312 mujoco wheel), QVLA_MWBUNDLE_WORK (build folder, default /tmp/qvla-mw-bundle),
# MUJOCO_GL (renderer for step 2, default egl), USED_LIST (a used-files list of an earlier build,
# e.g. /tmp/qvla-mw-bundle/used.txt: step 2 skipped).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="$ROOT/.mwbundle"  # git-ignored (.gitignore); named in the device call's `carry`
ARCHIVE="$OUT_DIR/metaworld312.tar.xz"
WORK="${QVLA_MWBUNDLE_WORK:-/tmp/qvla-mw-bundle}"
PY="${PY:-$ROOT/.venv/bin/python}"
MUJOCO_VERSION=3.3.0
# Pure-Python packages a MetaWorld rollout imports that the GPU image does not have, as top-level
# names: language_world (the suite's instructions), gymnasium + farama_notifications (metaworld
# subclasses gymnasium's MujocoEnv), glfw (gymnasium.envs.mujoco.mujoco_rendering imports it
# unconditionally, even with MUJOCO_GL=egl; its two libglfw.so need only libc), OpenGL (PyOpenGL:
# MuJoCo's EGL context). Their dist-info folders go along.
PURE="language_world gymnasium farama_notifications glfw OpenGL"
DISTS="metaworld language_world gymnasium farama_notifications glfw pyopengl"
log() { printf '[metaworld-bundle] %s\n' "$*" >&2; }

[[ -x "$PY" ]] || { log "no project venv python ($PY): run scripts/bootstrap.sh first or set PY"; exit 1; }
SITE="$("$PY" -c 'import os, metaworld; print(os.path.dirname(os.path.dirname(metaworld.__file__)))')"
for pkg in metaworld $PURE; do
  [[ -e "$SITE/$pkg" ]] || { log "$pkg is not in $SITE (requirements.txt)"; exit 1; }
done
rm -rf "$WORK/stage"
mkdir -p "$WORK"

# 1. The mujoco wheel for cp312.
WHEELS="${MW_WHEELS:-$WORK/wheels}"
if ! ls "$WHEELS"/mujoco-$MUJOCO_VERSION-cp312-*.whl >/dev/null 2>&1; then
  log "downloading the cp312 mujoco==$MUJOCO_VERSION wheel into $WHEELS"
  mkdir -p "$WHEELS"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "mujoco==$MUJOCO_VERSION" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
fi
WHEEL="$(ls "$WHEELS"/mujoco-$MUJOCO_VERSION-cp312-*.whl | head -1)"

# 2. The files the ten tasks use.
USED="$WORK/used.txt"
collect=("$PY" -m qvla_ros.sim.metaworld_bundle --out "$USED")
export MUJOCO_GL="${MUJOCO_GL:-egl}" PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-${MUJOCO_GL:-egl}}"
log "building every task of the suite to see which files they read (MUJOCO_GL=$MUJOCO_GL)"
t0=$(date +%s)
if [[ -n "${USED_LIST:-}" ]]; then
  cp "$USED_LIST" "$USED"
  log "files used: $(wc -l < "$USED") from USED_LIST=$USED_LIST (not collected again)"
elif command -v strace >/dev/null 2>&1; then
  (cd "$ROOT" && strace -f -qq -e trace=openat,open -e status=successful -o "$WORK/strace.txt" \
    "${collect[@]}") 2>"$WORK/collect.log" || { tail -20 "$WORK/collect.log" >&2; exit 1; }
  # Paths in quotes after openat(AT_FDCWD, "...", normalized (MuJoCo opens
  # .../assets/sawyer_xyz/../objects/...).
  grep -oE 'open(at)?\((AT_FDCWD, )?"[^"]+"' "$WORK/strace.txt" | sed -E 's/.*"([^"]+)"$/\1/' |
    "$PY" -c 'import os, sys; print("".join(os.path.normpath(l.rstrip("\n")) + "\n" for l in sys.stdin), end="")' |
    grep "^$SITE/" | sort -u > "$WORK/strace_paths.txt"
  n_py=$(wc -l < "$USED")
  # Assets strace saw that the collector did not (expected: none; reported, then kept).
  grep "^$SITE/metaworld/assets/" "$WORK/strace_paths.txt" | sort -u | comm -23 - <(sort -u "$USED") \
    > "$WORK/strace_only_assets.txt" || true
  sort -u "$USED" "$WORK/strace_paths.txt" | while read -r f; do [[ -f "$f" ]] && echo "$f"; done \
    > "$USED.all"
  mv "$USED.all" "$USED"
  log "files used: $n_py seen by Python + XML, $(wc -l < "$USED") with strace's; asset files only" \
      "strace saw: $(wc -l < "$WORK/strace_only_assets.txt") ($(( $(date +%s) - t0 )) s)"
else
  (cd "$ROOT" && "${collect[@]}") 2>"$WORK/collect.log" || { tail -20 "$WORK/collect.log" >&2; exit 1; }
  log "files used: $(wc -l < "$USED") (no strace here: Python's opens + XML only; $(( $(date +%s) - t0 )) s)"
fi

# 3. Stage.
STAGE="$WORK/stage/metaworld312"
SP="$STAGE/site-packages"
mkdir -p "$SP"
"$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$WHEEL" "$SP"
copy_tree() {  # copy_tree NAME [tar --exclude patterns...]: $SITE/NAME into $SP, minus excludes
  local name="$1"; shift
  tar -C "$SITE" --exclude='__pycache__' "$@" -cf - "$name" | tar -C "$SP" -xf -
}
copy_tree metaworld --exclude='metaworld/assets'
# PyOpenGL's DLLS folder holds Windows libraries only.
for pkg in $PURE; do copy_tree "$pkg" --exclude='OpenGL/DLLS'; done
for dist in $DISTS; do
  for d in "$SITE"/$dist-*.dist-info; do cp -a "$d" "$SP/"; done
done
n_assets=0
while read -r f; do
  rel="${f#"$SITE"/}"
  case "$rel" in
    metaworld/assets/*)
      mkdir -p "$SP/$(dirname "$rel")"; cp -a "$f" "$SP/$rel"; n_assets=$((n_assets + 1)) ;;
  esac
done < "$USED"
find "$STAGE" -name '__pycache__' -type d -prune -exec rm -rf {} +
log "staged: $(du -sh "$STAGE" | cut -f1), $n_assets asset files of $(find "$SITE/metaworld/assets" -type f | wc -l)"

# 4. Pack.
mkdir -p "$OUT_DIR"
tar -C "$WORK/stage" -cf - metaworld312 | xz -T0 -9 > "$ARCHIVE.tmp"
mv "$ARCHIVE.tmp" "$ARCHIVE"
{
  echo "built $(date -u +%FT%TZ) from $(cd "$ROOT" && git rev-parse --short HEAD) for CPython 3.12; the ten tasks of qvla_ros/sim/suite.py"
  echo "unpacked: $(du -sh "$STAGE" | cut -f1); archive: $(du -h "$ARCHIVE" | cut -f1) ($(stat -c %s "$ARCHIVE") bytes)"
  echo "mujoco wheel: $(basename "$WHEEL"); asset files kept: $n_assets of the used list's $(wc -l < "$USED")"
  echo "unpacked sizes (site-packages/...):"
  (cd "$SP" && du -s --block-size=1K -- * | sort -rn | awk '{printf "  %8d KiB  %s\n", $1, $2}')
  echo "asset files kept:"
  (cd "$SP" && find metaworld/assets -type f | sort | sed 's/^/  /')
} > "$OUT_DIR/metaworld312.txt"
log "$(sed -n 2p "$OUT_DIR/metaworld312.txt")"
log "ready: $ARCHIVE"
