"""Calibration frames from a demonstration folder: sampling, splits, shapes, errors."""
import json

import numpy as np
import pytest
import torch

from qvla_ros.quant.calibration import CalibrationFrames, frames_from_demos
from qvla_ros.dataset import episode_path, write_episode


def _demo_folder(root, seeds=range(12), t=6):
    rng = np.random.default_rng(0)
    episodes = []
    for seed in seeds:
        task = "drawer-open" if seed % 2 else "drawer-close"
        path = write_episode(episode_path(root, task, seed), rng.integers(0, 255, (t, 2, 16, 16, 3), dtype=np.uint8),
                             rng.normal(size=(t, 4)).astype(np.float32), rng.uniform(-1, 1, (t, 4)).astype(np.float32),
                             f"instruction {task}", task, seed)
        episodes.append({"task": task, "seed": seed, "file": str(path.relative_to(root))})
    (root / "manifest.json").write_text(json.dumps({"recipe": {"test": True}, "complete": True, "episodes": episodes}))
    return root


def test_frames_from_demos_sample_and_split(tmp_path):
    root = _demo_folder(tmp_path / "demos")
    frames = frames_from_demos(root, 20, split="train", seed=3)
    assert len(frames) == 20 and frames.images.dtype == torch.uint8 and frames.images.shape[1:] == (2, 16, 16, 3)
    assert frames.actions.shape == (20, 4) and frames.proprio.dtype == torch.float32
    assert frames.source["split"] == "train" and frames.source["episodes"] == 11  # seed 9 is held out
    again = frames_from_demos(root, 20, split="train", seed=3)
    assert torch.equal(frames.images, again.images) and frames.instructions == again.instructions
    val = frames_from_demos(root, 4, split="val")
    assert set(val.instructions) == {"instruction drawer-open"} and val.source["episodes"] == 1
    images, instructions, proprio = frames.inputs(3)
    assert images.shape[0] == 60 and instructions[20:40] == frames.instructions
    assert torch.equal(images[40:60], frames.images)


def test_calibration_errors(tmp_path):
    with pytest.raises(ValueError, match="n_frames"):
        frames_from_demos(tmp_path, 0)
    with pytest.raises(ValueError, match="not a demonstration folder"):
        frames_from_demos(tmp_path, 4)
    with pytest.raises(ValueError, match="disagree"):
        CalibrationFrames(torch.zeros(2, 1, 4, 4, 3, dtype=torch.uint8), ["a"], torch.zeros(2, 4))
