"""The closed loop through ROS: qvla_sim_bridge and qvla_policy_node as separate processes over
DDS, started with the demo's parameter files, give the same episodes (success and step count,
seed by seed) as `qvla eval --batch-size 1` with the same policy."""
import json
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.ros, pytest.mark.slow]

rclpy = pytest.importorskip("rclpy")

from qvla_ros.ros.harness import NodeProcess  # noqa: E402
from qvla_ros.ros.paths import config_file  # noqa: E402

TASKS = ["drawer-open", "drawer-close"]


@pytest.fixture
def checkpoint(tmp_path):
    """The shipped policy; a seeded random `tiny` one where none is shipped yet (its episodes
    all fail, so only their step counts are compared), with a shorter step limit."""
    from qvla_ros.policy import default_checkpoint_dir, make_policy

    shipped = default_checkpoint_dir()
    if (shipped / "model.safetensors").is_file():
        return str(shipped), 0
    path = tmp_path / "random_tiny"
    make_policy("tiny", seed=0).save_pretrained(path)
    return str(path), 60


def test_closed_loop_through_the_bridge_matches_qvla_eval(ros_env, tmp_path, checkpoint):
    path, max_steps = checkpoint
    limit = ["--max-steps", str(max_steps)] if max_steps else []
    evaluation = subprocess.Popen(
        [sys.executable, "-m", "qvla_ros.cli", "eval", "--policy", path, "--tasks",
         ",".join(TASKS), "--episodes-per-task", "1", "--batch-size", "1", "--workers", "0",
         "--quiet", "--out", str(tmp_path / "eval")] + limit,
        env=ros_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    from qvla_ros.ros.demo_monitor import DemoMonitor

    rclpy.init()
    monitor = DemoMonitor().spin_in_background()
    policy = NodeProcess.start(
        "qvla_policy_node", [config_file("policy_node.yaml"), config_file("demo.yaml")],
        overrides={"checkpoint": path, "plan": ""}, env=ros_env)
    bridge = NodeProcess.start(
        "qvla_sim_bridge", [config_file("sim_bridge.yaml"), config_file("demo.yaml")],
        overrides={"tasks": TASKS, "episodes_per_task": 1, "max_steps": max_steps}, env=ros_env)
    try:
        deadline = time.monotonic() + 240
        while monitor.summary is None and time.monotonic() < deadline:
            assert policy.popen.poll() is None, policy.output
            time.sleep(0.1)
        assert monitor.summary is not None, bridge.output + "\n" + policy.output
        assert bridge.popen.wait(30) == 0, bridge.output
        assert bridge.wait_for(r"done: \d+/2 episodes succeeded")
    finally:
        bridge.stop()
        assert policy.stop() == 0, policy.output
        monitor.close()
        rclpy.try_shutdown()
        output, _ = evaluation.communicate(timeout=240)
    assert evaluation.returncode == 0, output

    expected = json.loads((tmp_path / "eval" / "results.json").read_text())["episodes"]
    through_ros = [{k: e[k] for k in ("task", "seed", "success", "steps")}
                   for e in monitor.episodes]
    assert through_ros == [{k: e[k] for k in ("task", "seed", "success", "steps")}
                           for e in expected]
    for e in monitor.episodes:
        assert e["plan_ids"] == [""] and e["chunks"] >= e["steps"] // 8
    summary = monitor.summary
    assert summary["episodes"] == 2
    assert summary["successes"] == sum(e["success"] for e in expected)
