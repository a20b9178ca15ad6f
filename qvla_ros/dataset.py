"""Demonstration datasets on disk: one compressed .npz per episode plus a manifest.json.

    DIR/manifest.json                     how the dataset was made (see sim/demos.py), and its episodes
    DIR/<task>/seed_0000012.npz           one successful episode:
        images       uint8   [T, n_cams, H, W, 3]   observation before each action (RGB)
        proprio      float32 [T, P]                 MetaWorld P=4: end-effector xyz + gripper opening
        actions      float32 [T, A]                 the action taken, in [-1, 1]; MetaWorld A=4
        instruction  str, task str, seed int64, format int64

LIBERO folders (`qvla demos --suite libero-object`) hold the same arrays with P=8, A=7 and two
224 px cameras; their task names are "<suite>/<index>", so an episode is
DIR/libero_object/3/seed_0000012.npz and the seed is the task's initial state.

Files are written atomically (qvla_ros/io.py), so a file that exists is complete; a crash
leaves at most a dotted `.NAME.XXXX.tmp` folder. `DemoDataset` streams episodes one file at a time (a training loop
never holds the dataset in memory) and checks each file, naming the file that is damaged.

The format sits below every stage (it imports nothing from qvla_ros but io): the simulation stage
writes it (sim/demos.py), training, calibration and the baseline comparison read it.

Held-out frames: episodes whose seed % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 form the "val"
split (10%); the rest are "train". Training uses split="train", offline metrics split="val".
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from .io import atomic_write, atomic_write_text

__all__ = ["DemoFileError", "DemoDataset", "write_episode", "read_episode", "episode_path",
           "MANIFEST", "FORMAT_VERSION", "HELD_OUT_EVERY", "is_held_out", "write_json_atomic"]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
HELD_OUT_EVERY = 10
_ARRAYS = {"images": (np.uint8, 5), "proprio": (np.float32, 2), "actions": (np.float32, 2)}


class DemoFileError(ValueError):
    """A demonstration file or manifest is missing, damaged or inconsistent."""


def is_held_out(seed: int) -> bool:
    return seed % HELD_OUT_EVERY == HELD_OUT_EVERY - 1


def episode_path(root: str | Path, task: str, seed: int) -> Path:
    return Path(root) / task / f"seed_{seed:07d}.npz"


def write_json_atomic(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def write_episode(path: str | Path, images, proprio, actions, instruction: str, task: str,
                  seed: int) -> Path:
    """Write one episode atomically (temp file + rename); returns its path."""
    images = np.asarray(images, np.uint8)
    proprio = np.asarray(proprio, np.float32)
    actions = np.asarray(actions, np.float32)
    t = len(actions)
    if images.ndim != 5 or images.shape[0] != t or images.shape[-1] != 3:
        raise ValueError(f"images must be [T={t}, n_cams, H, W, 3], got {images.shape}")
    if proprio.shape[0] != t or actions.ndim != 2:
        raise ValueError(f"proprio {proprio.shape} and actions {actions.shape} must share T")
    path = Path(path)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file, not a name: savez would append ".npz" to a name
            np.savez_compressed(
                f, images=images, proprio=proprio, actions=actions, instruction=np.array(instruction),
                task=np.array(task), seed=np.array(seed, np.int64), format=np.array(FORMAT_VERSION, np.int64))

    atomic_write(path, write)
    return path


def read_episode(path: str | Path) -> dict:
    """One episode as a dict of arrays (see the module docstring); DemoFileError if damaged."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DemoFileError(f"{path}: demonstration file is missing") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise DemoFileError(f"{path}: damaged demonstration file ({type(exc).__name__}: {exc}); "
                            "delete it and re-run `qvla demos` on the same folder to redo it") from exc
    missing = [k for k in (*_ARRAYS, "instruction", "task", "seed", "format") if k not in data]
    if missing:
        raise DemoFileError(f"{path}: not a demonstration file (missing {missing})")
    if int(data["format"]) != FORMAT_VERSION:
        raise DemoFileError(f"{path}: format {int(data['format'])}, this reader knows {FORMAT_VERSION}")
    t = len(data["actions"])
    for key, (dtype, ndim) in _ARRAYS.items():
        arr = data[key]
        if arr.dtype != dtype or arr.ndim != ndim or len(arr) != t or t == 0:
            raise DemoFileError(f"{path}: {key} has dtype {arr.dtype} shape {arr.shape}, expected "
                                f"{np.dtype(dtype)} with {ndim} dims and {t} > 0 frames")
    return {"images": data["images"], "proprio": data["proprio"], "actions": data["actions"],
            "instruction": str(data["instruction"]), "task": str(data["task"]),
            "seed": int(data["seed"])}


class DemoDataset:
    """A demonstration folder written by `qvla demos`.

    Args:
        path: the folder (with manifest.json).
        split: "all", "train" or "val" (see HELD_OUT_EVERY).
        tasks: restrict to these task names (None = all in the dataset).
        allow_incomplete: read a folder whose generation has not finished (resumable runs).
    """

    def __init__(self, path: str | Path, split: str = "all", tasks=None,
                 allow_incomplete: bool = False):
        self.path = Path(path)
        if split not in ("all", "train", "val"):
            raise ValueError(f"split must be 'all', 'train' or 'val', got {split!r}")
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise DemoFileError(f"{self.path}: no {MANIFEST}; not a demonstration folder")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DemoFileError(f"{manifest_path}: damaged manifest ({exc})") from exc
        if not isinstance(self.manifest, dict) or "recipe" not in self.manifest:
            raise DemoFileError(f"{manifest_path}: not a qvla demonstration manifest")
        if not self.manifest.get("complete") and not allow_incomplete:
            raise DemoFileError(f"{self.path}: generation has not finished (manifest says "
                                "incomplete); re-run `qvla demos` or pass allow_incomplete=True")
        if self.manifest.get("complete"):
            entries = [(e["task"], int(e["seed"]), self.path / e["file"])
                       for e in self.manifest["episodes"]]
        else:
            entries = []
            for f in sorted(self.path.rglob("seed_*.npz")):
                task = f.parent.relative_to(self.path).as_posix()   # "drawer-open", "libero_object/3"
                if any(part.startswith(".") for part in task.split("/")):
                    continue    # an interrupted write's temporary folder (qvla_ros/io.py)
                entries.append((task, int(f.stem.split("_")[1]), f))
        if tasks is not None:
            wanted = {tasks} if isinstance(tasks, str) else set(tasks)
            entries = [e for e in entries if e[0] in wanted]
        if split != "all":
            entries = [e for e in entries if is_held_out(e[1]) == (split == "val")]
        self._entries = entries
        self.split = split

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def files(self) -> list[Path]:
        return [e[2] for e in self._entries]

    def __getitem__(self, index: int) -> dict:
        return read_episode(self._entries[index][2])

    def episodes(self) -> Iterator[dict]:
        """Episodes in a fixed order (task, seed), loaded one file at a time."""
        for _, _, path in self._entries:
            yield read_episode(path)

    def __iter__(self):
        return self.episodes()
