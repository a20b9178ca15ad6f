"""The closed loop through ROS, as the README runs it: `qvla demo` starts qvla_sim_bridge and
qvla_policy_node as separate processes over DDS. Its first episode (before the plan reload) is
the episode `qvla eval --batch-size 1` gives for the same seed: same success, same step count.
The reload halfway swaps the plan for the rest of the run."""
import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ros, pytest.mark.slow]

pytest.importorskip("rclpy")

TASKS = ["drawer-open", "drawer-close"]


@pytest.fixture
def plan_for_shipped_policy(tmp_path):
    """A uniform 8-bit plan for the shipped policy (made here: it does not depend on which
    plans are shipped)."""
    from qvla_ros.policy import load_policy
    from qvla_ros.quant import quantizable_linears
    from qvla_ros.quant.plan import plan_from_bits

    policy = load_policy()
    plan = plan_from_bits(policy, {n: 8 for n in quantizable_linears(policy)})
    return str(plan.save(tmp_path / "w8.json")), plan.plan_id


def test_qvla_demo_matches_qvla_eval_and_reloads_halfway(ros_env, tmp_path,
                                                          plan_for_shipped_policy):
    from qvla_ros.policy import default_checkpoint_dir

    plan, plan_id = plan_for_shipped_policy
    evaluation = subprocess.Popen(
        [sys.executable, "-m", "qvla_ros.cli", "eval", "--policy", str(default_checkpoint_dir()),
         "--tasks", TASKS[0], "--episodes-per-task", "1", "--batch-size", "1", "--workers", "0",
         "--quiet", "--out", str(tmp_path / "eval")],
        env=ros_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    demo = subprocess.run(
        [sys.executable, "-m", "qvla_ros.cli", "demo", "--tasks", ",".join(TASKS),
         "--plan", "none", "--reload-plan", plan, "--json", str(tmp_path / "demo.json"),
         "--timeout", "300"],
        env=ros_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=400)
    output, _ = evaluation.communicate(timeout=300)
    assert evaluation.returncode == 0, output
    assert demo.returncode == 0, demo.stdout
    assert "success: " in demo.stdout and "image in -> chunk out (node)" in demo.stdout

    report = json.loads((tmp_path / "demo.json").read_text())
    [expected] = json.loads((tmp_path / "eval" / "results.json").read_text())["episodes"]
    first, second = report["episodes"]
    keys = ("task", "seed", "success", "steps")
    assert {k: first[k] for k in keys} == {k: expected[k] for k in keys}
    assert first["plan_ids"] == [""] and first["chunks"] >= first["steps"] // 8

    reload = report["reload"]
    assert reload["after_episode"] == 1
    assert reload["answer"]["success"] and reload["answer"]["active_plan_id"] == plan_id
    assert second["task"] == TASKS[1] and second["plan_ids"][-1] == plan_id
    assert report["summary"]["episodes"] == 2
    assert len(report["chunks"]["latency"]) >= first["chunks"] + second["chunks"]
