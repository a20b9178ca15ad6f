"""One task of the suite as an environment with camera observations.

    env = SuiteEnv("drawer-open")
    obs = env.reset(seed=1_000_000)     # {"images": uint8 [2, 128, 128, 3], "proprio": float32 [4],
                                        #  "instruction": str}
    obs, success = env.step(action)     # action: 4 floats in [-1, 1] (xyz delta, gripper)

Rendering uses one `mujoco.Renderer` per environment with the cheap settings measured in
ENVIRONMENT.md: no shadows, no reflections, no multisampling (`offsamples = 0`), which makes a
128 px frame ~10x cheaper than MetaWorld's own `render()`. Site markers (goal spheres, gripper
sites) are hidden: they would give away the task that only the instruction should tell.
"""
from __future__ import annotations

import os
from typing import Sequence

import mujoco
import numpy as np
from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE

from .suite import DEFAULT_MAX_STEPS, TaskSpec, get_task

__all__ = ["SuiteEnv", "DEFAULT_CAMERAS", "DEFAULT_IMAGE_SIZE", "PROPRIO_DIM", "ACTION_DIM"]

# Third-person view of the whole workspace + a view that travels with the gripper (the
# OpenVLA-OFT pairing of an agent-view and a wrist camera).
DEFAULT_CAMERAS: tuple[str, ...] = ("corner", "gripper_follow")

# Virtual cameras: (azimuth, elevation, distance) of a free camera looking at the hand, re-aimed
# before every frame. MetaWorld's own hand cameras do not work for every scene: behindGripper
# sits inside the arm when the hand starts near the base (faucet, window scenes) and gripperPOV
# sees mostly the table. From the front-left and above, this one shows the fingers together with
# the object they act on in all ten scenes.
VIRTUAL_CAMERAS: dict[str, tuple[float, float, float]] = {"gripper_follow": (135.0, -45.0, 0.6)}
DEFAULT_IMAGE_SIZE = 128
PROPRIO_DIM = 4   # end-effector xyz + gripper opening (0 closed .. 1 open)
ACTION_DIM = 4    # xyz end-effector delta + gripper effort, each in [-1, 1]

# Cameras whose MetaWorld definition renders the image upside down (rotated 180 degrees).
_ROTATED_180 = frozenset({"corner"})

# MuJoCo's physics and MetaWorld's episode bookkeeping refuse steps past this.
_METAWORLD_MAX_PATH = 500


def _align_gl_backend() -> None:
    """Make mujoco use the backend qvla_ros.sim chose even if mujoco was imported earlier
    (e.g. through metaworld) while MUJOCO_GL was unset: mujoco binds its GL context class at its
    own import, and without a display the default (GLFW) cannot render."""
    from mujoco import gl_context
    wanted = os.environ.get("MUJOCO_GL", "").lower()
    if wanted == "egl":
        from mujoco.egl import GLContext
    elif wanted == "osmesa":
        from mujoco.osmesa import GLContext
    else:
        return
    if gl_context.GLContext is not GLContext:
        gl_context.GLContext = GLContext


_align_gl_backend()


class SuiteEnv:
    """A MetaWorld v3 task with the suite's observations.

    Args:
        task: task name or TaskSpec of the suite.
        image_size: side of the square camera images in pixels.
        cameras: MuJoCo camera names, in the order they appear in `images`.
        max_steps: steps after which an episode ends as failed (see suite.DEFAULT_MAX_STEPS).
    """

    action_dim = ACTION_DIM
    proprio_dim = PROPRIO_DIM

    def __init__(self, task: str | TaskSpec, image_size: int = DEFAULT_IMAGE_SIZE,
                 cameras: Sequence[str] = DEFAULT_CAMERAS, max_steps: int = DEFAULT_MAX_STEPS):
        self.task = get_task(task)
        if not isinstance(image_size, int) or not 16 <= image_size <= 1024:
            raise ValueError(f"image_size must be an int in [16, 1024], got {image_size!r}")
        if not 1 <= max_steps <= _METAWORLD_MAX_PATH:
            raise ValueError(f"max_steps must be in [1, {_METAWORLD_MAX_PATH}], got {max_steps}")
        cameras = tuple(cameras)
        if not cameras:
            raise ValueError("at least one camera is needed")
        self.image_size = image_size
        self.cameras = cameras
        self.max_steps = max_steps

        env_cls = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{self.task.env_name}-goal-observable"]
        self._env = env_cls(seed=0)
        # Draw each episode's initial state from the env's own seeded RNG (see reset), not from
        # numpy's global one and not from a frozen vector.
        self._env._freeze_rand_vec = False
        self._env.seeded_rand_vec = True

        model = self._env.model
        known = [model.camera(i).name for i in range(model.ncam)] + list(VIRTUAL_CAMERAS)
        unknown = [c for c in cameras if c not in known]
        if unknown:
            raise ValueError(f"unknown camera(s) {unknown}; this scene has {known}")
        model.vis.quality.offsamples = 0
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, image_size)
        model.vis.global_.offheight = max(model.vis.global_.offheight, image_size)
        try:
            self._renderer = mujoco.Renderer(model, image_size, image_size)
        except Exception as exc:
            raise RuntimeError(
                f"MuJoCo could not render offscreen with MUJOCO_GL={os.environ.get('MUJOCO_GL')!r} "
                f"({exc}). Set MUJOCO_GL=egl (GPU or Mesa) or osmesa before mujoco is first "
                "imported, or import qvla_ros.sim first, which picks one.") from exc
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        self._scene_option = mujoco.MjvOption()
        self._scene_option.sitegroup[:] = 0
        self._hand_id = model.body("hand").id
        self._virtual = {}
        for name in cameras:
            if name in VIRTUAL_CAMERAS:
                cam = mujoco.MjvCamera()
                cam.type = mujoco.mjtCamera.mjCAMERA_FREE
                cam.azimuth, cam.elevation, cam.distance = VIRTUAL_CAMERAS[name]
                self._virtual[name] = cam

        self._state: np.ndarray | None = None
        self.steps = 0
        self.seed: int | None = None

    # -- observations --------------------------------------------------------------------------
    def render(self) -> np.ndarray:
        """Images of the current state: uint8 [n_cams, H, W, 3] RGB."""
        out = np.empty((len(self.cameras), self.image_size, self.image_size, 3), np.uint8)
        data = self._env.data
        for i, cam in enumerate(self.cameras):
            camera = self._virtual.get(cam, cam)
            if cam in self._virtual:
                camera.lookat[:] = data.xpos[self._hand_id]
            self._renderer.update_scene(data, camera=camera, scene_option=self._scene_option)
            img = self._renderer.render()
            out[i] = img[::-1, ::-1] if cam in _ROTATED_180 else img
        return out

    @property
    def state(self) -> np.ndarray:
        """MetaWorld's 39-float ground-truth state (hand, gripper, objects, previous frame, goal).
        Privileged: only the scripted expert reads it."""
        if self._state is None:
            raise RuntimeError("reset() the environment first")
        return self._state

    @property
    def proprio(self) -> np.ndarray:
        """End-effector xyz + gripper opening, float32 [4]."""
        return self.state[:PROPRIO_DIM].astype(np.float32)

    def observation(self, render: bool = True) -> dict:
        """The observation dict; images is None when render=False (a step nobody looks at)."""
        return {"images": self.render() if render else None, "proprio": self.proprio,
                "instruction": self.task.instruction}

    # -- episode -------------------------------------------------------------------------------
    def reset(self, seed: int, render: bool = True) -> dict:
        """Start an episode whose initial state is a function of `seed` alone."""
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self._env.seed(int(seed))
        self._state, _ = self._env.reset()
        self.steps = 0
        self.seed = int(seed)
        return self.observation(render)

    def step(self, action, render: bool = True) -> tuple[dict, bool]:
        """Apply one action; returns (observation, success). The episode is over when success is
        True or `steps == max_steps`; stepping past that raises."""
        if self._state is None:
            raise RuntimeError("reset() the environment first")
        if self.steps >= self.max_steps:
            raise RuntimeError(f"episode already ran its {self.max_steps} steps; reset() first")
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"action must have {ACTION_DIM} values, got shape {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action is not finite: {action}")
        # MetaWorld clips the xyz part itself but not the gripper effort; clip all four so every
        # action the simulator sees lies in the documented space.
        state, _, _, _, info = self._env.step(np.clip(action, -1.0, 1.0).astype(np.float32))
        self._state = state
        self.steps += 1
        return self.observation(render), bool(info["success"])

    @property
    def done_by_time(self) -> bool:
        return self.steps >= self.max_steps

    def close(self) -> None:
        renderer, self._renderer = getattr(self, "_renderer", None), None
        if renderer is not None:
            renderer.close()
        env = getattr(self, "_env", None)
        if env is not None:
            env.close()
            self._env = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
