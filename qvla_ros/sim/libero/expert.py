"""A scripted pick-and-place expert for LIBERO from the simulator's state.

For tasks whose goal is one `(in|on) OBJECT TARGET` predicate (all of LIBERO-Object: "pick up X
and place it in the basket"; all of LIBERO-Spatial: "pick up the black bowl ... and place it on
the plate") it runs approach, descend, grasp, lift, carry, lower, release, retreat, steering the
end effector with the 7-d delta actions a policy sends (robosuite's OSC_POSE controller), the
gripper pointing straight down and turned so that the fingers close across the object's narrow
side.

Grasp points come from the object's collision box: objects that fit between the open fingers
(7.7 cm) are taken at their centre a few cm below the top; wider ones (the 10.7 cm bowls) by the
rim, on the side with the most room from other objects.

It is privileged: it reads the true object poses through the environment (`bind_envs`, as the
MetaWorld expert does) and never looks at the images.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .env import ACTION_DIM, PROPRIO_DIM, LiberoEnv
from .geometry import Box, collision_box, quat_xyzw_to_mat, rotation_vector

__all__ = ["LiberoExpert", "LiberoExpertFactory", "UnsupportedTask", "pick_place_goal",
           "run_expert_episode"]

# Panda fingers fully open are 7.7 cm apart (measured); leave room to come down around an object.
_FINGER_SPAN = 0.077
_FIT_MARGIN = 0.012
_POS_GAIN = 1.0 / 0.05     # 1.0 action = 5 cm a step: a full action for a 5 cm error
_ROT_GAIN = 1.0 / 0.5      # 1.0 action = 0.5 rad a step
_ROT_LIMIT = 0.4           # turns slowly enough that the arm does not swing objects about
_CLOSE_STEPS = 12          # the fingers need ~10 control steps to close on an object
_OPEN_STEPS = 10
_HOVER = 0.08              # above the grasp point before descending onto it
_FINGERTIP_DEPTH = 0.015   # how far the fingertips reach below the end-effector site
_ENOUGH_ROOM = 0.02        # clearance from obstacles for an open finger at a rim grasp
# A held object's weight leaves the controller a steady lag of 1-2 cm (measured with a bowl held
# by its rim): the carry counts as arrived within this, or after this many steps.
_CARRY_TOL = 0.02
_CARRY_STEPS = 80


class UnsupportedTask(ValueError):
    """The task's goal is not a single pick-and-place predicate the expert knows."""


def pick_place_goal(libero_env) -> tuple[str, str, str]:
    """(relation, object, target body) of a task whose goal is one `in`/`on` predicate; the
    target of `in` is a region such as "basket_1_contain_region": its body is the object the
    region belongs to."""
    goal = libero_env.parsed_problem["goal_state"]
    if len(goal) != 1 or goal[0][0] not in ("in", "on") or len(goal[0]) != 3:
        raise UnsupportedTask(f"goal {goal} is not one (in|on) OBJECT TARGET predicate")
    relation, obj, target = goal[0]
    bodies = libero_env.obj_body_id
    if target not in bodies:
        owners = [name for name in bodies if target.startswith(name + "_")]
        if not owners:
            raise UnsupportedTask(f"goal target {target!r} belongs to no object of the scene")
        target = max(owners, key=len)
    return relation, obj, target


@dataclass
class _Plan:
    """Where one episode's grasp and placement happen (world frame, metres)."""

    grasp: np.ndarray        # end-effector position at the grasp
    place: np.ndarray        # end-effector position when the object is released
    carry_z: float           # height of the carry between them
    closing_axis: np.ndarray # horizontal unit vector the fingers close along
    phase: str = "above"
    phase_steps: int = 0


def _horizontal_axes(rot: np.ndarray, box: Box) -> list[tuple[np.ndarray, float]]:
    """The object's own axes that lie (nearly) flat, with the object's extent along each."""
    out = []
    for k in range(3):
        axis = rot[:, k]
        if abs(axis[2]) < 0.5:
            flat = np.array([axis[0], axis[1], 0.0])
            out.append((flat / np.linalg.norm(flat), float(box.size[k])))
    return out


class LiberoExpert:
    """`actions = expert(images, instruction, proprio)` -> float32 [B, 1, 7], or `act(env)`."""

    def __init__(self):
        self.config = _ExpertConfig()
        self._envs = None
        self._plans: dict[int, _Plan] = {}

    # -- the policy contract ------------------------------------------------------------------
    def bind_envs(self, envs) -> None:
        """The environments whose observations the next call receives, in batch order."""
        self._envs = list(envs)

    def __call__(self, images, instruction, proprio) -> torch.Tensor:
        if self._envs is None or len(self._envs) != len(instruction):
            raise RuntimeError("the scripted expert reads the true state: bind_envs(envs) with one "
                               "environment per observation before calling it")
        out = np.stack([self.act(env) for env in self._envs])[:, None, :].astype(np.float32)
        self._envs = None
        return torch.from_numpy(out)

    # -- one step ------------------------------------------------------------------------------
    def act(self, env: LiberoEnv) -> np.ndarray:
        """The next action for `env` (float64 [7] in [-1, 1])."""
        key = id(env)
        # A new episode (its first step) gets a new plan, made from its initial state.
        if key not in self._plans or env.steps == 0:
            self._plans[key] = self._plan(env)
        return self._control(env, self._plans[key])

    def _plan(self, env: LiberoEnv) -> _Plan:
        lenv = env.libero_env
        model, data = env.sim.model._model, env.sim.data._data
        _, obj, target = pick_place_goal(lenv)
        obj_id, target_id = lenv.obj_body_id[obj], lenv.obj_body_id[target]
        obj_rot = data.xmat[obj_id].reshape(3, 3)
        world = collision_box(model, data, obj_id)
        own = collision_box(model, data, obj_id, frame=obj_rot)
        target_box = collision_box(model, data, target_id)

        flat = _horizontal_axes(obj_rot, own)
        narrow_axis, narrow = min(flat, key=lambda a: a[1]) if flat else (np.array([0., 1., 0.]), 0.)
        height = float(world.size[2])
        top = float(world.hi[2])
        grasp_xy = world.center[:2].copy()
        if narrow <= _FINGER_SPAN - _FIT_MARGIN:
            closing = narrow_axis
            grasp_z = max(top - 0.03, float(world.lo[2]) + 0.4 * height, float(world.lo[2]) + 0.012)
        else:
            # Too wide to take whole: pinch the rim, the wall between the fingers. Fingers close
            # along the radius, so the wall lies across their path.
            radius = float(min(world.size[0], world.size[1])) / 2 - 0.008
            grasp_z = top - 0.02
            # Obstacles are everything else the open fingers could touch at the grasp height:
            # objects and fixtures (cabinets, stoves) whose top reaches above the fingertips.
            others = [box for name, i in lenv.obj_body_id.items() if name != obj
                      for box in [_maybe_box(model, data, i)]
                      if box is not None and box.hi[2] > grasp_z - _FINGERTIP_DEPTH]
            # Enough room beats more room; among rim points with enough, the one nearest the
            # robot's base: far points are at the edge of the arm's reach, where it sags.
            base = data.xpos[model.body("robot0_base").id][:2]
            best = None
            for angle in np.linspace(0, 2 * np.pi, 16, endpoint=False):
                direction = np.array([np.cos(angle), np.sin(angle)])
                point = grasp_xy + radius * direction
                # Both open fingers, half the span either side of the grasp point, need room.
                fingers = [point + sign * (_FINGER_SPAN / 2) * direction for sign in (-1, 1)]
                room = min((_box_distance_xy(b, f) for b in others for f in fingers), default=1.0)
                score = (min(room, _ENOUGH_ROOM), -float(np.linalg.norm(point - base)))
                if best is None or score > best[0]:
                    best = (score, direction)
            direction = best[1]
            grasp_xy = grasp_xy + radius * direction
            closing = np.array([direction[0], direction[1], 0.0])
        grasp = np.array([grasp_xy[0], grasp_xy[1], grasp_z])
        below = grasp_z - float(world.lo[2])  # grasp point above the object's bottom
        offset_xy = grasp_xy - world.center[:2]
        place_xy = target_box.center[:2] + offset_xy
        target_top = float(target_box.hi[2])
        place_z = target_top + below + 0.02
        carry_z = max(place_z + 0.06, grasp_z + 0.12)
        place = np.array([place_xy[0], place_xy[1], place_z])
        return _Plan(grasp=grasp, place=place, carry_z=carry_z, closing_axis=closing)

    def _control(self, env: LiberoEnv, plan: _Plan) -> np.ndarray:
        raw = env.raw_observation
        eef = np.asarray(raw["robot0_eef_pos"], float)
        rot = quat_xyzw_to_mat(raw["robot0_eef_quat"])
        phase = plan.phase
        gripper = 1.0 if phase in ("close", "lift", "carry", "lower") else -1.0
        hover = plan.grasp + np.array([0, 0, _HOVER])
        if phase == "above":
            goal, tol = np.array([plan.grasp[0], plan.grasp[1], max(hover[2], eef[2])]), 0.012
            if np.linalg.norm((goal - eef)[:2]) < tol and self._aligned(rot, plan):
                self._advance(plan, "descend")
        elif phase == "descend":
            goal = plan.grasp
            if np.linalg.norm(goal - eef) < 0.008 or plan.phase_steps > 40:
                self._advance(plan, "close")
        elif phase == "close":
            goal = plan.grasp
            if plan.phase_steps >= _CLOSE_STEPS:
                self._advance(plan, "lift")
        elif phase == "lift":
            goal = np.array([plan.grasp[0], plan.grasp[1], plan.carry_z])
            if eef[2] > plan.carry_z - 0.02:
                self._advance(plan, "carry")
        elif phase == "carry":
            goal = np.array([plan.place[0], plan.place[1], plan.carry_z])
            if np.linalg.norm((goal - eef)[:2]) < _CARRY_TOL or plan.phase_steps > _CARRY_STEPS:
                self._advance(plan, "lower")
        elif phase == "lower":
            goal = plan.place
            if eef[2] < plan.place[2] + 0.008 or plan.phase_steps > 30:
                self._advance(plan, "release")
        elif phase == "release":
            goal = plan.place
            if plan.phase_steps >= _OPEN_STEPS:
                self._advance(plan, "retreat")
        else:  # retreat: up and out of the way, so the object settles where it was put
            goal = np.array([plan.place[0], plan.place[1], plan.carry_z])
        plan.phase_steps += 1
        action = np.zeros(ACTION_DIM)
        action[:3] = np.clip((goal - eef) * _POS_GAIN, -1.0, 1.0)
        action[3:6] = np.clip(rotation_vector(self._target_rotation(rot, plan) @ rot.T) * _ROT_GAIN,
                              -_ROT_LIMIT, _ROT_LIMIT)
        action[6] = gripper
        return action

    @staticmethod
    def _advance(plan: _Plan, phase: str) -> None:
        plan.phase, plan.phase_steps = phase, 0

    @staticmethod
    def _target_rotation(rot: np.ndarray, plan: _Plan) -> np.ndarray:
        """Gripper pointing down (its z axis to -z), fingers closing along the plan's axis; of
        the two finger orders, the one nearer the current pose."""
        closing = plan.closing_axis
        if float(closing @ rot[:, 1]) < 0:
            closing = -closing
        approach = np.array([0.0, 0.0, -1.0])
        return np.column_stack([np.cross(closing, approach), closing, approach])

    def _aligned(self, rot: np.ndarray, plan: _Plan) -> bool:
        err = rotation_vector(self._target_rotation(rot, plan) @ rot.T)
        return float(np.linalg.norm(err)) < 0.08


def _maybe_box(model, data, body: int) -> Box | None:
    """The body's collision box, or None for bodies that collide with nothing (markers)."""
    try:
        return collision_box(model, data, body)
    except ValueError:
        return None


def _box_distance_xy(box: Box, point: np.ndarray) -> float:
    """Horizontal distance from a point to a box (0 inside it)."""
    d = np.maximum(np.maximum(box.lo[:2] - point, point - box.hi[:2]), 0.0)
    return float(np.linalg.norm(d))


@dataclass(frozen=True)
class _ExpertConfig:
    """Shape of the expert's interface (the policy contract's `config`): it ignores images, so
    any number and size; one reactive action per call."""

    n_cams: int | None = None
    image_size: int | None = None
    proprio_dim: int = PROPRIO_DIM
    horizon: int = 1
    action_dim: int = ACTION_DIM


class LiberoExpertFactory:
    """Picklable zero-argument factory of the expert (for worker processes)."""

    def __call__(self) -> LiberoExpert:
        return LiberoExpert()

    def describe(self) -> dict:
        return {"kind": "scripted-expert", "source": "qvla_ros.sim.libero.expert (simulator state)"}


def run_expert_episode(env: LiberoEnv, expert: LiberoExpert, init_state: int) -> dict:
    """One episode of the expert from a bundled initial state, without rendering (the expert
    never looks at images). Returns {"task", "init_state", "success", "steps"}."""
    env.reset(init_state, render=False)
    success = False
    while not (success or env.done_by_time):
        _, success = env.step(expert.act(env), render=False)
    return {"task": env.task.name, "init_state": int(init_state), "success": bool(success),
            "steps": env.steps}
