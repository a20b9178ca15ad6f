# Sourced by the device-call scripts in this folder (needs PY, LOG and a `log` function):
# installs the carried wheels (.whl_train) and GL loader debs (.gl) that the device image lacks,
# then points MuJoCo at EGL. SETUP=0 skips the installs (a local dry run must not unpack
# libraries into /).
if [ "${SETUP:-1}" = 1 ] && [ -d .whl_train ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl_train/*.whl >>"$LOG" 2>&1 || log "pip install failed"
  export PYTHONPATH=/tmp/site
fi
if [ "${SETUP:-1}" = 1 ] && [ -d .gl ] && [ "$(id -u)" = 0 ]; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
  egl_vendor=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
  [ -f "$egl_vendor" ] && export __EGL_VENDOR_LIBRARY_FILENAMES=$egl_vendor
fi
export PYTHONPATH=.:${PYTHONPATH:-} MUJOCO_GL=egl PYOPENGL_PLATFORM=egl PYTHONUNBUFFERED=1
