# Sourced by the device-call scripts in this folder (needs PY, LOG and a `log` function):
# puts the carried MetaWorld and LIBERO runtimes (.mwbundle, .libbundle) on PYTHONPATH, installs the carried wheels
# (.whl_train, the older way: too large beside the tree now) and GL loader debs (.gl) that the
# device image lacks, then points MuJoCo at EGL. SETUP=0 skips all that (a local dry run must not
# unpack libraries into /).
if [ "${SETUP:-1}" = 1 ] && [ -d .whl_train ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl_train/*.whl >>"$LOG" 2>&1 || log "pip install failed"
  export PYTHONPATH=/tmp/site
fi
# A carried runtime archive (scripts/make_*_bundle.sh): unpacked once to DIR, its site-packages
# put first on PYTHONPATH (before .whl_train's /tmp/site where both were carried).
use_bundle() {
  local archive=$1 dir=$2
  if [ ! -d "$dir/site-packages" ]; then
    { rm -rf "$dir.part" && mkdir -p "$dir.part" &&
      tar -C "$dir.part" --strip-components=1 -xJf "$archive" >>"$LOG" 2>&1 &&
      rm -rf "$dir" && mv "$dir.part" "$dir"; } || { log "could not unpack $archive"; return 1; }
  fi
  export PYTHONPATH=$dir/site-packages${PYTHONPATH:+:$PYTHONPATH}
  log "runtime from $archive (in $dir)"
}
# MetaWorld (metaworld, mujoco for CPython 3.12, gymnasium, language_world, glfw, PyOpenGL; ~8 MiB)
# and LIBERO (robosuite, LIBERO-Object/Spatial, mujoco, language_world, ...; ~29 MiB): whichever
# the call carried.
MW_BUNDLE=${MW_BUNDLE:-.mwbundle/metaworld312.tar.xz}
MW_BUNDLE_DIR=${MW_BUNDLE_DIR:-/tmp/metaworld312}
LIBERO_BUNDLE=${LIBERO_BUNDLE:-.libbundle/libero312.tar.xz}
LIBERO_BUNDLE_DIR=${LIBERO_BUNDLE_DIR:-/tmp/libero312}
if [ "${SETUP:-1}" = 1 ]; then
  [ -f "$MW_BUNDLE" ] && use_bundle "$MW_BUNDLE" "$MW_BUNDLE_DIR"
  [ -f "$LIBERO_BUNDLE" ] && use_bundle "$LIBERO_BUNDLE" "$LIBERO_BUNDLE_DIR"
fi
if [ "${SETUP:-1}" = 1 ] && [ -d .gl ] && [ "$(id -u)" = 0 ]; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
  egl_vendor=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
  [ -f "$egl_vendor" ] && export __EGL_VENDOR_LIBRARY_FILENAMES=$egl_vendor
fi
export PYTHONPATH=.:${PYTHONPATH:-} MUJOCO_GL=egl PYOPENGL_PLATFORM=egl PYTHONUNBUFFERED=1
