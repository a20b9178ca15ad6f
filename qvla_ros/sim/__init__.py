"""The benchmark: a 10-task MetaWorld suite with language instructions (suite.py), an environment
with two cheap offscreen cameras (env.py), scripted-expert demonstrations (demos.py, dataset.py)
and closed-loop evaluation of any policy with the policy contract (evaluate.py, metrics.py).
LIBERO, the paper's benchmark, lives in the libero/ subpackage (its own simulator, robosuite).

MuJoCo picks its OpenGL backend from MUJOCO_GL when it is first imported, so the choice is made
here, before any module of this package imports mujoco. Worker processes inherit it.
"""
import ctypes.util as _ctypes_util
import os as _os


def _choose_gl_backend() -> None:
    # EGL renders headless on a GPU and, through Mesa, on CPU too (measured ~16 ms vs ~24 ms with
    # OSMesa for one 128 px camera); OSMesa is the software fallback where libEGL is missing.
    if _os.environ.get("MUJOCO_GL"):
        return
    if _ctypes_util.find_library("EGL"):
        _os.environ["MUJOCO_GL"] = "egl"
    elif _ctypes_util.find_library("OSMesa"):
        _os.environ["MUJOCO_GL"] = "osmesa"
    if _os.environ.get("MUJOCO_GL") in ("egl", "osmesa"):
        # PyOpenGL must agree with MuJoCo about the platform.
        _os.environ.setdefault("PYOPENGL_PLATFORM", _os.environ["MUJOCO_GL"])


_choose_gl_backend()
