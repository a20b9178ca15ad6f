"""`qvla compare --device cuda`: every method family quantized on the GPU (calibration, QVLA's
sensitivity, GPTQ's Hessians, AWQ's search, SmoothQuant's alphas), saved from the CPU, scored
offline and (where MetaWorld is installed) rolled out by a worker on the GPU; the table matches the
same comparison on the CPU within float tolerance. Needs a CUDA device (bench/gpu/pending.sh runs
it on the card, where MetaWorld is there only if its wheels were carried)."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("language_world", reason="qvla_ros.sim's task list needs language_world "
                    "(on the GPU machine: carry .mwbundle; bench/gpu/pending.sh unpacks it)")
from qvla_ros.cli import main  # noqa: E402
from qvla_ros.policy import make_policy  # noqa: E402
from qvla_ros.sim.suite import TASKS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
from demo_folders import metaworld_demo_folder  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
METHODS = "fp,rtn-w4,qvla@rtn-w4,gptq-g32-w3,awq-g32-w3,sq-w8a8"
EPISODES = 1 if importlib.util.find_spec("metaworld") and importlib.util.find_spec("mujoco") else 0


def _run(root, out, device):
    return main(["compare", "--methods", METHODS, "--policy", str(root / "policy"), "--device", device,
                 "--data", str(root / "demos"), "--frames", "8", "--offline-frames", "16",
                 "--projections", "4", "--episodes-per-task", str(EPISODES), "--tasks", TASKS[0].name,
                 "--max-steps", "3", "--workers", "1", "--alphas", "0.5", "--out", str(out), "--quiet"])


def test_compare_on_the_gpu_matches_the_cpu(tmp_path):
    policy = make_policy("micro", seed=0)
    policy.save_pretrained(tmp_path / "policy")
    metaworld_demo_folder(tmp_path / "demos", policy.config.n_cams, policy.config.image_size)
    assert _run(tmp_path, tmp_path / "gpu", "cuda") == 0
    assert _run(tmp_path, tmp_path / "cpu", "cpu") == 0
    gpu, cpu = ({r["method"]["name"]: r for r in json.loads((tmp_path / d / "compare.json").read_text())["rows"]}
                for d in ("gpu", "cpu"))
    assert json.loads((tmp_path / "gpu" / "compare.json").read_text())["settings"]["device"] == "cuda"
    assert list(gpu) == METHODS.split(",")
    for name in gpu:
        g, c = gpu[name], cpu[name]
        # the same widths everywhere except where QVLA's allocation sits on a float tie
        assert g["memory"]["bits_per_param"] == pytest.approx(c["memory"]["bits_per_param"], rel=0.02), name
        assert np.isfinite(g["offline"]["l1"])
        if EPISODES:
            assert g["closed_loop"]["overall"]["episodes"] == 1
        assert g["offline"]["l1"] == pytest.approx(c["offline"]["l1"], rel=0.05, abs=1e-3), name
    for name in ("rtn-w4", "gptq-g32-w3", "awq-g32-w3"):
        assert gpu[name]["offline"]["action_error_vs_fp"] > 0
