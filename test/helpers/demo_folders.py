"""Synthetic demonstration folders in the project's format (qvla_ros/dataset.py) for tests that
need calibration ("train") and offline ("val") frames but no simulator: random frames, by default
seeds 0-1 train and seed 9 held out (dataset.HELD_OUT_EVERY)."""
import numpy as np

from qvla_ros.dataset import MANIFEST, episode_path, write_episode, write_json_atomic


def demo_folder(root, tasks, n_cams, size, proprio_dim=4, action_dim=4, frames=12, recipe=None,
                seeds=(0, 1, 9)):
    """`tasks`: (name, instruction) pairs; `seeds`: each task's episodes. Returns root."""
    rng = np.random.default_rng(0)
    entries = []
    for name, instruction in tasks:
        for seed in seeds:
            path = episode_path(root, name, seed)
            write_episode(path, rng.integers(0, 256, (frames, n_cams, size, size, 3), dtype=np.uint8),
                          rng.normal(size=(frames, proprio_dim)).astype(np.float32),
                          rng.uniform(-1, 1, (frames, action_dim)).astype(np.float32), instruction, name, seed)
            entries.append({"task": name, "seed": seed, "file": str(path.relative_to(root))})
    write_json_atomic(root / MANIFEST, {"recipe": {"test": True, **(recipe or {})}, "complete": True,
                                        "episodes": entries})
    return root


def metaworld_demo_folder(root, n_cams, size):
    """The first two MetaWorld tasks, 4 proprio values, 4-d actions."""
    from qvla_ros.sim.suite import TASKS

    return demo_folder(root, [(t.name, t.instruction) for t in TASKS[:2]], n_cams, size)
