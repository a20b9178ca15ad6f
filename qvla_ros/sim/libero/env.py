"""One LIBERO task as an environment with the observations OpenVLA-OFT uses on LIBERO.

    env = LiberoEnv("libero_object", 0)
    obs = env.reset(3)               # initial state 3 of the task's 50 bundled ones
    # {"images": uint8 [2, 224, 224, 3] (agentview, wrist), "proprio": float32 [8],
    #  "instruction": "pick up the alphabet soup and place it in the basket"}
    obs, success = env.step(action)  # action: 7 floats in [-1, 1]

The contract is qvla_ros.sim.env.SuiteEnv's (reset, step(render=...), done_by_time, steps,
max_steps, task.name, task.instruction) with LIBERO's sizes: `reset` takes the index of one of
the task's bundled initial states where SuiteEnv takes a seed, the action is 7-d and the proprio
8-d.

Action: robosuite's OSC_POSE delta controller, as LIBERO's demonstrations and OFT use it: xyz
end-effector translation (1.0 = 5 cm a step), rotation as an axis-angle delta (1.0 = 0.5 rad a
step), gripper (-1 open, +1 close). Proprio: end-effector position (3), its orientation as an
axis-angle (3), the two finger joint positions (2).

Images come from robosuite's own renderer (the one LIBERO's camera observations use) and are
rotated 180 degrees, the preprocessing OFT's LIBERO policies were trained with. They are rendered
only when asked for: at 224 px the two cameras cost ~0.12 s on CPU (OSMesa, measured), ten times
a physics step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from . import simulator_missing

__all__ = ["LiberoTask", "LiberoEnv", "get_libero_task", "suite_size", "SUITE_MAX_STEPS", "ACTION_DIM",
           "PROPRIO_DIM", "PROPRIO_NAMES", "DEFAULT_CAMERAS", "DEFAULT_IMAGE_SIZE", "DEMO_INIT_STATES",
           "EVAL_INIT_STATES", "demo_init_state", "eval_init_state", "is_eval_init_state",
           "quat_to_axis_angle"]

ACTION_DIM = 7
PROPRIO_DIM = 8
# What the 8 proprio values are (OFT's LIBERO order), e.g. as JointState names over ROS.
PROPRIO_NAMES: tuple[str, ...] = ("eef_x", "eef_y", "eef_z", "eef_ax", "eef_ay", "eef_az",
                                  "finger_l", "finger_r")
# Third-person and wrist camera, OFT's LIBERO pair.
DEFAULT_CAMERAS: tuple[str, ...] = ("agentview", "robot0_eye_in_hand")
DEFAULT_IMAGE_SIZE = 224
# Episode lengths OpenVLA(-OFT)'s LIBERO evaluation allows per suite: about 1.5x its longest
# demonstration.
SUITE_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300,
                   "libero_10": 520, "libero_90": 400}
# Objects are placed slightly above their rest pose in the initial states and fall for a few
# steps; like OFT's evaluation, the environment waits these out (gripper open, arm still) before
# the first observation, and they are not counted as episode steps.
SETTLE_STEPS = 10

# The split of every task's 50 bundled initial states. LIBERO ships no more, so demonstrations
# and evaluation share them and must never overlap: demonstrations (the scripted expert's,
# `qvla demos`) start from states 0-29, evaluation (`qvla eval`, the ROS bridge) from 30-49 only.
# (bench/libero/expert.json measured the expert itself on 10-29: it trains nothing.)
DEMO_INIT_STATES = range(0, 30)
EVAL_INIT_STATES = range(30, 50)
_SETTLE_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)


@dataclass(frozen=True)
class LiberoTask:
    """One task of a LIBERO suite: `name` is "<suite>/<index>"."""

    suite: str
    index: int
    instruction: str
    bddl_file: str
    n_init_states: int

    @property
    def name(self) -> str:
        return f"{self.suite}/{self.index}"


def _benchmark_suite(suite: str):
    missing = simulator_missing()
    if missing:
        raise RuntimeError(missing)
    from libero.libero import benchmark
    known = benchmark.get_benchmark_dict()
    if suite not in known:
        standard = [s for s in SUITE_MAX_STEPS if s in known]
        raise ValueError(f"unknown LIBERO suite {suite!r}; standard suites: {standard}")
    return benchmark.get_benchmark(suite)(task_order_index=0)


def suite_size(suite: str) -> int:
    """Number of tasks of a LIBERO suite."""
    return _benchmark_suite(suite).n_tasks


def get_libero_task(suite: str, index: int) -> tuple[LiberoTask, np.ndarray]:
    """The task and its bundled initial states (float64 [n, state_dim], MuJoCo flattened states)."""
    from libero.libero import get_libero_path
    bench = _benchmark_suite(suite)
    if not 0 <= index < bench.n_tasks:
        raise ValueError(f"{suite} has tasks 0..{bench.n_tasks - 1}, got {index}")
    task = bench.get_task(index)
    init_states = np.asarray(bench.get_task_init_states(index))
    bddl = Path(get_libero_path("bddl_files")) / task.problem_folder / task.bddl_file
    return LiberoTask(suite, index, task.language, str(bddl), len(init_states)), init_states


def demo_init_state(episode: int) -> int:
    """Initial state of a task's demonstration attempt number `episode` (0..29)."""
    if not 0 <= episode < len(DEMO_INIT_STATES):
        raise ValueError(f"LIBERO demonstration attempt {episode} outside [0, {len(DEMO_INIT_STATES)}): "
                         f"demonstrations use initial states {DEMO_INIT_STATES.start}-"
                         f"{DEMO_INIT_STATES.stop - 1} only")
    return DEMO_INIT_STATES[episode]


def eval_init_state(episode: int, offset: int = 0) -> int:
    """Initial state of a task's evaluation episode number `episode` (from offset): 30, 31, ..."""
    i = episode + offset
    if episode < 0 or offset < 0 or i >= len(EVAL_INIT_STATES):
        raise ValueError(f"LIBERO evaluation episode {episode} (offset {offset}) outside the "
                         f"{len(EVAL_INIT_STATES)} held-out initial states "
                         f"{EVAL_INIT_STATES.start}-{EVAL_INIT_STATES.stop - 1}")
    return EVAL_INIT_STATES[i]


def is_eval_init_state(state: int) -> bool:
    return state in EVAL_INIT_STATES


def quat_to_axis_angle(quat_xyzw: np.ndarray) -> np.ndarray:
    """Axis-angle (axis * angle, angle in [0, pi]) of a unit quaternion in robosuite's xyzw order."""
    x, y, z, w = (float(v) for v in quat_xyzw)
    if w < 0:  # q and -q are one rotation; pick the one with angle <= pi
        x, y, z, w = -x, -y, -z, -w
    s = math.sqrt(max(0.0, 1.0 - min(w, 1.0) ** 2))
    if s < 1e-8:
        return np.zeros(3)
    angle = 2.0 * math.acos(min(w, 1.0))
    return np.array([x, y, z]) * (angle / s)


class LiberoEnv:
    """A LIBERO task with OFT's observations.

    Args:
        suite: suite name, e.g. "libero_object", "libero_spatial".
        task_index: task of the suite (0-based, the suite's own order).
        image_size: side of the square camera images; None or 0 cameras: no rendering at all
            (observations carry images=None; what the scripted expert needs).
        cameras: robosuite camera names, in the order they appear in `images`.
        max_steps: steps after which an episode ends as failed; default SUITE_MAX_STEPS[suite].
    """

    action_dim = ACTION_DIM
    proprio_dim = PROPRIO_DIM

    def __init__(self, suite: str, task_index: int, image_size: int = DEFAULT_IMAGE_SIZE,
                 cameras: Sequence[str] = DEFAULT_CAMERAS, max_steps: int | None = None):
        self.task, self._init_states = get_libero_task(suite, task_index)
        cameras = tuple(cameras)
        if cameras and (not isinstance(image_size, int) or not 16 <= image_size <= 1024):
            raise ValueError(f"image_size must be an int in [16, 1024], got {image_size!r}")
        self.max_steps = int(max_steps if max_steps is not None else SUITE_MAX_STEPS.get(suite, 400))
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.cameras = cameras
        self.image_size = image_size

        from libero.libero.envs.env_wrapper import ControlEnv
        # Camera observables off: robosuite would render them every step; render() draws them
        # with the same renderer only when an observation is looked at. hard_reset=False keeps
        # one model across episodes (reset then restores a bundled state): seconds saved each.
        self._env = ControlEnv(bddl_file_name=self.task.bddl_file, use_camera_obs=False,
                               has_offscreen_renderer=bool(cameras), hard_reset=False,
                               horizon=self.max_steps + SETTLE_STEPS + 1)
        self._env.seed(0)
        self._env.reset()
        sim = self._env.sim
        known = [sim.model.camera_id2name(i) for i in range(sim.model.ncam)]
        unknown = [c for c in cameras if c not in known]
        if unknown:
            raise ValueError(f"unknown camera(s) {unknown}; this scene has {known}")
        self._obs: dict | None = None
        self.steps = 0
        self.seed: int | None = None   # the initial state index (SuiteEnv's name for it)

    # -- observations --------------------------------------------------------------------------
    def render(self) -> np.ndarray:
        """Images of the current state: uint8 [n_cams, H, W, 3] RGB, upright (OFT's rotation)."""
        if not self.cameras:
            raise RuntimeError("this environment was made without cameras")
        s = self.image_size
        out = np.empty((len(self.cameras), s, s, 3), np.uint8)
        for i, cam in enumerate(self.cameras):
            out[i] = self._env.sim.render(camera_name=cam, width=s, height=s)[::-1, ::-1]
        return out

    @property
    def proprio(self) -> np.ndarray:
        """eef position (3) + eef axis-angle (3) + finger joint positions (2), float32 [8]."""
        obs = self._require_obs()
        return np.concatenate([obs["robot0_eef_pos"], quat_to_axis_angle(obs["robot0_eef_quat"]),
                               obs["robot0_gripper_qpos"]]).astype(np.float32)

    @property
    def raw_observation(self) -> dict:
        """robosuite's observation dict of the last step (object poses, robot state).
        Privileged: only the scripted expert reads it."""
        return self._require_obs()

    @property
    def sim(self):
        """robosuite's MjSim (model and data). Privileged: only the scripted expert reads it."""
        return self._env.sim

    @property
    def libero_env(self):
        """The underlying LIBERO (robosuite) environment: goal predicates, object handles."""
        return self._env.env

    def observation(self, render: bool = True) -> dict:
        """The observation dict; images is None when render=False or there are no cameras."""
        images = self.render() if render and self.cameras else None
        return {"images": images, "proprio": self.proprio, "instruction": self.task.instruction}

    def _require_obs(self) -> dict:
        if self._obs is None:
            raise RuntimeError("reset() the environment first")
        return self._obs

    # -- episode -------------------------------------------------------------------------------
    @property
    def n_init_states(self) -> int:
        return len(self._init_states)

    def reset(self, init_state: int, render: bool = True) -> dict:
        """Start an episode from bundled initial state `init_state` (0..n_init_states-1)."""
        if not isinstance(init_state, (int, np.integer)) or not 0 <= init_state < self.n_init_states:
            raise ValueError(f"init_state must be an int in [0, {self.n_init_states - 1}], "
                             f"got {init_state!r}")
        self._env.reset()
        self._obs = self._env.set_init_state(self._init_states[int(init_state)])
        for _ in range(SETTLE_STEPS):
            self._obs, _, _, _ = self._env.step(_SETTLE_ACTION)
        self.steps = 0
        self.seed = int(init_state)
        return self.observation(render)

    def step(self, action, render: bool = True) -> tuple[dict, bool]:
        """Apply one action; returns (observation, success). The episode is over when success is
        True or `steps == max_steps`; stepping past that raises."""
        self._require_obs()
        if self.steps >= self.max_steps:
            raise RuntimeError(f"episode already ran its {self.max_steps} steps; reset() first")
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"action must have {ACTION_DIM} values (xyz, axis-angle, gripper), "
                             f"got shape {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action is not finite: {action}")
        # The controller clips to its input range too; clipping here keeps every action the
        # simulator sees inside the documented space, the gripper included.
        self._obs, _, _, _ = self._env.step(np.clip(action, -1.0, 1.0))
        self.steps += 1
        return self.observation(render), bool(self._env.check_success())

    @property
    def done_by_time(self) -> bool:
        return self.steps >= self.max_steps

    def close(self) -> None:
        env, self._env = getattr(self, "_env", None), None
        if env is not None:
            env.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
