"""Real cameras in front of qvla_policy_node, each part in its own process over DDS: frames of any
size fitted to the policy (raw and compressed), large best-effort frames delivered under the
shipped transport profile and a warning when they are not, and the input defects of issue #21
(duplicate joint names, oversized plan files, a node-name clash, remapped names in the `ready:`
line, diagnostics at 0 Hz)."""
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.ros

rclpy = pytest.importorskip("rclpy")
cv2 = pytest.importorskip("cv2")

from qvla_ros.ros.harness import NodeProcess  # noqa: E402
from qvla_ros.ros.paths import config_file  # noqa: E402

HELPERS = Path(__file__).resolve().parent / "helpers"
sys.path.insert(0, str(HELPERS))
from camera import frame  # noqa: E402

PROPRIO = np.array([0.1, -0.2, 0.3, 0.7], np.float32)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from qvla_ros.policy import make_policy

    root = tmp_path_factory.mktemp("micro_cam")
    policy = make_policy("micro", seed=0)
    policy.save_pretrained(root / "ckpt")
    return {"checkpoint": str(root / "ckpt"), "policy": policy.eval()}


def start_node(env, remaps=None, **overrides) -> NodeProcess:
    proc = NodeProcess.start("qvla_policy_node", [config_file("policy_node.yaml")],
                             overrides=overrides, remaps=remaps, env=env)
    proc.wait_for(r"ready: serving", timeout=90)
    return proc


def start_camera(env, *topics, size="640x480", fmt="raw", seconds=60.0) -> subprocess.Popen:
    cam = subprocess.Popen([sys.executable, str(HELPERS / "camera.py"), "--size", size,
                            "--format", fmt, "--seconds", str(seconds), *topics], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert cam.stdout.readline().strip() == "publishing"
    return cam


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.wait(10)


def expected_chunk(policy, images, instruction):
    import torch

    with torch.inference_mode():
        out = policy(torch.from_numpy(np.stack(images))[None], [instruction],
                     torch.from_numpy(PROPRIO)[None])
    return out[0].numpy()


def send_state(feeder, instruction="open the drawer", times=5):
    feeder.send_instruction(instruction)
    for _ in range(times):
        feeder.send_proprio(PROPRIO, feeder.get_clock().now().to_msg())
        time.sleep(0.05)


def diagnostics_status(store, predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for msg in reversed(list(store)):
            for status in msg.status:
                if predicate(status):
                    return status
        time.sleep(0.1)
    raise TimeoutError([(s.level, s.message) for m in store[-3:] for s in m.status])


@pytest.mark.parametrize("size,mode,fmt,crop", [("640x480", "fit", "raw", 1.0),
                                                ("1280x720", "crop", "png", 0.9)])
def test_camera_frames_of_any_size(ros_env, feeder, micro, size, mode, fmt, crop):
    """A 640x480 raw camera (900 KiB frames, best effort: delivered only under the shipped
    transport profile) and a 1280x720 PNG camera are fitted to the policy's 32x32 by the node;
    each chunk is what the policy computes on image_conversion.fit_frame's output. Malformed
    compressed data is refused with a message and a counter while serving continues."""
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import CompressedImage

    from qvla_ros.ros.image_conversion import fit_frame

    assert ros_env["FASTDDS_DEFAULT_PROFILES_FILE"].endswith("fastdds_large_frames.xml")
    diagnostics = []
    feeder.create_subscription(DiagnosticArray, "diagnostics", diagnostics.append, 10)
    transport = "raw" if fmt == "raw" else "compressed"
    node = start_node(ros_env, checkpoint=micro["checkpoint"], sync_tolerance=-1.0,
                      image_resize=mode, center_crop_scale=crop, image_transport=transport,
                      diagnostics_period=0.3)
    suffix = "" if fmt == "raw" else "/compressed"
    cam = start_camera(ros_env, "image" + suffix, "image2" + suffix, size=size, fmt=fmt)
    try:
        assert f"into 32x32, other sizes {mode}" in node.output
        send_state(feeder)
        got = feeder.wait_chunks(5, timeout=60)
        width, height = (int(n) for n in size.split("x"))
        pixels = frame(width, height, 0)
        fitted = fit_frame(pixels, (32, 32), mode, crop)
        want = expected_chunk(micro["policy"], [fitted, fitted], "open the drawer")
        for r in got:
            np.testing.assert_allclose(r.actions, want, atol=1e-5)
        # Not the same as feeding the whole frame squashed: the crop mode really crops.
        if mode == "crop":
            squashed = fit_frame(pixels, (32, 32), "fit", 1.0)
            other = expected_chunk(micro["policy"], [squashed, squashed], "open the drawer")
            assert np.abs(other - want).max() > 1e-4

        if transport == "compressed":
            bad = feeder.create_publisher(CompressedImage, "image/compressed", 10)
            deadline = time.monotonic() + 30
            while bad.get_subscription_count() == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            # The camera shares the topic (depth 1: a newer frame replaces ours before the
            # callback takes it): publish until the node has seen one of each.
            def refused(fmt, data, pattern):
                mark = len(node.lines)
                msg = CompressedImage(format=fmt)
                msg.data = data
                for _ in range(100):
                    bad.publish(msg)
                    time.sleep(0.05)
                    if any(re.search(pattern, line) for line in node.lines[mark:]):
                        return
                node.wait_for(pattern, start=mark, timeout=1)

            refused("jpeg", bytes(range(256)) * 4,
                    r"image dropped: compressed image \(jpeg, 1024 bytes\) could not be decoded")
            refused("theora", b"\x00" * 10, r"compressed image format 'theora' is not decoded")
            count = len(feeder.received)
            feeder.wait_chunks(3, since=count, timeout=30)  # still serving
            status = diagnostics_status(diagnostics, lambda s: {
                "rejected_image_compressed_decode", "rejected_image_compressed_format"}
                <= {kv.key for kv in s.values})
            assert all(int(kv.value) >= 1 for kv in status.values
                       if kv.key.startswith("rejected_image_compressed"))
        assert "Traceback" not in node.output
    finally:
        stop(cam)
        assert node.stop() == 0, node.output


def test_silent_camera_is_reported(ros_env, feeder, micro):
    """A camera topic with a publisher and nothing arriving: the node says so (QoS and transport
    named) and diagnostics turn ERROR; before any camera, they say WARN (0 Hz).

    The silence is made deterministic with a QoS mismatch (best-effort camera, reliable
    subscription): large frames over Fast DDS's builtin transports are the other cause, but
    they let a few percent through (bench/ros/large_frames.json), which under load can keep a
    short timeout from expiring, so they are measured by the benchmark, not asserted here."""
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus

    env = ros_env  # the feeder's image publishers (idle, reliable) are the second publisher
    diagnostics = []
    feeder.create_subscription(DiagnosticArray, "diagnostics", diagnostics.append, 10)
    node = start_node(env, checkpoint=micro["checkpoint"], image_timeout=1.5,
                      diagnostics_period=0.3, image_qos="reliable")
    # 0 Hz with no camera at all: a warning, not OK.
    status = diagnostics_status(diagnostics, lambda s: s.level == DiagnosticStatus.WARN)
    assert "0 Hz" in status.message and "0 publisher(s)" in status.message
    cam = start_camera(env, "image", "image2", size="640x480")
    try:
        # The feeder's idle publisher alone can start the silence before the camera process is
        # up (a loaded machine): the line then counts 1 publisher; diagnostics follow the count.
        line = node.wait_for(r"/image has [12] publisher\(s\) but no message arrived", timeout=30)
        assert "QoS reliable (image_qos reliable)" in line and "QoS mismatch" in line
        assert "transport: Fast DDS profile" in line and "fastdds_large_frames.xml" in line
        status = diagnostics_status(diagnostics, lambda s: s.level == DiagnosticStatus.ERROR
                                    and "/image: 2 publisher(s)" in s.message)
        assert "/image: 2 publisher(s), no message for" in status.message
        assert "reliable" in status.message and "transport" in status.message
        assert "Traceback" not in node.output
    finally:
        stop(cam)
        assert node.stop() == 0, node.output


def test_sparse_camera_is_not_silent_until_it_stops(ros_env, feeder, micro):
    """A camera publishing legitimately slowly (1 Hz, over DDS from this process) raises no
    silent-camera warning and keeps diagnostics out of ERROR; its rate shows in diagnostics.
    When it stops while its publisher stays, the warning comes after five of its periods (5 s,
    image_timeout 1.5 s being shorter) and diagnostics turn ERROR. (A camera slower than
    image_timeout, whose gaps only the learnt rate tells from a silence, is covered exactly in
    test_ros_camera_watch.py: here its first gap would be one warning.)"""
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus

    diagnostics = []
    feeder.create_subscription(DiagnosticArray, "diagnostics", diagnostics.append, 10)
    node = start_node(ros_env, checkpoint=micro["checkpoint"], image_timeout=1.5,
                      diagnostics_period=0.3)
    try:
        feeder.wait_for_policy_node()
        feeder.send_instruction("open the drawer")
        images = np.stack([frame(32, 32, 1), frame(32, 32, 2)])
        start = time.monotonic()
        for i in range(7):
            time.sleep(max(0.0, start + i - time.monotonic()))
            feeder.send_observation(images, PROPRIO)
        last_frame = time.monotonic()
        feeder.wait_chunks(7)
        status = diagnostics[-1].status[0]
        values = {kv.key: kv.value for kv in status.values}
        assert 0.8 < float(values["image_rate_hz"]) < 1.25, values
        assert 4.0 < float(values["image_silent_after_s"]) < 6.25, values
        assert "no message arrived" not in node.output
        assert all(s.level != DiagnosticStatus.ERROR for m in diagnostics for s in m.status)
        line = node.wait_for(r"/image has 1 publisher\(s\) but no message arrived", timeout=15)
        took = time.monotonic() - last_frame
        rate = re.search(r"it had delivered at ([\d.]+) Hz", line)
        assert rate and 0.8 < float(rate.group(1)) < 1.25, line
        assert "5 of its frame periods" in line, line
        assert 4.0 < took < 8.0, took
        status = diagnostics_status(diagnostics, lambda s: s.level == DiagnosticStatus.ERROR)
        assert "/image: 1 publisher(s), no message for" in status.message
        assert "Traceback" not in node.output
    finally:
        assert node.stop() == 0, node.output


def test_input_defects(ros_env, feeder, micro, tmp_path):
    """Remapped names in the `ready:` line; duplicate joint names refused and counted; a plan
    file over max_plan_bytes refused unread (fast), by service and parameter; a second node with
    the node's name warned; serving continues throughout."""
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    diagnostics = []
    feeder.create_subscription(DiagnosticArray, "diagnostics", diagnostics.append, 10)
    node = start_node(ros_env, remaps={"image2": "/wrist/image_raw", "proprio": "/joint_states"},
                      checkpoint=micro["checkpoint"], diagnostics_period=0.3)
    try:
        ready = node.wait_for(r"ready: serving")
        assert "cameras /image, /wrist/image_raw" in ready
        assert "proprio /joint_states" in ready and "chunks on /action_chunk" in ready
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        feeder.image_pubs[1] = feeder.create_publisher(Image, "/wrist/image_raw", reliable)
        from sensor_msgs.msg import JointState
        feeder.proprio_pub = feeder.create_publisher(JointState, "/joint_states", reliable)
        deadline = time.monotonic() + 30
        while feeder.image_pubs[1].get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        feeder.wait_for_policy_node()
        feeder.send_instruction("open the drawer")
        images = np.stack([frame(32, 32, 1), frame(32, 32, 2)])
        feeder.send_observation(images, PROPRIO)
        feeder.wait_chunks(1)

        mark = len(node.lines)
        feeder.send_proprio(PROPRIO, feeder.get_clock().now().to_msg(),
                            names=["ee_x", "ee_y", "ee_x", "gripper"])
        node.wait_for(r"proprio dropped: joint name\(s\) \['ee_x'\] appear more than once",
                      start=mark)

        big = tmp_path / "huge_plan.json"
        with open(big, "wb") as f:
            f.truncate(16 * 2 ** 20 + 1)
        start = time.monotonic()
        answer = feeder.reload(str(big))
        took = time.monotonic() - start
        assert not answer.success and "over max_plan_bytes (16777216)" in answer.message
        assert "refused unread" in answer.message and "still serving full precision" in answer.message
        assert took < 2.0, took
        from rcl_interfaces.msg import Parameter as ParameterMsg
        from rcl_interfaces.msg import ParameterType, ParameterValue
        from rcl_interfaces.srv import SetParameters
        client = feeder.create_client(SetParameters, "/qvla_policy_node/set_parameters")
        assert client.wait_for_service(timeout_sec=10)
        future = client.call_async(SetParameters.Request(parameters=[ParameterMsg(
            name="plan", value=ParameterValue(type=ParameterType.PARAMETER_STRING,
                                              string_value=str(big)))]))
        deadline = time.monotonic() + 30
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        result = future.result().results[0]
        assert not result.successful and "over max_plan_bytes" in result.reason

        # Another node with this name in the domain (a plain rclpy node, this process).
        mark = len(node.lines)
        twin = rclpy.create_node("qvla_policy_node")
        try:
            node.wait_for(r"2 nodes named /qvla_policy_node in ROS_DOMAIN_ID "
                          + ros_env["ROS_DOMAIN_ID"], start=mark, timeout=30)
        finally:
            twin.destroy_node()

        count = len(feeder.received)
        feeder.send_observation(images, PROPRIO)
        feeder.wait_chunks(1, since=count)
        status = diagnostics_status(diagnostics, lambda s: any(
            kv.key == "rejected_proprio_duplicate_names" and kv.value == "1" for kv in s.values))
        values = {kv.key: kv.value for kv in status.values}
        assert values["reloads_refused"] == "1", values
        assert "Traceback" not in node.output
    finally:
        assert node.stop() == 0, node.output
