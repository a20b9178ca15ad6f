"""A plan reload of qvla_policy_node while a camera streams at 30 Hz, against the same reload idle.

Starts qvla_policy_node as its own process (config/policy_node.yaml, the shipped `tiny` policy or
--checkpoint, --plan to start with) and drives it from this process over DDS:
  idle:      no frames; ~/reload_plan to each plan of --reload in turn, `--rounds` times;
  streaming: observations at --rate Hz; the same reloads while the stream runs.
Per reload: the service call's wall time (request sent -> answer received here). Per mode, from
the chunks received here: the largest gap between consecutive chunk arrivals while a reload ran
and away from reloads, and the forward time inside the node (ActionChunk.inference_time).

    .venv/bin/python bench/ros/bench_reload_under_stream.py       # -> bench/ros/reload_under_stream.json
    .venv/bin/python bench/ros/bench_reload_under_stream.py --rounds 2 --out /tmp/r.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from bench_latency import cpu_model  # noqa: E402


def chunk_gaps(arrivals: list[float], windows: list[tuple[float, float]]) -> tuple[list, list]:
    """Gaps (s) between consecutive chunk arrivals, split into those that overlap a reload window
    and the rest."""
    during, away = [], []
    for t0, t1 in zip(arrivals, arrivals[1:]):
        overlaps = any(t0 <= end and start <= t1 for start, end in windows)
        (during if overlaps else away).append(t1 - t0)
    return during, away


def run(args) -> dict:
    import rclpy

    from qvla_ros.ros.feeder import Feeder
    from qvla_ros.ros.harness import NodeProcess
    from qvla_ros.ros.paths import config_file, resolve

    env = dict(os.environ)
    env.setdefault("ROS_DOMAIN_ID", str(150 + os.getpid() % 50))
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.update({k: env[k] for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE")})
    overrides = {"plan": resolve(args.plan), "torch_threads": args.torch_threads}
    if args.checkpoint:
        overrides["checkpoint"] = args.checkpoint
    node = NodeProcess.start("qvla_policy_node", [config_file("policy_node.yaml")],
                             overrides=overrides, env=env)
    node.wait_for("ready: serving", timeout=300)
    rclpy.init()
    feeder = Feeder().spin_in_background()
    cfg_line = node.wait_for("ready: serving")
    rng = np.random.default_rng(0)
    n_cams = 2 if "image2" in cfg_line else 1
    size = int(cfg_line.split(" into ")[1].split("x")[0])
    images = rng.integers(0, 256, (n_cams, size, size, 3), np.uint8)
    proprio = np.array([0.1, -0.2, 0.3, 0.7], np.float32)
    plans = [resolve(p) for p in args.reload]
    sequence = (plans + [resolve(args.plan)]) * args.rounds
    result = {}
    gc.collect()
    gc.freeze()  # a full collection of this process's heap would stall the stream, not the node
    try:
        feeder.wait_for_policy_node()
        feeder.send_instruction("open the drawer")

        def reloads() -> tuple[list[float], list[tuple[float, float]], list[str]]:
            seconds, windows, messages = [], [], []
            for path in sequence:
                time.sleep(args.pause)
                start = time.monotonic()
                answer = feeder.reload(path, timeout=120)
                end = time.monotonic()
                if not answer.success:
                    raise RuntimeError(f"reload of {path} refused: {answer.message}")
                seconds.append(end - start)
                windows.append((start, end))
                messages.append(answer.message)
            return seconds, windows, messages

        idle_s, _, idle_messages = reloads()
        result["idle"] = {"reload_s": idle_s, "messages": idle_messages}

        stop = threading.Event()
        period = 1.0 / args.rate

        def stream():
            next_time = time.monotonic()
            while not stop.is_set():
                feeder.send_observation(images, proprio)
                next_time += period
                time.sleep(max(0.0, next_time - time.monotonic()))

        since = len(feeder.received)
        streamer = threading.Thread(target=stream, daemon=True)
        streamer.start()
        feeder.wait_chunks(30, since=since, timeout=60)
        first = len(feeder.received)
        stream_s, windows, messages = reloads()
        time.sleep(args.pause)
        stop.set()
        streamer.join()
        time.sleep(0.3)
        chunks = feeder.received[first:]
        during, away = chunk_gaps([r.arrival for r in chunks], windows)
        forward = np.array([r.chunk.inference_time for r in chunks]) * 1e3
        # The worst gap during a reload: the forward and node latency of the chunk that ended it.
        worst = max(range(1, len(chunks)), key=lambda i: (
            any(chunks[i - 1].arrival <= end and start <= chunks[i].arrival
                for start, end in windows), chunks[i].arrival - chunks[i - 1].arrival))
        after = chunks[worst].chunk
        worst_gap = {"gap_ms": 1e3 * (chunks[worst].arrival - chunks[worst - 1].arrival),
                     "forward_ms": 1e3 * after.inference_time,
                     "previous_forward_ms": 1e3 * chunks[worst - 1].chunk.inference_time,
                     "node_latency_ms": 1e3 * after.latency}
        result["streaming"] = {
            "reload_s": stream_s, "messages": messages, "chunks": len(chunks),
            "max_gap_ms_during_reload": 1e3 * max(during) if during else None,
            "max_gap_ms_away": 1e3 * max(away) if away else None,
            "gap_ms_p50_away": 1e3 * float(np.median(away)) if away else None,
            "forward_ms_p50": float(np.median(forward)), "forward_ms_max": float(forward.max()),
            "worst_gap_during_reload": worst_gap,
        }
    finally:
        gc.unfreeze()
        feeder.close()
        rclpy.try_shutdown()
        code = node.stop()
    if code != 0:
        raise RuntimeError(f"policy node exited with {code}:\n{node.output}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="", help="policy directory; '' = shipped tiny")
    parser.add_argument("--plan", default="config/plans/tiny_qvla_4.0.json")
    parser.add_argument("--reload", nargs="+", default=["config/plans/tiny_qvla_3.0.json"])
    parser.add_argument("--rounds", type=int, default=3, help="passes over --reload and back")
    parser.add_argument("--rate", type=float, default=30.0)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--pause", type=float, default=1.0, help="s between reloads")
    parser.add_argument("--out", default=str(HERE / "reload_under_stream.json"))
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    result = run(args)
    streaming, idle = result["streaming"], result["idle"]
    record = {
        "what": "qvla_policy_node reload (~/reload_plan wall time at the caller) idle and under a "
                f"{args.rate:g} Hz image stream; chunk gaps at a subscriber in another process",
        "command": "bench/ros/bench_reload_under_stream.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()[0]},
        "settings": {"checkpoint": args.checkpoint or "shipped tiny", "plan": args.plan,
                     "reload": args.reload, "rounds": args.rounds, "rate_hz": args.rate,
                     "torch_threads": args.torch_threads},
        "idle_reload_s_max": max(idle["reload_s"]),
        "streaming_reload_s_max": max(streaming["reload_s"]),
        "frame_period_ms": 1e3 / args.rate,
        **result,
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k not in ("idle", "streaming")}, indent=1))
    print(json.dumps({k: v for k, v in streaming.items() if k != "messages"}, indent=1))


if __name__ == "__main__":
    main()
