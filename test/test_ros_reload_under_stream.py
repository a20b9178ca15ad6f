"""A plan reload while a camera streams at 30 Hz, over DDS, the node in its own process: the
reload ends within 3 s and the chunk stream keeps its pace.

The shipped `tiny` policy and two shipped plans (config/plans/tiny_qvla_{4.0,3.0}.json): the real
checkpoint and the real packed weights. Its CPU forward (36-66 ms with one torch thread on the
2-core machine, depending on the load) is longer than a 30 Hz frame period, which is what made
reloads slow: the worker then runs forwards back to back, and the reload's build, which stepped
aside for every forward, got ~1/6 of the time (4.7-5.7 s here, 15-22 s on a loaded machine,
against 0.3-0.4 s idle). The micro policy of test_ros_policy_node.py leaves the build idle time
between frames and could not show it.
"""
import gc
import os
import threading
import time
import warnings

import numpy as np
import pytest

pytestmark = [pytest.mark.ros, pytest.mark.slow]

rclpy = pytest.importorskip("rclpy")

from qvla_ros.ros.forward_priority import SHARE  # noqa: E402
from qvla_ros.ros.harness import NodeProcess  # noqa: E402
from qvla_ros.ros.paths import config_file  # noqa: E402

FRAME_PERIOD = 1 / 30
RELOAD_LIMIT_S = 3.0
PLANS = ("config/plans/tiny_qvla_4.0.json", "config/plans/tiny_qvla_3.0.json")


def cpu_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs since boot: steal is time the hypervisor gave this
    machine's virtual cores to others, which slows every process here without showing in the
    load average."""
    fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    return fields[7] if len(fields) > 7 else 0, sum(fields[:8])


def test_reload_under_a_30hz_stream_is_quick_and_leaves_no_gap(ros_env, feeder):
    from qvla_ros.ros.paths import resolve

    start_plan, other_plan = (resolve(p) for p in PLANS)
    # One torch thread, as on a robot computer whose cores other processes share.
    node = NodeProcess.start("qvla_policy_node", [config_file("policy_node.yaml")],
                             overrides={"plan": start_plan, "torch_threads": 1}, env=ros_env)
    node.wait_for(r"ready: serving", timeout=120)
    # This process is the camera: a full collection of its heap would stop the stream (see
    # test_ros_policy_node.test_reload_under_a_30hz_stream).
    gc.collect()
    gc.freeze()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 128, 128, 3), np.uint8)
    proprio = np.array([0.1, -0.2, 0.3, 0.7], np.float32)
    windows, answers = [], []
    try:
        feeder.wait_for_policy_node()
        feeder.send_instruction("open the drawer")
        stop = threading.Event()

        def stream():
            next_time = time.monotonic()
            while not stop.is_set():
                feeder.send_observation(images, proprio)
                next_time += FRAME_PERIOD
                time.sleep(max(0.0, next_time - time.monotonic()))

        streamer = threading.Thread(target=stream, daemon=True)
        streamer.start()
        feeder.wait_chunks(20, timeout=60)
        first = len(feeder.received)
        steal_before = cpu_ticks()
        assert feeder.reload_client.wait_for_service(timeout_sec=10)
        for path in (other_plan, start_plan):
            time.sleep(0.5)
            start = time.monotonic()
            answers.append(feeder.reload(path))
            windows.append((start, time.monotonic()))
        time.sleep(0.5)
        stop.set()
        streamer.join()
        load_average = os.getloadavg()[0]
        steal_after = cpu_ticks()
        time.sleep(0.3)
    finally:
        gc.unfreeze()
        assert node.stop() == 0, node.output

    for answer in answers:
        assert answer.success, answer.message
        # Forwards ran during the build, each followed by a turn of it (forward_priority).
        assert "forwards run first" in answer.message, answer.message
    chunks = feeder.received[first:]
    ids = [r.chunk.plan_id for r in chunks]
    changes = [ids[i] for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]
    assert len(changes) == 3 and changes[0] == changes[2] != changes[1], changes

    during, away = [], []  # (gap s, forward s of the chunk that ended the gap)
    for previous, r in zip(chunks, chunks[1:]):
        overlaps = any(previous.arrival <= end and start <= r.arrival for start, end in windows)
        (during if overlaps else away).append((r.arrival - previous.arrival,
                                               r.chunk.inference_time))
    assert len(during) > 5 and len(away) > 5
    forward = float(np.median([f for _, f in away]))
    forward_during = float(np.median([f for _, f in during]))
    reload_s = [end - start for start, end in windows]
    # The bound is two frame periods. Chunks cannot come faster than one per forward,
    # though, and this policy's forward on this CPU (36-90 ms: the cores are shared with other
    # machines) is longer than a frame period: forwards run back to back, the stream's own gap is
    # one forward, and even away from reloads single forwards take up to twice the median. So each
    # gap during a reload is bounded by two frame periods or, where longer, by the forward that
    # ended it (measured in the node) plus one turn of the build (forward_priority: SHARE of a
    # typical forward) plus 25 ms for the node's work between forwards, publishing and DDS. And
    # the forwards during reloads must not be slower than elsewhere: a build running beside them
    # made each three times slower (115-120 ms for 36 ms). Before the turns, a build that stepped
    # aside for every forward kept the gaps but took 7-15 s here.
    turn = SHARE * forward
    worst_gap, worst_forward = max(during)
    over = [(g, f) for g, f in during if g > max(2 * FRAME_PERIOD, f + turn + 0.025)]
    steal = ((steal_after[0] - steal_before[0])
             / max(1, steal_after[1] - steal_before[1]))
    report = (f"reloads {[f'{s:.2f}' for s in reload_s]} s; max chunk gap during reloads "
              f"{1e3 * worst_gap:.0f} ms (its forward {1e3 * worst_forward:.0f} ms), elsewhere "
              f"{1e3 * max(away)[0]:.0f} ms; forward p50 {1e3 * forward:.0f} ms away from "
              f"reloads, {1e3 * forward_during:.0f} ms during; gaps over the bound (gap, forward)"
              f" {[(round(1e3 * g), round(1e3 * f)) for g, f in over]}; load average "
              f"{load_average:.1f} on {os.cpu_count()} cores, CPU steal {100 * steal:.0f}%")
    if load_average > 2 * os.cpu_count() or steal > 0.25:
        # Other processes (or other machines on the host) oversubscribe the cores: the stream
        # itself stutters and a build's CPU time stretches; what a reload costs cannot be told
        # apart from that.
        warnings.warn(f"machine oversubscribed: not judging reload times and gaps; {report}")
    else:
        assert max(reload_s) <= RELOAD_LIMIT_S, report
        assert not over, report
        assert forward_during <= 1.25 * forward + 0.005, report
    assert "Traceback" not in node.output
