"""The simulator bridge serves LIBERO over ROS 2: `qvla demo --suite libero-object` starts
qvla_sim_bridge (one LIBERO task, two 224 px cameras, 8 proprio values) and qvla_policy_node
(a random OFT policy of oft-micro size: 28 px input, so the node fits the frames; 8 x 7 chunks)
as separate processes over DDS, for a 16-step episode from the first evaluation initial state.
Checks that frames, proprio and chunks flow and that the chunks drive the episode, not success."""
import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ros, pytest.mark.slow]

pytest.importorskip("rclpy")

from qvla_ros.sim.libero import simulator_missing  # noqa: E402

if simulator_missing():
    pytest.skip(simulator_missing(), allow_module_level=True)

MAX_STEPS = 16


def test_bridge_serves_libero_to_a_policy_node(ros_env, tmp_path):
    from qvla_ros.policy import make_policy
    from qvla_ros.sim.libero.env import EVAL_INIT_STATES

    checkpoint = make_policy("oft-micro", seed=1).save_pretrained(tmp_path / "micro")
    demo = subprocess.run(
        [sys.executable, "-m", "qvla_ros.cli", "demo", "--suite", "libero-object", "--tasks", "0",
         "--checkpoint", str(checkpoint), "--max-steps", str(MAX_STEPS),
         "--json", str(tmp_path / "demo.json"), "--timeout", "240"],
        env=ros_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert demo.returncode == 0, demo.stdout
    assert "libero-object libero_object/0" in demo.stdout and "plan none (full precision)" in demo.stdout

    report = json.loads((tmp_path / "demo.json").read_text())
    [episode] = report["episodes"]
    assert episode["suite"] == "libero-object" and episode["task"] == "libero_object/0"
    assert episode["seed"] == EVAL_INIT_STATES[0]
    assert "alphabet soup" in episode["instruction"]
    # Chunks of 8 x 7 answered each observation (the node only answers a full observation: both
    # cameras and the 8 named proprio values of one stamp), and their actions ran the episode.
    assert episode["action_shape"] == [8, 7]
    assert episode["steps"] == MAX_STEPS and episode["chunks"] == MAX_STEPS // 8
    assert isinstance(episode["success"], bool) and episode["plan_ids"] == [""]
    assert len(report["chunks"]["latency"]) >= episode["chunks"]
    assert report["summary"]["episodes"] == 1
