"""`qvla compare --device cuda`: every method family quantized on the GPU (calibration, QVLA's
sensitivity, GPTQ's Hessians, AWQ's search, SmoothQuant's alphas), saved from the CPU, scored
offline and (where MetaWorld is installed) rolled out by a worker on the GPU; the table matches the
same comparison on the CPU within float tolerance, except for memory in the layout each device
holds (per-channel rows in the kernels' layout on the GPU) and QVLA's plans, priced in it. Needs a CUDA device (bench/gpu/pending.sh runs
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
    bits = {name: (gpu[name]["memory"]["bits_per_param"], cpu[name]["memory"]["bits_per_param"]) for name in gpu}
    for name in gpu:
        g, c = gpu[name], cpu[name]
        assert np.isfinite(g["offline"]["l1"])
        if EPISODES:
            assert g["closed_loop"]["overall"]["episodes"] == 1
        if name.startswith("qvla"):
            continue   # allocated in another layout on each device (below)
        # Per-channel rows (MixedBitLinear) are resident in the kernels' layout on the GPU (fp32
        # scales and zeros, K padded to whole blocks), so they measure more there; the rest the same.
        if name in ("rtn-w4", "sq-w8a8"):
            assert bits[name][0] > bits[name][1], name
        else:
            assert bits[name][0] == pytest.approx(bits[name][1], rel=1e-6), name
        assert g["offline"]["l1"] == pytest.approx(c["offline"]["l1"], rel=0.05, abs=1e-3), name
    # QVLA prices rows in the layout its memory is measured in, so on either device it keeps to
    # the measured memory of the baseline it matches.
    assert bits["qvla@rtn-w4"][0] <= bits["rtn-w4"][0] and bits["qvla@rtn-w4"][1] <= bits["rtn-w4"][1]
    for name in ("rtn-w4", "gptq-g32-w3", "awq-g32-w3"):
        assert gpu[name]["offline"]["action_error_vs_fp"] > 0
