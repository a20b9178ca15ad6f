"""Demonstrations: generation, on-disk round trip, resume, damaged files, offline action error."""
import json
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from qvla_ros.dataset import (MANIFEST, DemoDataset, DemoFileError, read_episode,
                                  write_episode)
from qvla_ros.sim.demos import generate_demos
from qvla_ros.sim.metrics import offline_action_error
from qvla_ros.sim.suite import get_task

KW = dict(tasks="handle-press", image_size=32, cameras=("corner", "gripper_follow"), workers=0,
          batch_size=2, progress=False)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("demos")
    generate_demos(root, episodes_per_task=2, **KW)
    return root


def test_demos_round_trip(demo_dir):
    data = DemoDataset(demo_dir)
    assert len(data) == 2
    manifest = data.manifest
    assert manifest["complete"] and manifest["recipe"]["image_size"] == 32
    for entry, ep in zip(manifest["episodes"], data.episodes()):
        t = entry["length"]
        assert ep["images"].shape == (t, 2, 32, 32, 3) and ep["images"].dtype == np.uint8
        assert ep["proprio"].shape == (t, 4) and ep["proprio"].dtype == np.float32
        assert ep["actions"].shape == (t, 4) and ep["actions"].dtype == np.float32
        assert np.abs(ep["actions"]).max() <= 1.0
        assert ep["task"] == "handle-press" and ep["seed"] == entry["seed"]
        assert ep["instruction"] == get_task("handle-press").instruction
    assert [e["seed"] for e in manifest["episodes"]] == [0, 1]


def test_resume_adds_only_missing_episodes_and_keeps_files(demo_dir):
    files = sorted(demo_dir.glob("handle-press/*.npz"))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    manifest = generate_demos(demo_dir, episodes_per_task=3, **KW)
    assert manifest["runs"][-1]["episodes_written"] == 1
    assert len(DemoDataset(demo_dir)) == 3
    assert all(f.stat().st_mtime_ns == stamps[f] for f in files)
    # A folder made with other settings is refused, and nothing in it changes.
    with pytest.raises(ValueError, match="image_size"):
        generate_demos(demo_dir, episodes_per_task=3, **{**KW, "image_size": 64})
    assert len(DemoDataset(demo_dir)) == 3


def test_episode_file_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    ep = dict(images=rng.integers(0, 256, (5, 2, 8, 8, 3), dtype=np.uint8),
              proprio=rng.standard_normal((5, 4)).astype(np.float32),
              actions=rng.uniform(-1, 1, (5, 4)).astype(np.float32))
    path = write_episode(tmp_path / "t" / "seed_0000007.npz", instruction="open it", task="t",
                         seed=7, **ep)
    back = read_episode(path)
    for key, value in ep.items():
        np.testing.assert_array_equal(back[key], value)
    assert (back["instruction"], back["task"], back["seed"]) == ("open it", "t", 7)
    assert not list(tmp_path.glob("t/*.tmp"))


def test_damaged_files_name_themselves(demo_dir, tmp_path):
    good = sorted(demo_dir.glob("handle-press/*.npz"))[0]
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(os.urandom(1000))
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    for path, message in [(truncated, "damaged"), (garbage, "damaged"), (other, "missing"),
                          (tmp_path / "absent.npz", "missing")]:
        with pytest.raises(DemoFileError, match=path.name) as info:
            read_episode(path)
        assert message in str(info.value)


def test_incomplete_or_foreign_folders_are_refused(demo_dir, tmp_path):
    with pytest.raises(DemoFileError, match="no manifest.json"):
        DemoDataset(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(DemoFileError, match="damaged manifest"):
        DemoDataset(tmp_path)
    manifest = json.loads((demo_dir / MANIFEST).read_text())
    (tmp_path / MANIFEST).write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(DemoFileError, match="not finished"):
        DemoDataset(tmp_path)
    assert len(DemoDataset(tmp_path, allow_incomplete=True)) == 0
    with pytest.raises(ValueError, match="split"):
        DemoDataset(demo_dir, split="test")


def test_split_holds_out_by_seed(demo_dir):
    train, val = DemoDataset(demo_dir, split="train"), DemoDataset(demo_dir, split="val")
    assert len(train) + len(val) == len(DemoDataset(demo_dir))
    assert not set(train.files) & set(val.files)


@dataclass
class _Config:
    horizon: int = 3


class ReplayPolicy:
    """Returns the recorded actions that followed each frame (found by its proprio): zero error."""

    def __init__(self, dataset, offset=0.0):
        self.config = _Config()
        self.offset = offset
        self.table = {}
        for ep in dataset.episodes():
            a = ep["actions"]
            for t in range(len(a)):
                idx = np.minimum(np.arange(t, t + 3), len(a) - 1)
                self.table[ep["proprio"][t].tobytes()] = a[idx]

    def __call__(self, images, instruction, proprio):
        rows = [self.table[p.numpy().tobytes()] + self.offset for p in proprio]
        return torch.from_numpy(np.stack(rows))


def test_offline_action_error_is_zero_for_replay_and_measures_offsets(demo_dir):
    data = DemoDataset(demo_dir)
    exact = offline_action_error(ReplayPolicy(data), data, stride=3, batch_size=7)
    assert exact["l1"] == 0.0 and exact["l2"] == 0.0 and exact["frames"] > 10
    shifted = offline_action_error(ReplayPolicy(data, offset=0.1), data, stride=3, batch_size=7)
    assert shifted["l1"] == pytest.approx(0.1, abs=1e-6)
    assert shifted["l2"] == pytest.approx(0.2, abs=1e-6)   # sqrt(4 * 0.1^2)
    assert shifted["frames"] == exact["frames"]
