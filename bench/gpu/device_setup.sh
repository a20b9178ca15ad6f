# Sourced by the device-call scripts in this folder (needs PY, LOG and a `log` function):
# puts the carried MetaWorld runtime (.mwbundle) on PYTHONPATH, installs the carried wheels
# (.whl_train, the older way: too large beside the tree now) and GL loader debs (.gl) that the
# device image lacks, then points MuJoCo at EGL. SETUP=0 skips all that (a local dry run must not
# unpack libraries into /).
if [ "${SETUP:-1}" = 1 ] && [ -d .whl_train ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl_train/*.whl >>"$LOG" 2>&1 || log "pip install failed"
  export PYTHONPATH=/tmp/site
fi
# scripts/make_metaworld_bundle.sh's archive (metaworld, mujoco for CPython 3.12, gymnasium,
# language_world, glfw, PyOpenGL; ~8 MiB): unpacked once to $MW_BUNDLE_DIR, put first on
# PYTHONPATH (before .whl_train's /tmp/site where both were carried).
MW_BUNDLE=${MW_BUNDLE:-.mwbundle/metaworld312.tar.xz}
MW_BUNDLE_DIR=${MW_BUNDLE_DIR:-/tmp/metaworld312}
if [ "${SETUP:-1}" = 1 ] && [ -f "$MW_BUNDLE" ]; then
  if [ ! -d "$MW_BUNDLE_DIR/site-packages" ]; then
    rm -rf "$MW_BUNDLE_DIR.part" && mkdir -p "$MW_BUNDLE_DIR.part" &&
      tar -C "$MW_BUNDLE_DIR.part" --strip-components=1 -xJf "$MW_BUNDLE" >>"$LOG" 2>&1 &&
      rm -rf "$MW_BUNDLE_DIR" && mv "$MW_BUNDLE_DIR.part" "$MW_BUNDLE_DIR" ||
      log "could not unpack $MW_BUNDLE"
  fi
  export PYTHONPATH=$MW_BUNDLE_DIR/site-packages${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "${SETUP:-1}" = 1 ] && [ -d .gl ] && [ "$(id -u)" = 0 ]; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
  egl_vendor=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
  [ -f "$egl_vendor" ] && export __EGL_VENDOR_LIBRARY_FILENAMES=$egl_vendor
fi
export PYTHONPATH=.:${PYTHONPATH:-} MUJOCO_GL=egl PYOPENGL_PLATFORM=egl PYTHONUNBUFFERED=1
