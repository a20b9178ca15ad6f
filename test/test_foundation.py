"""The package foundation: the library imports without ROS, and the package's own interfaces
(ActionChunk, ReloadPlan) travel between two processes over DDS."""
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def test_library_imports_without_rclpy():
    # sys.modules[name] = None makes any `import name` raise ImportError in that interpreter.
    code = (
        "import sys\n"
        "for m in ('rclpy', 'rclpy.node', 'sensor_msgs', 'std_msgs'): sys.modules[m] = None\n"
        "import qvla_ros, qvla_ros.cli\n"
        "import qvla_ros.kernels\n"
        "assert 'rclpy' not in [k for k, v in sys.modules.items() if v is not None]\n"
        "print(qvla_ros.__version__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.1.0"


def _listed_verbs(help_text: str) -> list[str]:
    """The verbs argparse lists under 'positional arguments' (one per line, indented 4 spaces;
    wrapped help text is indented further and is not a verb)."""
    section = help_text.split("positional arguments:", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^    (\S+)", section, flags=re.MULTILINE)


def test_cli_lists_every_verb():
    out = subprocess.run([sys.executable, "-m", "qvla_ros.cli", "--help"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    from qvla_ros.cli import VERBS
    # Every verb's stage ships with the package, so every verb is listed, in order, as a whole
    # word (not found inside another verb's name, as "demo" is inside "demos"), and no stage
    # module failed to import.
    assert _listed_verbs(out.stdout) == list(VERBS), (out.stdout, out.stderr)
    assert "unavailable" not in out.stderr, out.stderr


@pytest.mark.ros
def test_action_chunk_and_reload_plan_cross_process(ros_env, tmp_path):
    import rclpy
    from rclpy.node import Node

    from qvla_ros.msg import ActionChunk
    from qvla_ros.srv import ReloadPlan

    peer = subprocess.Popen([sys.executable, str(HERE / "helpers" / "interface_peer.py")],
                            env=ros_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rclpy.init()
    node = Node("interface_test")
    try:
        received = []
        node.create_subscription(ActionChunk, "chunk", received.append, 10)
        client = node.create_client(ReloadPlan, "reload_plan")
        deadline = time.monotonic() + 30
        while not received and time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.1)
        assert received, "no ActionChunk arrived from the other process within 30 s"
        chunk = received[0]
        assert (chunk.header.stamp.sec, chunk.header.stamp.nanosec) == (1234, 5678)
        assert chunk.header.frame_id == "camera"
        assert (chunk.horizon, chunk.action_dim) == (2, 3)
        assert list(chunk.actions) == [0.5, -0.25, 1.0, 0.0, 0.125, -1.0]
        assert chunk.instruction == "open the drawer" and chunk.plan_id == "initial"

        assert client.wait_for_service(timeout_sec=30)

        def call(path):
            future = client.call_async(ReloadPlan.Request(plan_path=str(path)))
            rclpy.spin_until_future_complete(node, future, timeout_sec=30)
            assert future.done(), "ReloadPlan call got no answer"
            return future.result()

        refused = call(tmp_path / "missing.plan")
        assert not refused.success and "missing.plan" in refused.message
        assert refused.active_plan_id == "initial"

        plan = tmp_path / "b4.plan"
        plan.write_text("x")
        accepted = call(plan)
        assert accepted.success and accepted.active_plan_id == "b4.plan"

        # Chunks published after the reload name the new plan.
        received.clear()
        deadline = time.monotonic() + 10
        while not any(c.plan_id == "b4.plan" for c in received) and time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.1)
        assert any(c.plan_id == "b4.plan" for c in received)
    finally:
        node.destroy_node()
        rclpy.shutdown()
        peer.terminate()
        try:
            peer.wait(timeout=10)
        except subprocess.TimeoutExpired:
            peer.kill()
