"""LIBERO demonstrations in the project's format: bench/libero/make_demos_gpu.sh in its CPU smoke
mode runs `qvla demos --suite libero-object --smoke` (one task, one 8-step episode from the first
demonstration initial state, written even though unfinished), and the folder reads back through
DemoDataset with both 224 px cameras, 8 proprio values, 7-d actions and the instruction.
Skipped only where the simulator is not installed (scripts/bootstrap.sh installs it)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qvla_ros.dataset import DemoDataset, DemoFileError
from qvla_ros.sim.libero import simulator_missing
from qvla_ros.sim.libero.env import DEMO_INIT_STATES

if simulator_missing():
    pytest.skip(simulator_missing(), allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_gpu_demo_script_smoke_writes_the_demo_format(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "SMOKE": "1", "OUT": str(out), "WORK": str(work), "PY": sys.executable,
           "PYTHONPATH": str(REPO)}
    run = subprocess.run(["bash", "bench/libero/make_demos_gpu.sh"], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
    assert run.returncode == 0, run.stdout + log
    assert "libero-object: 1 episode files" in log and "smoke" in log

    root = work / "demos" / "libero-object"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest == json.loads((out / "libero-object_manifest.json").read_text())
    recipe = manifest["recipe"]
    assert recipe["suite"] == "libero-object" and recipe["smoke"] is True
    assert recipe["cameras"] == ["agentview", "robot0_eye_in_hand"] and recipe["image_size"] == 224
    assert recipe["max_steps"] == 8 and "30-49 for evaluation" in recipe["seeds"]
    assert recipe["expert"]["kind"] == "scripted-expert" and "libero" in recipe["expert"]["source"]
    assert manifest["complete"] is False           # a smoke folder is never training data
    [entry] = manifest["episodes"]
    assert entry == {"file": "libero_object/0/seed_0000000.npz", "task": "libero_object/0",
                     "seed": DEMO_INIT_STATES[0], "length": 8}

    with pytest.raises(DemoFileError, match="has not finished"):
        DemoDataset(root)
    data = DemoDataset(root, allow_incomplete=True)
    assert len(data) == 1
    ep = data[0]
    assert ep["images"].shape == (8, 2, 224, 224, 3) and ep["images"].dtype == np.uint8
    assert ep["proprio"].shape == (8, 8) and ep["actions"].shape == (8, 7)
    assert ep["task"] == "libero_object/0" and ep["seed"] == 0
    assert ep["instruction"] == "pick up the alphabet soup and place it in the basket"
    assert np.all(np.abs(ep["actions"]) <= 1) and np.all(ep["actions"][:, 6] == -1)  # approaching: open
    assert ep["images"][:, 0].std() > 10 and ep["images"][:, 1].std() > 10          # both cameras see
    assert not np.allclose(ep["proprio"][0, :3], ep["proprio"][-1, :3])            # the arm moved
