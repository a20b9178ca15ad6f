"""`qvla compare --suite libero-object`: the comparison harness runs its closed loop on LIBERO
(initial states 30-49, the suite's step limit, its cameras) for an OFT-shaped policy, refuses a
policy that does not fit the suite before quantizing anything, and refuses a device this machine
lacks. A random oft-micro policy and a synthetic demonstration folder in LIBERO's shapes: the
plumbing is checked, not success. Skipped only where the simulator is not installed."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from qvla_ros.cli import main
from qvla_ros.sim.libero import simulator_missing

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
from demo_folders import demo_folder  # noqa: E402

if simulator_missing():
    pytest.skip(simulator_missing(), allow_module_level=True)

TASK = "libero_object/0"
INSTRUCTION = "pick up the alphabet soup and place it in the basket"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from qvla_ros.policy import make_policy

    root = tmp_path_factory.mktemp("libero_compare")
    oft = make_policy("oft-micro", seed=0)
    oft.save_pretrained(root / "oft")
    make_policy("micro", seed=0).save_pretrained(root / "metaworld")
    demo_folder(root / "demos", [(TASK, INSTRUCTION)], 2, oft.config.image_size, proprio_dim=8,
                action_dim=7, frames=10, recipe={"suite": "libero-object"})
    return root


def _compare(root, policy, out, *extra):
    return main(["compare", "--suite", "libero-object", "--methods", "fp,rtn-w4",
                 "--policy", str(root / policy), "--data", str(root / "demos"), "--frames", "4",
                 "--offline-frames", "8", "--episodes-per-task", "1", "--tasks", "0",
                 "--max-steps", "8", "--workers", "0", "--out", str(out), "--quiet", *extra])


@pytest.mark.slow
def test_compare_runs_its_closed_loop_on_libero(setup):
    out = setup / "out"
    assert _compare(setup, "oft", out) == 0
    doc = json.loads((out / "compare.json").read_text())
    assert doc["settings"]["suite"] == "libero-object" and doc["settings"]["device"] == "cpu"
    rows = {r["method"]["name"]: r for r in doc["rows"]}
    assert list(rows) == ["fp", "rtn-w4"]
    for row in rows.values():
        cl = row["closed_loop"]
        # the first evaluation initial state, never a demonstration one
        assert cl["outcomes"] == {TASK: {"30": cl["outcomes"][TASK]["30"]}}
        assert cl["settings"]["suite"] == "libero-object" and cl["settings"]["max_steps"] == 8
        assert cl["settings"]["cameras"] == ["agentview", "robot0_eye_in_hand"]
        assert np.isfinite(row["offline"]["l1"])
    assert rows["rtn-w4"]["offline"]["action_error_vs_fp"] > 0
    assert rows["rtn-w4"]["paired"]["vs_fp"]["episodes"] == 1
    assert "of libero-object" in (out / "compare.md").read_text()
    # the closed loop is stored under a key that names the suite
    assert list((out / "runs").glob("fp-*/closed_loop-libero-object-1ep-8steps.json"))


def test_a_policy_that_does_not_fit_the_suite_is_refused_before_quantizing(setup, capsys):
    out = setup / "refused"
    assert _compare(setup, "metaworld", out) == 2
    err = capsys.readouterr().err
    assert "action_dim is 4" in err and "libero-object has 7" in err
    assert not (out / "runs").exists()


def test_a_device_this_machine_lacks_is_refused(setup, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert _compare(setup, "oft", setup / "nodevice", "--device", "cuda") == 2
    assert "CUDA is not available" in capsys.readouterr().err
