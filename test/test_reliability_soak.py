"""The soak benchmark's short version (bench/soak/soak.py): qvla_policy_node as its own process
over DDS, a 30 Hz stream for 20 s, a plan reload every 2 s (alternating two plans, every third
one a bad plan), malformed messages mixed in at ~3 a second.

Asserted: no crash (node up to the end, clean exit, no traceback); no mixed-plan chunk (every
chunk equals what the plan it names computes), chunks in frame order, every frame the node
received accounted for (answered, dropped as stale, or dropped for a counted reason such as a
partner that came too late); every malformed message counted under its kind by the node (one on
a depth-1 topic, proprio or instruction, superseded in the DDS queue before the node took it may
go uncounted, never over-counted); good reloads served, bad ones
refused; node RSS after warm-up grows by less than 40 MiB (the 10-minute run's figures are in
bench/soak/README.md); no file descriptor leak.
"""
import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ros
pytest.importorskip("rclpy")

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak" / "soak.py"
RSS_GROWTH_BOUND_MIB = 40


def load_soak():
    spec = importlib.util.spec_from_file_location("qvla_soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_short_soak(ros_env, tmp_path):
    soak = load_soak()
    result = soak.soak(duration=20, policy="micro", reload_period=2.0, bad_every=3,
                       malformed_per_s=3.0, warmup=8.0, work=tmp_path / "work", env=ros_env,
                       progress=False)
    crashes, chunks, malformed = result["crashes"], result["chunks"], result["malformed"]
    reloads, memory = result["reloads"], result["memory"]
    summary = {k: v for k, v in result.items() if k != "samples"}

    assert crashes == {"node_alive_at_end": True, "exit_code": 0, "tracebacks": 0,
                       "errors": []}, summary
    assert chunks["mixed_plan"] == 0 and chunks["wrong_instruction"] == 0, summary
    assert chunks["unknown_stamp"] == 0 and chunks["in_order"], summary
    # Both plans served, and the plan changed only at reloads.
    assert len(chunks["by_plan"]) == 2 and chunks["plan_changes_seen"] <= reloads["good"], summary
    # Every frame the node got is answered or dropped as stale (nothing lost inside the node); a
    # loaded machine may lose a few in the DDS queues before the node, and answers most.
    assert chunks["lost_before_node"] <= 0.05 * chunks["frames_sent"], summary
    assert (chunks["node_chunks_total"] + chunks["node_frames_dropped_stale"]
            + sum(chunks["node_frames_dropped_other"].values())
            == chunks["node_frames_total"]), summary
    assert "forward" not in chunks["node_frames_dropped_other"], summary
    assert chunks["chunks_received"] == chunks["node_chunks_total"], summary
    assert chunks["ratio"] > 0.5, summary

    assert sum(malformed["sent"].values()) >= 20, summary
    assert malformed["all_counted"] and not malformed["other_rejections"], summary

    assert reloads["total"] >= 6 and reloads["bad"] >= 2, summary
    assert reloads["good_succeeded"] == reloads["good"], summary
    assert reloads["bad_refused"] == reloads["bad"] and not reloads["inconsistent"], summary
    assert reloads["node_reloads"] == reloads["good"], summary
    assert reloads["node_reloads_refused"] == reloads["bad"], summary

    assert memory["growth_after_warmup_mib"] < RSS_GROWTH_BOUND_MIB, summary
    assert memory["fds"][1] <= memory["fds"][0] + 2, summary
