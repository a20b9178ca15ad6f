"""Image in -> chunk out through qvla_policy_node over DDS, and what the node adds to the policy.

For each plan (full precision, and the plans given): start qvla_policy_node as its own process
(config/policy_node.yaml, image QoS reliable), then from this process
  1. lock-step: publish one observation (proprio, image2, image), wait for its chunk, repeat;
  2. stream: publish at --rate Hz regardless of answers, for the same number of frames.
Per chunk it records:
  forward    the policy forward inside the node            (ActionChunk.inference_time)
  node       image callback -> chunk published, in the node  (ActionChunk.latency)
  round trip publish here -> chunk received here           (both DDS hops included)
and node overhead = node - forward, DDS + conversion = round trip - forward. The same policy's
forward is also timed in this process, alone, as the reference.

    .venv/bin/python bench/ros/bench_latency.py                      # writes bench/ros/results/
    .venv/bin/python bench/ros/bench_latency.py --frames 100 --plan config/plans/x.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def percentiles(values_s) -> dict:
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "mean": float(ms.mean()), "n": int(ms.size)}


def reference_forward(checkpoint: str, plan: str, frames: int, obs, threads: int) -> list[float]:
    """The policy forward alone, in this process, as the node runs it (batch of one)."""
    import torch

    from qvla_ros.quant import load_quantized_policy

    torch.set_num_threads(threads or os.cpu_count())
    policy = load_quantized_policy(checkpoint or None, plan or None)
    images = torch.from_numpy(obs["images"])[None]
    proprio = torch.from_numpy(obs["proprio"])[None]
    times = []
    with torch.inference_mode():
        for i in range(frames + 5):
            start = time.perf_counter()
            policy(images, [obs["instruction"]], proprio)
            if i >= 5:
                times.append(time.perf_counter() - start)
    return times


def run_node(checkpoint: str, plan: str, frames: int, rate: float, obs, env,
             threads: int) -> dict:
    from qvla_ros.ros.feeder import Feeder
    from qvla_ros.ros.harness import NodeProcess
    from qvla_ros.ros.paths import config_file

    overrides = {"plan": plan, "image_qos": "reliable", "torch_threads": threads}
    if checkpoint:
        overrides["checkpoint"] = checkpoint
    node = NodeProcess.start("qvla_policy_node", [config_file("policy_node.yaml")],
                             overrides=overrides, env=env)
    node.wait_for("ready: serving", timeout=300)
    feeder = Feeder().spin_in_background()
    try:
        feeder.wait_for_policy_node()
        feeder.send_instruction(obs["instruction"])
        node.wait_for("instruction:", timeout=30)
        # Warm-up (first forwards allocate), then lock-step.
        for _ in range(5):
            n = len(feeder.received)
            feeder.send_observation(obs["images"], obs["proprio"])
            feeder.wait_chunks(1, since=n, timeout=60)
        lockstep = []
        for _ in range(frames):
            n = len(feeder.received)
            start = time.monotonic()
            feeder.send_observation(obs["images"], obs["proprio"])
            got = feeder.wait_chunks(1, since=n, timeout=60)[0]
            lockstep.append((got.arrival - start, got.chunk.latency, got.chunk.inference_time))

        # Stream at `rate` Hz: frames the node cannot take in time are dropped, never queued.
        n = len(feeder.received)
        sent = {}
        period = 1.0 / rate
        next_time = time.monotonic()
        for _ in range(frames):
            stamp = feeder.send_observation(obs["images"], obs["proprio"])
            sent[(stamp.sec, stamp.nanosec)] = time.monotonic()
            next_time += period
            time.sleep(max(0.0, next_time - time.monotonic()))
        time.sleep(1.0)
        streamed = [(r.arrival - sent[r.stamp], r.chunk.latency, r.chunk.inference_time)
                    for r in feeder.received[n:] if r.stamp in sent]
        plan_id = feeder.received[-1].chunk.plan_id
    finally:
        feeder.close()
        node.stop()

    def summary(rows):
        rows = np.asarray(rows)
        return {"round_trip_ms": percentiles(rows[:, 0]), "node_ms": percentiles(rows[:, 1]),
                "forward_ms": percentiles(rows[:, 2]),
                "node_overhead_ms": percentiles(rows[:, 1] - rows[:, 2]),
                "dds_and_conversion_ms": percentiles(rows[:, 0] - rows[:, 2])}

    out = {"plan_id": plan_id, "lockstep": summary(lockstep), "stream": summary(streamed)}
    out["stream"].update(rate_hz=rate, frames_sent=frames, chunks=len(streamed))
    out["raw_lockstep"] = [list(map(float, r)) for r in lockstep]
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(1, len(runs) + 1, figsize=(4.8 * (len(runs) + 1), 3.8),
                             squeeze=False)
    for ax, run in zip(axes[0], runs):
        raw = np.asarray(run["raw_lockstep"]) * 1e3
        for column, label in [(2, "policy forward (in node)"), (1, "image callback -> publish"),
                              (0, "round trip over DDS")]:
            values = np.sort(raw[:, column])
            ax.plot(values, np.linspace(0, 1, len(values)), label=label)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of frames")
        ax.set_title(f"{run['label']} (lock-step)", fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    for run in runs:
        raw = np.asarray(run["raw_lockstep"]) * 1e3
        for values, style, what in [(raw[:, 1] - raw[:, 2], "-", "node overhead"),
                                    (raw[:, 0] - raw[:, 2], "--", "DDS + conversion")]:
            values = np.sort(values)
            ax.plot(values, np.linspace(0, 1, len(values)), style,
                    label=f"{run['label']}: {what}")
    ax.set_xscale("log")
    ax.set_xlabel("ms beyond the policy forward")
    ax.set_title("what ROS adds", fontsize=9)
    ax.legend(fontsize=7)
    load = ", ".join(f"{x:.1f}" for x in results["load_average_after"])
    fig.suptitle(f"qvla_policy_node, {results['policy']}; {results['cpu']} x{results['cores']}, "
                 f"load average {load}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="", help="policy checkpoint (default: shipped, "
                        "or a random `tiny` policy of the same size where none is shipped)")
    parser.add_argument("--plan", action="append", default=[],
                        help="plan(s) to measure besides full precision")
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--rate", type=float, default=30.0, help="stream rate, Hz")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="threads of the policy forward, in the node and alone (0: one per core)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    load_before = os.getloadavg()

    from qvla_ros.policy import default_checkpoint_dir, make_policy

    checkpoint, label = args.checkpoint, "given checkpoint"
    if not checkpoint:
        if (default_checkpoint_dir() / "model.safetensors").is_file():
            label = "shipped tiny policy"
        else:
            import tempfile
            checkpoint = str(Path(tempfile.mkdtemp(prefix="qvla_bench_")) / "random_tiny")
            make_policy("tiny", seed=0).save_pretrained(checkpoint)
            label = "random-weight tiny policy (none shipped yet)"
    env = dict(os.environ)
    env.setdefault("ROS_DOMAIN_ID", "87")
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    from qvla_ros.ros.transport import apply_transport
    apply_transport(env)
    os.environ.update(env)

    import rclpy
    from qvla_ros.policy import load_policy

    cfg = load_policy(checkpoint or None).config
    rng = np.random.default_rng(0)
    obs = {"images": rng.integers(0, 256, (cfg.n_cams, cfg.image_size, cfg.image_size, 3),
                                  np.uint8),
           "proprio": np.array([0.0, 0.6, 0.2, 1.0], np.float32),
           "instruction": "pull the drawer open"}
    rclpy.init()
    runs = []
    try:
        for plan in [""] + args.plan:
            print(f"measuring {plan or 'full precision'} ...", flush=True)
            run = run_node(checkpoint, plan, args.frames, args.rate, obs, env, args.torch_threads)
            run["label"] = Path(plan).name if plan else "full precision"
            run["reference_forward_s"] = reference_forward(checkpoint, plan, args.frames, obs,
                                                           args.torch_threads)
            run["reference_forward_ms"] = percentiles(run["reference_forward_s"])
            runs.append(run)
    finally:
        rclpy.try_shutdown()
    results = {"policy": label, "checkpoint": args.checkpoint or label, "cpu": cpu_model(),
               "cores": os.cpu_count(), "load_average_before": load_before,
               "load_average_after": os.getloadavg(),
               "frames": args.frames, "torch_threads": args.torch_threads or os.cpu_count(), "image": f"{cfg.n_cams} x {cfg.image_size}x{cfg.image_size} rgb8",
               "date": time.strftime("%Y-%m-%d %H:%M"), "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latency.json").write_text(json.dumps(
        {**results, "runs": [{k: v for k, v in r.items() if not k.startswith(("raw", "reference_forward_s"))}
                             for r in runs]}, indent=2))
    plot(results, args.out / "latency.png")
    for run in runs:
        ls, st = run["lockstep"], run["stream"]
        print(f"{run['label']}: forward alone p50 {run['reference_forward_ms']['p50']:.1f} ms; "
              f"lock-step round trip p50 {ls['round_trip_ms']['p50']:.1f} / p99 "
              f"{ls['round_trip_ms']['p99']:.1f} ms, node overhead p50 "
              f"{ls['node_overhead_ms']['p50']:.2f} / p99 {ls['node_overhead_ms']['p99']:.2f} ms; "
              f"{st['rate_hz']:.0f} Hz stream: {st['chunks']}/{st['frames_sent']} frames answered, "
              f"round trip p50 {st['round_trip_ms']['p50']:.1f} / p99 {st['round_trip_ms']['p99']:.1f} ms")
    print(f"results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
