"""qvla_policy_node in its own process, over DDS, started like the launch file starts it
(config/policy_node.yaml + overrides): image in -> chunk out with the image's stamp; every kind of
bad input logged by name while the node keeps serving; plan reloads under a 30 Hz stream; a clean
stop at SIGINT even when rclpy's signal thread is slow.

The policy is the `micro` configuration with random weights and plans made for it here (uniform
8 and 4 bits through the real quantizer): small enough that the node starts and reloads in
seconds, and the same code path as the shipped policy.
"""
import gc
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.ros

rclpy = pytest.importorskip("rclpy")

from qvla_ros.ros.harness import NodeProcess, ros_arguments  # noqa: E402
from qvla_ros.ros.paths import config_file  # noqa: E402

IMAGE_PERIOD = 1 / 30
HELPERS = Path(__file__).resolve().parent / "helpers"


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A micro checkpoint, plans for it, a plan for other weights, and the chunk each plan gives
    for one fixed observation (computed here, in this process)."""
    import torch

    from qvla_ros.policy import make_policy
    from qvla_ros.quant import load_quantized_policy, quantizable_linears
    from qvla_ros.quant.plan import plan_from_bits

    root = tmp_path_factory.mktemp("micro")
    policy = make_policy("micro", seed=0)
    policy.save_pretrained(root / "ckpt")
    names = quantizable_linears(policy)
    plans = {}
    for bits in (8, 4):
        plan = plan_from_bits(policy, {n: bits for n in names})
        plans[bits] = (str(plan.save(root / f"w{bits}.json")), plan.plan_id)
    other = make_policy("micro", seed=1)
    foreign = plan_from_bits(other, {n: 4 for n in quantizable_linears(other)})
    foreign_path = str(foreign.save(root / "other_weights.json"))
    truncated = root / "truncated.json"
    truncated.write_text((root / "w4.json").read_text()[:200])

    cfg = policy.config
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (cfg.n_cams, cfg.image_size, cfg.image_size, 3), np.uint8)
    proprio = np.array([0.1, -0.2, 0.3, 0.7], np.float32)
    instruction = "open the drawer"
    expected = {}
    for path, plan_id in [("", "")] + list(plans.values()):
        served = load_quantized_policy(str(root / "ckpt"), path or None)
        with torch.inference_mode():
            out = served(torch.from_numpy(images)[None], [instruction],
                         torch.from_numpy(proprio)[None])
        expected[plan_id] = out[0].numpy()
    return {"checkpoint": str(root / "ckpt"), "plans": plans, "foreign": foreign_path,
            "truncated": str(truncated), "images": images, "proprio": proprio,
            "instruction": instruction, "expected": expected, "config": cfg}


def start_policy_node(ros_env, **overrides) -> NodeProcess:
    proc = NodeProcess.start("qvla_policy_node", [config_file("policy_node.yaml")],
                             overrides=overrides, env=ros_env)
    proc.wait_for(r"ready: serving", timeout=90)
    return proc


def list_parameters(feeder) -> set[str]:
    from rcl_interfaces.srv import ListParameters

    client = feeder.create_client(ListParameters, "/qvla_policy_node/list_parameters")
    assert client.wait_for_service(timeout_sec=30)
    future = client.call_async(ListParameters.Request())
    deadline = time.monotonic() + 30
    while not future.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    names = set(future.result().result.names)
    return names - {"use_sim_time", "start_type_description_service"}


def yaml_parameters(file: str, node: str) -> set[str]:
    import yaml

    doc = yaml.safe_load(open(config_file(file)).read())
    return set(doc[f"/**/{node}"]["ros__parameters"])


def assert_no_new_chunk(feeder, count: int, wait: float = 0.3) -> None:
    time.sleep(wait)
    assert len(feeder.received) == count, [r.chunk for r in feeder.received[count:]]


def test_image_in_chunk_out_and_bad_inputs_are_logged(ros_env, feeder, micro):
    from diagnostic_msgs.msg import DiagnosticArray

    from qvla_ros.ros.image_conversion import array_to_image

    diagnostics = []
    feeder.create_subscription(DiagnosticArray, "diagnostics", diagnostics.append, 10)
    # image_resize refuse: frames of another size are one more kind of bad input here (the
    # default, fit, is tested in test_ros_camera_inputs.py).
    node = start_policy_node(ros_env, checkpoint=micro["checkpoint"], diagnostics_period=0.2,
                             image_resize="refuse")
    try:
        feeder.wait_for_policy_node()
        # The parameter file sets exactly the parameters the node declares (no typo is ignored).
        declared = list_parameters(feeder)
        assert declared == yaml_parameters("policy_node.yaml", "qvla_policy_node")
        # Single actions are off by default (control_rate_hz 0): chunks only.
        assert feeder.count_publishers("action") == 0 and "no single actions" in node.output
        images, proprio = micro["images"], micro["proprio"]

        # No instruction yet: the frame is dropped, with a line naming the topic.
        mark = len(node.lines)
        feeder.send_observation(images, proprio)
        node.wait_for(r"frame dropped: no instruction received yet on /instruction", start=mark)
        feeder.send_instruction("   ")
        node.wait_for(r"empty instruction ignored; no instruction yet", start=mark)
        feeder.send_instruction("x" * 5000)
        node.wait_for(r"instruction of 5000 characters ignored \(at most 4096\)", start=mark)
        assert_no_new_chunk(feeder, 0)

        feeder.send_instruction(micro["instruction"])
        node.wait_for(r"instruction: 'open the drawer'", start=mark)
        stamp = feeder.send_observation(images, proprio)
        [got] = feeder.wait_chunks(1)
        chunk = got.chunk
        assert got.stamp == (stamp.sec, stamp.nanosec)
        assert chunk.header.frame_id == "camera"
        assert (chunk.horizon, chunk.action_dim) == (4, 4)
        assert chunk.plan_id == "" and chunk.instruction == "open the drawer"
        np.testing.assert_allclose(got.actions, micro["expected"][""], atol=1e-5)
        assert 0 < chunk.inference_time <= chunk.latency

        # Bad images on the camera that triggers forwards: one log line each, no chunk.
        good = array_to_image(images[0], "rgb8")
        cases = {
            r"image dropped: image encoding 'mono8' is not accepted here": array_to_image(
                images[0, :, :, 0], "mono8"),
            r"image dropped: image is 16x16 pixels; the policy takes 32x32": array_to_image(
                images[0, :16, :16], "rgb8"),
        }
        short = array_to_image(images[0], "rgb8")
        short.data = good.data[: good.step * good.height - 1]
        cases[r"image dropped: image data is 3071 bytes, shorter than step x height"] = short
        wrong_step = array_to_image(images[0], "rgb8")
        wrong_step.step = 10
        cases[r"image dropped: step 10 is shorter than one row"] = wrong_step
        for pattern, msg in cases.items():
            mark = len(node.lines)
            feeder.send_image(msg, feeder.get_clock().now().to_msg())
            node.wait_for(pattern, start=mark)
        assert_no_new_chunk(feeder, 1)

        # Bad proprio: NaN, wrong names, wrong length.
        mark = len(node.lines)
        feeder.send_proprio([0.1, np.nan, 0.3, 0.7], feeder.get_clock().now().to_msg())
        node.wait_for(r"proprio dropped: non-finite values", start=mark)
        feeder.send_image(good, feeder.get_clock().now().to_msg(), cam=1)
        feeder.send_image(good, feeder.get_clock().now().to_msg())
        node.wait_for(r"frame dropped: no valid proprio received yet on /proprio", start=mark)
        feeder.send_proprio([0.1, 0.2, 0.3, 0.7], feeder.get_clock().now().to_msg(),
                            names=["j1", "j2", "j3", "j4"])
        node.wait_for(r"proprio dropped: names \['j1', 'j2', 'j3', 'j4'\]", start=mark)
        feeder.send_proprio([0.1, 0.2, 0.3], feeder.get_clock().now().to_msg(),
                            names=["ee_x", "ee_y", "ee_z"])
        node.wait_for(r"proprio dropped: names .* do not give", start=mark)
        assert_no_new_chunk(feeder, 1)

        # ... and the node still serves.
        stamp = feeder.send_observation(images, proprio)
        got = feeder.wait_chunks(2)[-1]
        assert got.stamp == (stamp.sec, stamp.nanosec)
        np.testing.assert_allclose(got.actions, micro["expected"][""], atol=1e-5)

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            values = {kv.key: kv.value for d in diagnostics[-1:] for s in d.status
                      for kv in s.values}
            if values.get("chunks_total") == "2":
                break
            time.sleep(0.1)
        assert values["plan_id"] == "" and values["chunks_total"] == "2", values
        assert values["forward_mode"].startswith("eager: the policy runs on cpu"), values
        assert values["rejected_proprio_nan"] == "1" and values["rejected_proprio_names"] == "2"
        assert values["rejected_image_encoding"] == "1" and values["rejected_image_size"] == "1"
        assert values["rejected_image_short_data"] == "1" and values["rejected_no_instruction"] == "1"
        # The forward time: each window that published chunks carries the median and the maximum
        # of their forwards (ActionChunk.inference_time, printed to 4 significant digits).
        forward_ms = [r.chunk.inference_time * 1e3 for r in feeder.received]
        windows = [{kv.key: kv.value for s in d.status for kv in s.values} for d in diagnostics]
        windows = [w for w in windows if w["chunks"] != "0"]
        assert windows
        for w in windows:
            assert 0 < float(w["inference_ms_p50"]) <= float(w["inference_ms_max"]), w
            assert any(float(w["inference_ms_max"]) == pytest.approx(f, rel=1e-3)
                       for f in forward_ms), (w, forward_ms)
        assert "Traceback" not in node.output
        assert node.popen.poll() is None
    finally:
        assert node.stop() == 0, node.output


def test_reload_under_a_30hz_stream(ros_env, feeder, micro):
    from rcl_interfaces.msg import Parameter as ParameterMsg
    from rcl_interfaces.msg import ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters

    from qvla_ros.srv import ReloadPlan

    (w8, w8_id), (w4, w4_id) = micro["plans"][8], micro["plans"][4]
    expected = micro["expected"]
    assert np.abs(expected[w8_id] - expected[w4_id]).max() > 1e-3  # the plans are told apart
    # One torch thread: on a machine whose cores other processes keep busy, two OpenMP threads
    # make single forwards stall for hundreds of ms, which would hide what a reload does.
    node = start_policy_node(ros_env, checkpoint=micro["checkpoint"], plan=w8, torch_threads=1)
    # This process is the camera and the judge. Late in a full test run its heap is large, and a
    # full garbage collection here stopped the frame stream for ~0.5 s, after which the streamer
    # caught up in a burst that the node rightly answers with its newest frame: a "gap" the node
    # did not make (reproduced with a 3-million-object heap in this process). The node freezes its
    # own heap (policy_node.main); the harness does the same for the stream's duration.
    gc.collect()
    gc.freeze()
    try:
        feeder.wait_for_policy_node()
        feeder.send_instruction(micro["instruction"])
        sent: list[tuple[tuple[int, int], float]] = []  # (stamp, time sent) of each frame
        reloading: list[tuple[float, float]] = []  # (start, end) of each reload request
        stop = threading.Event()

        def stream():
            next_time = time.monotonic()
            while not stop.is_set():
                stamp = feeder.send_observation(micro["images"], micro["proprio"])
                sent.append(((stamp.sec, stamp.nanosec), time.monotonic()))
                next_time += IMAGE_PERIOD
                time.sleep(max(0.0, next_time - time.monotonic()))

        streamer = threading.Thread(target=stream, daemon=True)
        streamer.start()
        feeder.wait_chunks(15, timeout=30)

        def timed(call, *args):
            start = time.monotonic()
            try:
                return call(*args)
            finally:
                reloading.append((start, time.monotonic()))

        answer = timed(feeder.reload, w4)
        assert answer.success, answer.message
        assert answer.active_plan_id == w4_id and "now serving " + w4_id in answer.message
        feeder.wait_chunks(10, since=len(feeder.received))

        # Refused plans leave the serving one in place.
        for path, reason in [("/nonexistent/plan.json", "no plan file at '/nonexistent/plan.json'"),
                             (micro["foreign"], "made for other weights"),
                             (micro["truncated"], "cannot be loaded")]:
            answer = timed(feeder.reload, path)
            assert not answer.success and reason in answer.message, answer.message
            assert answer.active_plan_id == w4_id
            assert f"still serving {w4_id}" in answer.message

        # Two reloads at once: one is served, the other refused while it runs.
        start = time.monotonic()
        futures = [feeder.reload_client.call_async(ReloadPlan.Request(plan_path=w8))
                   for _ in range(2)]
        deadline = time.monotonic() + 60
        while not all(f.done() for f in futures) and time.monotonic() < deadline:
            time.sleep(0.01)
        reloading.append((start, time.monotonic()))
        answers = sorted((f.result() for f in futures), key=lambda a: not a.success)
        assert [a.success for a in answers] == [True, False], [a.message for a in answers]
        assert "another reload" in answers[1].message and "in progress" in answers[1].message
        feeder.wait_chunks(10, since=len(feeder.received))

        # A reload through the `plan` parameter; a bad value is refused with its reason.
        client = feeder.create_client(SetParameters, "/qvla_policy_node/set_parameters")
        assert client.wait_for_service(timeout_sec=10)

        def set_plan(path):
            value = ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=path)
            future = client.call_async(SetParameters.Request(
                parameters=[ParameterMsg(name="plan", value=value)]))
            deadline = time.monotonic() + 60
            while not future.done() and time.monotonic() < deadline:
                time.sleep(0.01)
            return future.result().results[0]

        result = timed(set_plan, w4)
        assert result.successful, result.reason
        refused = timed(set_plan, "/nonexistent/plan.json")
        assert not refused.successful and "no plan file" in refused.reason
        feeder.wait_chunks(10, since=len(feeder.received))
        stop.set()
        streamer.join()
        load_average = os.getloadavg()[0]
        time.sleep(0.3)
    finally:
        gc.unfreeze()
        assert node.stop() == 0, node.output

    chunks = list(feeder.received)
    ids = [r.chunk.plan_id for r in chunks]
    assert set(ids) == {w8_id, w4_id}
    # Each chunk is exactly what the plan it names computes: no chunk mixes two plans.
    for r in chunks:
        np.testing.assert_allclose(r.actions, expected[r.chunk.plan_id], atol=1e-5)
    # The served plan changed exactly at the three successful reloads (w8 -> w4 -> w8 -> w4).
    changes = [ids[i] for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]
    assert changes == [w8_id, w4_id, w8_id, w4_id]
    # Frames answered in order; while a reload runs, at most one frame in a row goes without a
    # chunk (or no more than the stream loses anyway on a busy machine, away from reloads).
    index = {stamp: i for i, (stamp, _) in enumerate(sent)}
    answered = [index[r.stamp] for r in chunks]
    assert answered == sorted(answered)
    during, away = [], []
    for a, b in zip(answered, answered[1:]):
        t0, t1 = sent[a][1], sent[b][1]
        overlaps = any(t0 <= end + IMAGE_PERIOD and start <= t1 for start, end in reloading)
        (during if overlaps else away).append(b - a)
    assert len(during) > 10 and len(away) > 10
    durations = ", ".join(f"{end - start:.3f}" for start, end in reloading)
    report = (f"frame gaps during reloads {np.bincount(during)}, elsewhere {np.bincount(away)}; "
              f"reloads took {durations} s")
    # A count of frames, not a time; still, when other processes oversubscribe the cores (this
    # test's own processes keep the load average near the core count) the stream itself
    # stutters, and what a reload costs cannot be told apart from that.
    if load_average > 2 * os.cpu_count():
        warnings.warn(f"machine oversubscribed (load average {load_average:.1f} on "
                      f"{os.cpu_count()} cores): not judging frame gaps; {report}")
    else:
        # One frame of slack over the stream's own worst gap: on CI a single 3-frame gap during a
        # reload (100 ms) was seen with 2-frame gaps elsewhere. A node that stalled while loading
        # would lose a reload's whole duration (40-180 ms here, up to 6 frames) in a row.
        assert max(during) <= max(2, max(away)) + 1, report
    assert "Traceback" not in node.output


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="needs Linux scheduling classes")
def test_sigint_stops_cleanly_while_the_signal_thread_is_slow(ros_env, micro):
    """The node's main() stopped by SIGINT while rclpy's signal thread, which wakes the executor,
    is still at work (helpers/slow_signal_thread.py: one CPU, that thread at idle priority). With
    the executor shut down before that thread was joined, all 7 runs of this test ended in signal
    11, most at the first stop; on a loaded machine the soak met it once in 23 runs."""
    rounds = 4
    command = [sys.executable, str(HELPERS / "slow_signal_thread.py"), str(rounds)]
    command += ros_arguments([config_file("policy_node.yaml")],
                             {"checkpoint": micro["checkpoint"]})
    node = NodeProcess(subprocess.Popen(command, env=ros_env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, bufsize=1),
                       "slow_signal_thread")
    try:
        seen = 0
        for _ in range(rounds):
            node.wait_for(r"ready: serving", timeout=90, start=seen)
            seen = len(node.lines)
            time.sleep(0.3)  # the executor is waiting for work, as at the end of a stream
            node.popen.send_signal(signal.SIGINT)
        assert node.popen.wait(60) == 0, node.output
        assert f"stopped cleanly {rounds} times" in node.output
        assert "Traceback" not in node.output
    finally:
        node.stop()
