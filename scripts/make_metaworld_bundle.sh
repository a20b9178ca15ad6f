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
#      exists, whose openat calls are added (normalized; asset files only strace saw are
#      reported, then kept);
#   3. staged from the project's venv: metaworld's Python code in full and of metaworld/assets only
#      the files of step 2; and the pure-Python packages a MetaWorld rollout imports that the GPU
#      image lacks (PURE below; the image has numpy, scipy, imageio, cloudpickle, packaging,
#      typing_extensions), with their dist-info folders;
#   4. packed with xz -9.
# bench/gpu/device_setup.sh unpacks it there; scripts/check_metaworld_bundle.py checks it (every
# task built, stepped and rendered from the unpacked bundle alone). Steps 1, 2 and 4 and the
# staging helpers are shared with scripts/make_libero_bundle.sh (scripts/bundle_steps.sh).
#
# Environment: PY (the project's venv python, default .venv/bin/python), MW_WHEELS (folder with
# the cp312 mujoco wheel), QVLA_MWBUNDLE_WORK (build folder, default /tmp/qvla-mw-bundle),
# MUJOCO_GL (renderer for step 2, default egl), USED_LIST (a used-files list of an earlier build,
# e.g. /tmp/qvla-mw-bundle/used.txt: step 2 skipped).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="$ROOT/.mwbundle"  # git-ignored (.gitignore); named in the device call's `carry`
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
# shellcheck source=bundle_steps.sh
source "$ROOT/scripts/bundle_steps.sh"

check_site metaworld requirements.txt metaworld $PURE

# 1. The mujoco wheel for cp312.
fetch_mujoco_wheel "${MW_WHEELS:-$WORK/wheels}"

# 2. The files the ten tasks use.
collect_used "the suite" "metaworld/assets/" "$PY" -m qvla_ros.sim.metaworld_bundle --out "$WORK/used.txt"

# 3. Stage.
stage_wheel metaworld312
copy_tree metaworld --exclude='metaworld/assets'
# PyOpenGL's DLLS folder holds Windows libraries only.
for pkg in $PURE; do copy_tree "$pkg" --exclude='OpenGL/DLLS'; done
copy_dist_info $DISTS
copy_used_assets metaworld/assets/
find "$STAGE" -name '__pycache__' -type d -prune -exec rm -rf {} +
log "staged: $(du -sh "$STAGE" | cut -f1), $n_assets asset files of $(find "$SITE/metaworld/assets" -type f | wc -l)"

# 4. Pack.
list_asset_files() {
  echo "asset files kept:"
  (cd "$SP" && find metaworld/assets -type f | sort | sed 's/^/  /')
}
pack_and_list metaworld312 "the ten tasks of qvla_ros/sim/suite.py" : list_asset_files
