"""Single actions at the control rate (issue #21 item 4), over DDS with the policy node in its own
process: the rate as measured by a subscriber, each action a row of the chunk whose image stamp
it carries (latest) or ACT's exponential ensemble of overlapping chunks, and hold / zero once
chunks stop."""
import math
import threading
import time

import numpy as np
import pytest

pytestmark = pytest.mark.ros

rclpy = pytest.importorskip("rclpy")

from qvla_ros.ros.harness import NodeProcess  # noqa: E402
from qvla_ros.ros.paths import config_file  # noqa: E402

INSTRUCTION = "open the drawer"


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from qvla_ros.policy import make_policy

    root = tmp_path_factory.mktemp("micro_actions")
    policy = make_policy("micro", seed=0)
    policy.save_pretrained(root / "ckpt")
    cfg = policy.config
    images = np.random.default_rng(0).integers(
        0, 256, (cfg.n_cams, cfg.image_size, cfg.image_size, 3), np.uint8)
    return {"checkpoint": str(root / "ckpt"), "images": images}


class Actions:
    """What a controller sees on `action`: (arrival, stamp, values, message)."""

    def __init__(self, node):
        from qvla_ros.msg import ActionChunk
        from qvla_ros.ros.topics import CHUNK_QOS

        self.items = []
        self._lock = threading.Lock()
        node.create_subscription(ActionChunk, "action", self._on, CHUNK_QOS)

    def _on(self, msg):
        with self._lock:
            self.items.append((time.monotonic(), (msg.header.stamp.sec, msg.header.stamp.nanosec),
                               np.asarray(msg.actions, np.float32), msg))

    def since(self, index=0):
        with self._lock:
            return list(self.items[index:])

    def wait(self, count, timeout=20.0, since=0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.since(since)
            if len(got) >= count:
                return got
            time.sleep(0.01)
        raise TimeoutError(f"{len(self.since(since))} of {count} actions within {timeout} s")


@pytest.fixture
def feeder(ros_env):
    from qvla_ros.ros.feeder import Feeder

    rclpy.init()
    node = Feeder()
    actions = Actions(node)
    node.spin_in_background()
    yield node, actions
    node.close()
    rclpy.try_shutdown()


def start(ros_env, micro, **overrides) -> NodeProcess:
    proc = NodeProcess.start("qvla_policy_node", [config_file("policy_node.yaml")],
                             overrides={"checkpoint": micro["checkpoint"], **overrides},
                             env=ros_env)
    proc.wait_for(r"ready: serving", timeout=90)
    return proc


def row_of(values, chunk_actions):
    """The index of the chunk row equal to `values`, or None."""
    for r, row in enumerate(chunk_actions):
        if np.array_equal(row, values):
            return r
    return None


def test_latest_at_the_control_rate_then_hold(ros_env, feeder, micro):
    feeder, actions = feeder
    rate = 50.0
    node = start(ros_env, micro, control_rate_hz=rate, action_aggregation="latest",
                 stale_after_s=0.3, on_stale="hold")
    try:
        assert "actions on /action at 50 Hz (latest; hold after 0.3 s" in node.wait_for("ready:")
        feeder.wait_for_policy_node()
        feeder.send_instruction(INSTRUCTION)
        node.wait_for(r"instruction: 'open the drawer'")
        time.sleep(0.5)
        assert actions.since() == []  # nothing to command before the first chunk
        # 20 Hz observations, each with its own proprio (so its own chunk), for 3 s.
        n_obs = 60
        for i in range(n_obs):
            feeder.send_observation(micro["images"], [0.1 + 0.01 * i, -0.2, 0.3, 0.7])
            time.sleep(0.05)
        chunks = {r.stamp: r.actions for r in feeder.wait_chunks(n_obs - 5)}
        fresh_end = len(actions.since())
        time.sleep(0.8)  # chunks stopped: stale after 0.3 s
        got = actions.since()
    finally:
        node.stop()

    fresh = got[:fresh_end]
    # The rate, measured at the subscriber over the fed stretch (first second skipped: start).
    arrivals = np.array([a[0] for a in fresh])
    window = arrivals[arrivals > arrivals[0] + 1.0]
    measured = (len(window) - 1) / (window[-1] - window[0])
    gaps = np.diff(window) * 1e3
    print(f"\naction rate {measured:.2f} Hz (asked {rate:g}); gap p50 {np.median(gaps):.1f} ms, "
          f"p99 {np.percentile(gaps, 99):.1f} ms, max {gaps.max():.1f} ms over {len(window)}")
    assert abs(measured - rate) / rate < 0.05
    assert np.percentile(gaps, 99) < 3 / rate * 1e3

    # Every fresh action is a row of the chunk whose image stamp it carries; one chunk's rows
    # come in order, one step a tick; a new chunk starts within two periods of its image.
    # A chunk's first step is the one of the control period its age falls in (the latency
    # skipped). On a loaded machine a chunk can come later than its predecessor's last step: then
    # that step is held (counted; a few at most).
    previous = None
    switches = held_fresh = 0
    for _, stamp, values, msg in fresh:
        assert stamp in chunks, stamp
        r = row_of(values, chunks[stamp])
        assert r is not None, (values, chunks[stamp])
        assert msg.horizon == 1 and msg.action_dim == 4 and msg.plan_id == ""
        assert msg.instruction == INSTRUCTION
        if previous is not None and previous[0] == stamp:
            if r == previous[1] == 3:
                held_fresh += 1
            else:
                assert r == previous[1] + 1
        else:
            switches += 1
            age_in_periods = msg.latency * rate
            assert r <= age_in_periods + 1e-3 and r > age_in_periods - 1.001, (r, msg.latency)
        previous = (stamp, r)
    print(f"{switches} chunks used, {held_fresh} last step(s) held while fed")
    assert switches >= n_obs - 10  # nearly every chunk was used
    assert held_fresh <= 0.1 * len(fresh)

    # Stale: the last chunk's rows to its end, then its last row held (horizon 4 at 50 Hz runs
    # out 80 ms after it came), with its stamp, the age growing.
    last = max(chunks)
    tail = [item for item in got if item[1] == last]
    rows = [row_of(values, chunks[last]) for _, _, values, _ in tail]
    first_held = rows.index(3) + 1
    assert rows[:first_held] == list(range(rows[0], 4))
    held = tail[first_held:]
    assert len(held) > 20 and all(r == 3 for r in rows[first_held:])
    assert got[-len(held):] == held  # nothing else after it
    assert held[-1][3].latency > 0.6 and held[-1][3].latency > held[0][3].latency + 0.4
    assert "actions stale: no chunk fresher than stale_after_s (0.3 s)" in node.output


def test_temporal_ensemble_of_two_chunks_then_zero(ros_env, feeder, micro):
    feeder, actions = feeder
    rate, m = 10.0, 0.7
    w_new = math.exp(-m)
    node = start(ros_env, micro, control_rate_hz=rate, action_aggregation="temporal_ensemble",
                 ensemble_m=m, stale_after_s=5.0, on_stale="zero")
    try:
        feeder.wait_for_policy_node()
        feeder.send_instruction(INSTRUCTION)
        node.wait_for(r"instruction: 'open the drawer'")
        stamp_a = feeder.send_observation(micro["images"], [0.1, -0.2, 0.3, 0.7])
        [chunk_a] = feeder.wait_chunks(1)
        first = actions.wait(1)
        # B while A still has steps left: the two overlap.
        stamp_b = feeder.send_observation(micro["images"], [0.9, 0.5, -0.3, 0.1])
        chunk_b = feeder.wait_chunks(2)[1]
        actions.wait(len(first) + 6)
        node.wait_for("actions stale")
        got = actions.since()
    finally:
        node.stop()
    a, b = chunk_a.actions, chunk_b.actions
    key_a, key_b = (stamp_a.sec, stamp_a.nanosec), (stamp_b.sec, stamp_b.nanosec)
    assert chunk_a.stamp == key_a and chunk_b.stamp == key_b

    # A alone: its rows in order.
    seq = [(stamp, values, msg) for _, stamp, values, msg in got]
    i = 0
    rows_a = []
    while seq[i][0] == key_a:
        rows_a.append(row_of(seq[i][1], a))
        i += 1
    assert rows_a and None not in rows_a and rows_a == list(range(rows_a[0], rows_a[-1] + 1))
    # Overlap: (A[k] + e^-m B[j]) / (1 + e^-m), k continuing A's steps, j B's steps from its
    # start; stamped with B's image (the newest that contributed).
    k = rows_a[-1] + 1
    start_j = None
    mixed = 0
    while k < len(a) and seq[i][0] == key_b and seq[i][2].latency <= 5.0:
        candidates = [j for j in range(len(b))
                      if np.allclose(seq[i][1], (a[k] + w_new * b[j]) / (1 + w_new), atol=1e-6)]
        if not candidates:
            break
        j = candidates[0]
        if start_j is None:
            start_j = j - mixed
        assert j == start_j + mixed
        mixed += 1
        k += 1
        i += 1
    assert mixed >= 1, seq[i]
    assert k == len(a)  # the ensemble lasted until A ran out
    # B alone to its end, then zeros (on_stale zero), still stamped with B.
    for j in range(start_j + mixed, len(b)):
        assert seq[i][0] == key_b
        np.testing.assert_array_equal(seq[i][1], b[j])
        i += 1
    assert len(seq) > i
    for stamp, values, msg in seq[i:]:
        assert stamp == key_b and not values.any()
    print(f"\nensemble: {len(rows_a)} action(s) from A alone, {mixed} of A+B, "
          f"{len(b) - start_j - mixed} of B alone, {len(seq) - i} zero")
