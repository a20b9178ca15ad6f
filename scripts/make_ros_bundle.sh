#!/usr/bin/env bash
# Build a self-contained ROS 2 runtime for CPython 3.12 (the GPU machine's interpreter), with this
# package's own interfaces (msg/, srv/) in it, packed as one archive that travels to the GPU
# machine through the device tool's `carry` (that machine has no ROS and reaches no registry).
#
#   scripts/make_ros_bundle.sh            # -> .rosbundle/ros312.tar.xz (+ .txt: what is in it)
#
# Steps (each as scripts/bootstrap.sh does them for the project's venv, but for Python 3.12):
#   1. the cp312 manylinux wheels of every ros-* package of the project's venv, same versions
#      (downloaded unless ROS_WHEELS names a folder that holds them);
#   2. a throwaway 3.12 venv with those wheels and the generators' build-time Python packages;
#   3. the interfaces built with CMake + rosidl into that venv;
#   4. only what runs copied out (no headers, CMake files, generators, build tools, nor the pure
#      Python packages the GPU machine already has) and packed.
# bench/ros/gpu_node.sh unpacks it there; bench/ros/README.md says how the pieces fit.
#
# Environment: PYTHON312 (a python3.12; default: on PATH, else pyenv's), ROS_WHEELS (folder of
# cp312 ros-* wheels), QVLA_BUNDLE_WORK (build folder, default /tmp/qvla-ros-bundle).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="$ROOT/.rosbundle"  # git-ignored (.gitignore); named in the device call's `carry`
ARCHIVE="$OUT_DIR/ros312.tar.xz"
WORK="${QVLA_BUNDLE_WORK:-/tmp/qvla-ros-bundle}"
HOST_PY="$ROOT/.venv/bin/python"
log() { printf '[ros-bundle] %s\n' "$*" >&2; }
pip_quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; }

# The first candidate that really is a 3.12 (a pyenv shim on PATH can exist and fail to run).
PY312=""
for candidate in ${PYTHON312:-} python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do
  if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
    PY312="$candidate"; break
  fi
done
[[ -n "$PY312" ]] || { log "no working python3.12 found; set PYTHON312"; exit 1; }
[[ -x "$HOST_PY" ]] || { log "no project venv ($HOST_PY): run scripts/bootstrap.sh first"; exit 1; }

# 1. Wheels: the ros-* versions of the project's venv, built for cp312.
WHEELS="${ROS_WHEELS:-$WORK/wheels}"
if ! ls "$WHEELS"/ros_rclpy-*cp312*.whl >/dev/null 2>&1; then
  log "downloading the cp312 ros-* wheels into $WHEELS"
  mkdir -p "$WHEELS"
  pip_quiet "$HOST_PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$WHEELS" -r <("$HOST_PY" -m pip list --format=freeze | grep '^ros-')
fi

# 2. The throwaway venv. Build-time Python packages pinned as in the project's venv; numpy 2.x
#    headers give extensions that also load under the GPU machine's newer numpy 2.
VENV="$WORK/venv312"
rm -rf "$VENV" "$WORK/build" "$WORK/stage"
log "venv $VENV ($("$PY312" --version))"
"$PY312" -m venv "$VENV"
PY="$VENV/bin/python"
pip_quiet "$PY" -m pip install -q --no-deps "$WHEELS"/ros_*.whl
pip_quiet "$PY" -m pip install -q numpy==2.4.6 empy==4.2.1 lark-parser==0.12.0 catkin-pkg==1.1.1 \
  pyyaml typing-extensions setuptools

# 3. Interfaces, exactly as bootstrap.sh builds them (install prefix = the venv).
log "building the interfaces (msg/, srv/) with python3.12"
export AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV"
PATH="$VENV/bin:$PATH" cmake -S "$ROOT" -B "$WORK/build" -DQVLA_INSTALL_PYTHON=OFF \
  -DCMAKE_INSTALL_PREFIX="$VENV" -DPython3_EXECUTABLE="$PY" -DBUILD_TESTING=OFF \
  -DCMAKE_BUILD_TYPE=Release > "$WORK/cmake.log" 2>&1 &&
  PATH="$VENV/bin:$PATH" cmake --build "$WORK/build" -j "$(nproc)" >> "$WORK/cmake.log" 2>&1 &&
  cmake --install "$WORK/build" >> "$WORK/cmake.log" 2>&1 ||
  { tail -40 "$WORK/cmake.log" >&2; exit 1; }
SITE="$VENV/lib/python3.12/site-packages"
"$PY" -c "import sys; sys.path.insert(0, '$SITE'); import qvla_ros.msg, qvla_ros.srv" ||
  { log "the built interfaces do not import"; exit 1; }

# 4. Stage what runs: prefix/lib/*.so (rcl, rmw, type supports), site-packages minus build tools
#    and minus what the GPU image holds, share/ minus CMake files (the ament index and the
#    packages' share folders are looked up at run time: rmw implementation, type supports).
STAGE="$WORK/stage/ros312"
mkdir -p "$STAGE/lib" "$STAGE/site-packages" "$STAGE/share"
find "$VENV/lib" -maxdepth 1 -name '*.so*' -exec cp -a {} "$STAGE/lib/" \;
# Build time only: generators, CMake helpers, the IDL parser, template engines, packaging.
# On the GPU image already: numpy, yaml, typing_extensions, pyparsing, dateutil, six.
DROP='^(pip|setuptools|pkg_resources|_distutils_hack|distutils-precedence\.pth|wheel|numpy|numpy\.libs|yaml|_yaml|typing_extensions\.py|em\.py|emlib\.py|emhelp\.py|emdoc\.py|empy|lark|catkin_pkg|docutils|pyparsing|dateutil|six\.py|ament_cmake.*|ament_package|rosidl_adapter|rosidl_cli|rosidl_cmake|rosidl_pycommon|rosidl_generator_(c|cpp|type_description)|rosidl_typesupport_(c|cpp|fastrtps_c|fastrtps_cpp|introspection_c|introspection_cpp)|ros_wheels_bootstrapper.*|lark-stubs|packaging|tzdata|rosidl_core_generators|rosidl_default_generators|rmw_implementation_cmake|.*\.dist-info|.*\.egg-info|__pycache__)$'
for entry in "$SITE"/*; do
  name="$(basename "$entry")"
  [[ "$name" =~ $DROP ]] && continue
  cp -a "$entry" "$STAGE/site-packages/"
done
# Kept although they sound like build tools: rosidl_parser (every generated message imports
# rosidl_parser.definition; its lark-based parser is not loaded) and rosidl_generator_py (every
# generated message imports its import_type_support; the generator half is small).
tar -C "$VENV/share" --exclude=cmake --exclude='*.h' --exclude='*.hpp' --exclude='*.em' -cf - . |
  tar -C "$STAGE/share" -xf -
find "$STAGE" -name '__pycache__' -type d -prune -exec rm -rf {} +
find "$STAGE" -name '*.c' -path '*site-packages*' -delete  # generated sources of built extensions
# Debug and symbol tables are not needed to run; halves the libraries.
find "$STAGE" -name '*.so*' -type f -exec strip --strip-unneeded {} + 2>/dev/null || true

# 5. Pack. xz: tar and python's tarfile both read it on the GPU machine.
mkdir -p "$OUT_DIR"
tar -C "$WORK/stage" -cf - ros312 | xz -T0 -9 > "$ARCHIVE.tmp"
mv "$ARCHIVE.tmp" "$ARCHIVE"
{
  echo "built $(date -u +%FT%TZ) with $("$PY312" --version) from $(cd "$ROOT" && git rev-parse --short HEAD)"
  echo "unpacked: $(du -sh "$STAGE" | cut -f1); archive: $(du -h "$ARCHIVE" | cut -f1) ($(stat -c %s "$ARCHIVE") bytes)"
  (cd "$WHEELS" && ls ros_*.whl)
} > "$OUT_DIR/ros312.txt"
log "$(sed -n 2p "$OUT_DIR/ros312.txt")"
log "ready: $ARCHIVE"
