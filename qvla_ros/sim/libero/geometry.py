"""Where things are in a LIBERO scene, read from MuJoCo's model and data: an object's collision
box in the world and in its own frame, and the rotation helpers the scripted expert steers with.
Privileged state: only the scripted expert uses it."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Box", "body_subtree", "collision_box", "quat_xyzw_to_mat", "rotation_vector"]


@dataclass(frozen=True)
class Box:
    """An axis-aligned box (min and max corners, [3] each) in some frame."""

    lo: np.ndarray
    hi: np.ndarray

    @property
    def center(self) -> np.ndarray:
        return (self.lo + self.hi) / 2

    @property
    def size(self) -> np.ndarray:
        return self.hi - self.lo


def body_subtree(model, root: int) -> list[int]:
    """Ids of body `root` and every body below it (an object is a small tree of bodies)."""
    ids = [root]
    for b in range(root + 1, model.nbody):
        if model.body_parentid[b] in ids:
            ids.append(b)
    return ids


def _geom_corners(model, data, geom: int) -> np.ndarray:
    """The 8 world-frame corners of one geom's bounding box (MuJoCo's geom_aabb: centre and
    half-sizes in the geom's frame)."""
    center, half = model.geom_aabb[geom, :3], model.geom_aabb[geom, 3:]
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], float)
    local = center + signs * half
    return data.geom_xpos[geom] + local @ data.geom_xmat[geom].reshape(3, 3).T


def collision_box(model, data, root_body: int, frame: np.ndarray | None = None) -> Box:
    """Bounding box of the collision geoms (those that touch anything) of a body's subtree.

    Args:
        frame: None: world axes. A 3x3 rotation (columns = the frame's axes in the world): the
            box in those axes, e.g. the object's own, where a box object's box is tight.
    """
    bodies = set(body_subtree(model, root_body))
    geoms = [g for g in range(model.ngeom) if model.geom_bodyid[g] in bodies
             and (model.geom_contype[g] or model.geom_conaffinity[g])]
    if not geoms:
        raise ValueError(f"body {root_body} has no collision geoms")
    corners = np.concatenate([_geom_corners(model, data, g) for g in geoms])
    if frame is not None:
        corners = corners @ frame
    return Box(corners.min(axis=0), corners.max(axis=0))


def quat_xyzw_to_mat(q: np.ndarray) -> np.ndarray:
    """Rotation matrix of a unit quaternion in robosuite's xyzw order."""
    x, y, z, w = (float(v) for v in q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def rotation_vector(r: np.ndarray) -> np.ndarray:
    """Axis * angle of a rotation matrix (angle in [0, pi])."""
    cos = np.clip((np.trace(r) - 1) / 2, -1.0, 1.0)
    angle = float(np.arccos(cos))
    if angle < 1e-8:
        return np.zeros(3)
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    if np.pi - angle < 1e-4:
        # Near pi the antisymmetric part vanishes: the axis is the dominant column of R + I.
        m = (r + np.eye(3)) / 2
        axis = m[:, int(np.argmax(np.diag(m)))]
    return axis / np.linalg.norm(axis) * angle
