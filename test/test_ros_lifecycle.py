"""The managed policy node (issue #21 item 3) in its own process, driven over DDS through the
standard lifecycle_msgs services, as a launch file or lifecycle manager drives it: configure
loads and checks the policy and plan (a bad plan fails the transition), inactive publishes
nothing, activate serves chunks and actions, deactivate stops, cleanup frees the policy,
shutdown ends the process."""
import threading
import time

import numpy as np
import pytest

pytestmark = pytest.mark.ros

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("rclpy.lifecycle")
lifecycle_msgs = pytest.importorskip("lifecycle_msgs")

from qvla_ros.ros.harness import NodeProcess  # noqa: E402
from qvla_ros.ros.paths import config_file  # noqa: E402

NODE = "/qvla_policy_node"


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from qvla_ros.policy import make_policy
    from qvla_ros.quant import quantizable_linears
    from qvla_ros.quant.plan import plan_from_bits

    root = tmp_path_factory.mktemp("micro_lifecycle")
    policy = make_policy("micro", seed=0)
    policy.save_pretrained(root / "ckpt")
    plan = plan_from_bits(policy, {n: 4 for n in quantizable_linears(policy)})
    w4 = str(plan.save(root / "w4.json"))
    truncated = root / "truncated.json"
    truncated.write_text(open(w4).read()[:200])
    cfg = policy.config
    images = np.random.default_rng(0).integers(
        0, 256, (cfg.n_cams, cfg.image_size, cfg.image_size, 3), np.uint8)
    return {"checkpoint": str(root / "ckpt"), "w4": (w4, plan.plan_id),
            "truncated": str(truncated), "images": images}


@pytest.fixture
def feeder(ros_env):
    from qvla_ros.msg import ActionChunk
    from qvla_ros.ros.feeder import Feeder
    from qvla_ros.ros.topics import CHUNK_QOS

    rclpy.init()
    node = Feeder()
    node.actions = []
    node.create_subscription(ActionChunk, "action", node.actions.append, CHUNK_QOS)
    node.spin_in_background()
    yield node
    _clients.clear()
    node.close()
    rclpy.try_shutdown()


_clients = {}


def call(node, srv_type, name, request, timeout=60.0):
    client = _clients.get((id(node), name))
    if client is None:
        client = _clients[(id(node), name)] = node.create_client(srv_type, name)
    assert client.wait_for_service(timeout_sec=timeout), name
    future = client.call_async(request)
    done = threading.Event()
    future.add_done_callback(lambda _: done.set())
    assert done.wait(timeout), f"no answer from {name}"
    return future.result()


def transition(node, transition_id) -> bool:
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    request = ChangeState.Request(transition=Transition(id=transition_id))
    return call(node, ChangeState, f"{NODE}/change_state", request).success


def state(node) -> str:
    from lifecycle_msgs.srv import GetState

    return call(node, GetState, f"{NODE}/get_state", GetState.Request()).current_state.label


def set_plan(node, path):
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters

    value = ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=path)
    request = SetParameters.Request(parameters=[Parameter(name="plan", value=value)])
    return call(node, SetParameters, f"{NODE}/set_parameters", request).results[0]


def nothing_published(feeder, chunks, actions, wait=0.6):
    time.sleep(wait)
    return len(feeder.received) == chunks and len(feeder.actions) == actions


def test_lifecycle_transitions_over_dds(ros_env, feeder, micro):
    from lifecycle_msgs.msg import Transition as T

    w4, w4_id = micro["w4"]
    proprio = [0.1, -0.2, 0.3, 0.7]
    node = NodeProcess.start("qvla_managed_policy_node", [config_file("policy_node.yaml")],
                             overrides={"checkpoint": micro["checkpoint"],
                                        "plan": micro["truncated"], "control_rate_hz": 20.0},
                             env=ros_env)
    try:
        node.wait_for(r"unconfigured: waiting for the configure transition", timeout=60)
        assert state(feeder) == "unconfigured"
        # Nothing loaded, nothing on the topics yet.
        assert feeder.count_publishers("action_chunk") == 0
        assert feeder.count_subscribers("image") == 0

        # configure checks the plan: a truncated one fails the transition, with its reason.
        assert not transition(feeder, T.TRANSITION_CONFIGURE)
        node.wait_for(r"configure failed: .*truncated.json.* cannot be loaded")
        assert state(feeder) == "unconfigured"
        # The plan parameter may be set while unconfigured; configure then loads it.
        result = set_plan(feeder, w4)
        assert result.successful, result.reason
        t0 = time.monotonic()
        assert transition(feeder, T.TRANSITION_CONFIGURE)
        configure_s = time.monotonic() - t0
        node.wait_for(rf"configured \(inactive\): loaded {w4_id}")
        assert state(feeder) == "inactive"

        # Inactive: subscribed, but frames are ignored and nothing is published.
        feeder.wait_for_policy_node()
        feeder.send_instruction("open the drawer")
        node.wait_for(r"instruction: 'open the drawer'")
        feeder.send_observation(micro["images"], proprio)
        assert nothing_published(feeder, 0, 0)

        # Active: chunks from the configured plan, and actions at the control rate.
        t0 = time.monotonic()
        assert transition(feeder, T.TRANSITION_ACTIVATE)
        activate_s = time.monotonic() - t0
        assert state(feeder) == "active"
        stamp = feeder.send_observation(micro["images"], proprio)
        [got] = feeder.wait_chunks(1)
        assert got.stamp == (stamp.sec, stamp.nanosec) and got.chunk.plan_id == w4_id
        deadline = time.monotonic() + 10
        while not feeder.actions and time.monotonic() < deadline:
            time.sleep(0.01)
        assert feeder.actions and feeder.actions[0].plan_id == w4_id
        assert feeder.actions[0].header.stamp == got.chunk.header.stamp

        # Deactivate: no chunk, no action (after the one that may be on its way).
        assert transition(feeder, T.TRANSITION_DEACTIVATE)
        assert state(feeder) == "inactive"
        time.sleep(0.2)
        chunks, actions = len(feeder.received), len(feeder.actions)
        feeder.send_observation(micro["images"], proprio)
        assert nothing_published(feeder, chunks, actions)

        # Activate again: serving at once, without loading anything.
        assert transition(feeder, T.TRANSITION_ACTIVATE)
        feeder.send_observation(micro["images"], proprio)
        feeder.wait_chunks(chunks + 1)

        # Deactivate + cleanup: the policy is freed, the topics go.
        assert transition(feeder, T.TRANSITION_DEACTIVATE)
        assert transition(feeder, T.TRANSITION_CLEANUP)
        node.wait_for(r"cleanup: policy freed; unconfigured")
        assert "still referenced" not in node.output
        assert state(feeder) == "unconfigured"
        deadline = time.monotonic() + 10
        while feeder.count_publishers("action_chunk") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert feeder.count_publishers("action_chunk") == 0

        # Configure again works (a fresh load), then shutdown ends the process cleanly.
        assert transition(feeder, T.TRANSITION_CONFIGURE)
        assert state(feeder) == "inactive"
        assert transition(feeder, T.TRANSITION_INACTIVE_SHUTDOWN)
        node.wait_for(r"shutdown: policy freed")
        node.popen.wait(30)
        assert node.popen.returncode == 0, node.output
    except AssertionError as exc:
        # A service call that gets no answer says nothing of the node: show what it printed (a
        # traceback there is why it stopped answering).
        if node.output not in str(exc):
            raise AssertionError(f"{exc}\n--- {node.name} output ---\n{node.output}") from exc
        raise
    finally:
        node.stop()
    print(f"\nconfigure {configure_s:.2f} s, activate {activate_s * 1e3:.0f} ms (micro policy)")


def test_spin_thread_calls_run_on_the_spinning_thread():
    """The managed node destroys its entities on the thread that spins (between two spin_once()):
    destroyed from a callback thread while that thread builds a wait set, rclpy raises
    InvalidHandle out of spin_once() and the node dies (seen as get_state unanswered after
    cleanup)."""
    from qvla_ros.ros.managed_policy_node import SpinThreadCalls

    calls = SpinThreadCalls()
    calls.bind()
    spinner = threading.get_ident()
    got = {}

    def from_callback():
        got["thread"] = calls.call(threading.get_ident)
        try:
            calls.call(lambda: 1 / 0)
        except ZeroDivisionError:
            got["raised"] = True

    worker = threading.Thread(target=from_callback)
    worker.start()
    deadline = time.monotonic() + 10
    while worker.is_alive() and time.monotonic() < deadline:
        calls.run_pending()  # what main() does between two spin_once()
        time.sleep(0.01)
    worker.join(1)
    assert got == {"thread": spinner, "raised": True}
    calls.close()  # nothing spins any more: calls run on their caller
    assert calls.call(threading.get_ident) == threading.get_ident()
