"""Soak: qvla_policy_node as its own process over DDS, fed a 30 Hz camera stream for a long time,
its bit plan reloaded every few seconds (alternating two plans, some reloads to bad plans) and
malformed messages mixed into the stream. Nothing may be lost or mixed up:

- crashes: the node must stay up (no exit, no Python traceback) and stop cleanly (exit code 0);
- chunks: every chunk must be exactly what the plan it names computes for the observation sent
  (a "mixed-plan" chunk would be a plan_id with another plan's actions); frames sent vs chunks
  received (frames that arrive during a forward are dropped as stale, by design);
- malformed inputs: each one sent is counted by the node under its kind (diagnostics) and none
  produces a chunk;
- reloads: good ones succeed, bad ones are refused and leave the serving plan; latency p50/p99;
- memory: the node's RSS (and GPU memory, when the node runs on a GPU) sampled every second;
  growth after warm-up must stay within a stated bound; open file descriptors and threads too.

Writes <out>/soak_<label>.json and a plot <out>/soak_<label>.png.

    .venv/bin/python bench/soak/soak.py --duration 600                 # the recorded long run
    .venv/bin/python bench/soak/soak.py --duration 25 --policy micro   # what CI runs (a test)
"""
from __future__ import annotations

import argparse
import array
import collections
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

INSTRUCTION = "open the drawer"
# Malformed messages the soak sends, each with the node's counter (diagnostics rejected_<kind>)
# that must count it.
MALFORMED = {
    "image_encoding": "image_encoding",  # mono8 where rgb8/bgr8 are expected
    "image_unknown_encoding": "image_encoding",  # an encoding nobody supports
    "image_size": "image_size",
    "image_short_data": "image_short_data",
    "image_step": "image_step",
    "proprio_nan": "proprio_nan",
    "proprio_names": "proprio_names",
    "instruction_empty": "instruction_empty",
    "instruction_long": "instruction_long",
    "instruction_not_utf8": "instruction_encoding",
}
# The node keeps only the newest proprio (best effort, depth 1) and the newest instruction
# (reliable, transient local, depth 1; qvla_ros/ros/topics.py): when its input callbacks fall
# behind, a malformed message there can be superseded in the DDS queue by the next one before
# the node takes it. For these counters the node may count fewer than were sent, never more;
# a superseded message reaches nothing, so no chunk can use it either.
SUPERSEDABLE = {"proprio_nan", "proprio_names", "instruction_empty", "instruction_long",
                "instruction_encoding"}
# Frames the node drops, by the reason it counts (stale frames are counted apart, as dropped).
FRAME_DROPS = {"no_proprio", "no_image2", "no_instruction", "camera_sizes", "forward"}
BAD_PLANS = ("missing", "truncated", "other_weights", "not_utf8", "oversized")


@dataclass
class Files:
    checkpoint: str  # "" = the shipped policy
    plans: dict[str, str]  # "a"/"b" -> path
    plan_ids: dict[str, str]
    bad: dict[str, str]  # kind -> path
    expected: dict[str, np.ndarray]  # plan_id -> chunk for the soak's observation
    images: np.ndarray
    proprio: np.ndarray


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def prepare(policy: str, work: Path) -> Files:
    """Checkpoint, two good plans (uniform 8 and 4 bits through the real quantizer), bad plans,
    and the fixed observation the soak streams."""
    from qvla_ros.policy import load_policy, make_policy
    from qvla_ros.quant import quantizable_linears
    from qvla_ros.quant.plan import plan_from_bits

    work.mkdir(parents=True, exist_ok=True)
    if policy == "micro":
        model = make_policy("micro", seed=0)
        checkpoint = str(model.save_pretrained(work / "micro"))
        other = make_policy("micro", seed=1)
    else:
        model, checkpoint = load_policy(), ""
        other = make_policy("tiny", seed=1)
    names = quantizable_linears(model)
    plans, ids = {}, {}
    for key, bits in (("a", 8), ("b", 4)):
        plan = plan_from_bits(model, {n: bits for n in names})
        plans[key] = str(plan.save(work / f"uniform_w{bits}.json"))
        ids[key] = plan.plan_id
    bad = {"missing": str(work / "no_such_plan.json")}
    text = Path(plans["b"]).read_text()
    (work / "truncated.json").write_text(text[: len(text) // 2])
    bad["truncated"] = str(work / "truncated.json")
    bad["other_weights"] = str(plan_from_bits(other, {n: 4 for n in quantizable_linears(other)})
                               .save(work / "other_weights.json"))
    (work / "not_utf8.json").write_bytes(b"\xff\xfe{" + os.urandom(256))
    bad["not_utf8"] = str(work / "not_utf8.json")
    with open(work / "oversized.json", "wb") as fh:  # sparse: past the plan size limit, no disk
        fh.truncate(300 * 2 ** 20)
    bad["oversized"] = str(work / "oversized.json")

    cfg = model.config
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (cfg.n_cams, cfg.image_size, cfg.image_size, 3), np.uint8)
    proprio = np.array([0.1, -0.2, 0.3, 0.7], np.float32)
    return Files(checkpoint, plans, ids, bad, {}, images, proprio)


def compute_expected(files: Files) -> None:
    """The chunk each good plan gives for the soak's observation, computed in this process (while
    the node starts)."""
    import torch

    from qvla_ros.quant import load_quantized_policy

    for key in ("a", "b"):
        served = load_quantized_policy(files.checkpoint or None, files.plans[key])
        with torch.inference_mode():
            out = served(torch.from_numpy(files.images)[None], [INSTRUCTION],
                         torch.from_numpy(files.proprio)[None])
        files.expected[files.plan_ids[key]] = out[0].numpy()


def process_sample(pid: int) -> dict:
    """RSS, threads and open file descriptors of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    values = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_mib": int(values["VmRSS"].split()[0]) / 1024,
            "threads": int(values["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def gpu_memory_mib(pid: int) -> float | None:
    """GPU memory the process holds (nvidia-smi), or None where there is no NVIDIA GPU."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    used = [float(m) for p, m in (line.split(",") for line in out.stdout.splitlines() if line)
            if int(p) == pid]
    return sum(used) if used else 0.0


def malformed_message(kind: str, files: Files, feeder):
    """(topic, message or raw bytes) for one malformed input of `kind`."""
    from rclpy.serialization import serialize_message
    from sensor_msgs.msg import JointState
    from std_msgs.msg import String

    from qvla_ros.ros.image_conversion import array_to_image

    stamp = feeder.get_clock().now().to_msg()
    image = files.images[0]
    if kind.startswith("image"):
        if kind == "image_encoding":
            msg = array_to_image(image[:, :, 0], "mono8")
        elif kind == "image_unknown_encoding":
            msg = array_to_image(image, "rgb8")
            msg.encoding = "rgba16"
        elif kind == "image_size":
            msg = array_to_image(image[: image.shape[0] // 2], "rgb8")
        elif kind == "image_short_data":
            msg = array_to_image(image, "rgb8")
            msg.data = msg.data[: len(msg.data) - 1 - random.randrange(len(msg.data) // 2)]
        else:
            msg = array_to_image(image, "rgb8")
            msg.step = random.randrange(0, msg.step)
        msg.header.stamp = stamp
        return "image", msg
    if kind.startswith("proprio"):
        msg = JointState()
        msg.header.stamp = stamp
        if kind == "proprio_nan":
            msg.name = ["ee_x", "ee_y", "ee_z", "gripper"]
            msg.position = [0.1, float("nan"), 0.3, 0.7]
        else:
            msg.name = ["j1", "j2", "j3"]
            msg.position = [0.1, 0.2, 0.3]
        return "proprio", msg
    if kind == "instruction_empty":
        return "instruction", String(data=random.choice(["", " ", "\t\n"]))
    if kind == "instruction_long":
        return "instruction", String(data="x" * random.randrange(4097, 20000))
    # Bytes that are not UTF-8 inside a well-formed CDR string, as a damaged sender would put
    # them on the wire.
    raw = serialize_message(String(data="abc"))
    payload = b"open the \xff\xfe drawer\x00"
    return "instruction", raw[:4] + len(payload).to_bytes(4, "little") + payload


@dataclass
class Run:
    sent: list = field(default_factory=list)  # (stamp tuple, monotonic time)
    malformed: collections.Counter = field(default_factory=collections.Counter)
    reloads: list = field(default_factory=list)  # dicts
    samples: list = field(default_factory=list)  # dicts
    diagnostics: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)


def soak(duration: float, policy: str = "micro", rate: float = 30.0, reload_period: float = 5.0,
         bad_every: int = 3, malformed_per_s: float = 2.0, warmup: float | None = None,
         torch_threads: int = 1, seed: int = 0, work: Path | None = None,
         env: dict | None = None, progress: bool = True) -> dict:
    """Run the soak; returns the result document (see the module docstring)."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray

    from qvla_ros.ros.feeder import Feeder
    from qvla_ros.ros.harness import NodeProcess
    from qvla_ros.ros.paths import config_file

    random.seed(seed)
    tmp = None
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="qvla_soak_")
        work = Path(tmp.name)
    env = dict(os.environ if env is None else env)
    warmup = min(120.0, duration * 0.3) if warmup is None else warmup
    phases = {}
    mark = time.monotonic()
    files = prepare(policy, work)
    phases["prepare_s"] = time.monotonic() - mark
    mark = time.monotonic()
    overrides = {"plan": files.plans["a"], "image_qos": "reliable", "image_qos_depth": 100,
                 "torch_threads": torch_threads, "diagnostics_period": 1.0,
                 # A frame of another size is one of the malformed kinds sent here (the node's
                 # default, fit, would answer it with a resized frame).
                 "image_resize": "refuse"}
    if files.checkpoint:
        overrides["checkpoint"] = files.checkpoint
    node = NodeProcess.start("qvla_policy_node", [config_file("policy_node.yaml")],
                             overrides=overrides, env=env)
    compute_expected(files)
    node.wait_for("ready: serving", timeout=300)
    phases["node_start_s"] = time.monotonic() - mark
    if not rclpy.ok():
        rclpy.init()
    feeder = Feeder().spin_in_background()
    run = Run()

    def on_diagnostics(msg):
        for status in msg.status:
            run.diagnostics = {kv.key: kv.value for kv in status.values}

    feeder.create_subscription(DiagnosticArray, "diagnostics", on_diagnostics, 10)
    stop = threading.Event()
    period = 1.0 / rate
    started = time.monotonic()

    def stream():
        """Observations at `rate`; malformed messages half a period after an observation."""
        next_time = time.monotonic()
        kinds = sorted(MALFORMED)
        while not stop.is_set():
            stamp = feeder.send_observation(files.images, files.proprio)
            run.sent.append(((stamp.sec, stamp.nanosec), time.monotonic()))
            if random.random() < malformed_per_s * period:
                time.sleep(period / 2)
                kind = random.choice(kinds)
                topic, msg = malformed_message(kind, files, feeder)
                publisher = {"image": feeder.image_pubs[0], "proprio": feeder.proprio_pub,
                             "instruction": feeder.instruction_pub}[topic]
                publisher.publish(msg)
                run.malformed[kind] += 1
            next_time += period
            time.sleep(max(0.0, next_time - time.monotonic()))

    def reload_loop():
        """A reload every reload_period: a, b, a, b, ... with every bad_every-th a bad plan."""
        count, good = 0, 0
        while not stop.wait(reload_period):
            count += 1
            if bad_every and count % bad_every == 0:
                kind = BAD_PLANS[(count // bad_every - 1) % len(BAD_PLANS)]
                path, want = files.bad[kind], None
            else:
                key = "ab"[(good + 1) % 2]
                good += 1
                kind, path, want = f"good_{key}", files.plans[key], files.plan_ids[key]
            start = time.monotonic()
            try:
                answer = feeder.reload(path, timeout=120)
            except TimeoutError as exc:
                run.errors.append(f"reload {kind}: {exc}")
                continue
            run.reloads.append({
                "t": start - started, "kind": kind, "seconds": time.monotonic() - start,
                "success": bool(answer.success), "active_plan_id": answer.active_plan_id,
                "expected_success": want is not None, "message": answer.message[:300],
                "consistent": (answer.success and answer.active_plan_id == want) if want
                else (not answer.success)})

    def sample_loop():
        while not stop.is_set():
            if node.popen.poll() is not None:
                run.errors.append(f"node exited with code {node.popen.returncode}")
                stop.set()
                return
            row = {"t": time.monotonic() - started, **process_sample(node.popen.pid),
                   "chunks": len(feeder.received), "frames": len(run.sent)}
            gpu = gpu_memory_mib(node.popen.pid) if overrides.get("device") else None
            row["gpu_mib"] = gpu
            run.samples.append(row)
            stop.wait(1.0)

    try:
        mark = time.monotonic()
        feeder.wait_for_policy_node(timeout=120)
        feeder.send_instruction(INSTRUCTION)
        node.wait_for(r"instruction: 'open the drawer'", timeout=60)
        phases["discovery_s"] = time.monotonic() - mark
        started = time.monotonic()
        threads = [threading.Thread(target=f, daemon=True)
                   for f in (stream, reload_loop, sample_loop)]
        for t in threads:
            t.start()
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=int(duration), unit="s", desc=f"soak {policy}")
        while not stop.is_set() and time.monotonic() - started < duration:
            time.sleep(1.0)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(chunks=len(feeder.received), reloads=len(run.reloads),
                                rss=f"{run.samples[-1]['rss_mib']:.0f}M" if run.samples else "-")
        if bar is not None:
            bar.close()
        stop.set()
        mark = time.monotonic()
        for t in threads:
            t.join(timeout=150)
        # Let the last chunks and one more diagnostics message (final counters) arrive.
        time.sleep(2.5)
        alive = node.popen.poll() is None
        exit_code = node.stop()
        phases["shutdown_s"] = time.monotonic() - mark
    finally:
        stop.set()
        if node.popen.poll() is None:
            node.stop()
        feeder.close()
        rclpy.try_shutdown()
    result = summarize(run, files, feeder.received, node.output, alive, exit_code, warmup,
                       duration, policy, rate, reload_period, bad_every, malformed_per_s,
                       torch_threads)
    result["phases"] = phases
    if tmp is not None:
        tmp.cleanup()
    return result


def summarize(run: Run, files: Files, received, output: str, alive: bool, exit_code: int,
              warmup: float, duration: float, policy: str, rate: float, reload_period: float,
              bad_every: int, malformed_per_s: float, torch_threads: int) -> dict:
    chunks = list(received)
    mixed = [r.chunk.plan_id for r in chunks if r.chunk.plan_id not in files.expected
             or not np.allclose(r.actions, files.expected[r.chunk.plan_id], atol=1e-5)]
    wrong_instruction = sum(r.chunk.instruction != INSTRUCTION for r in chunks)
    sent_index = {stamp: i for i, (stamp, _) in enumerate(run.sent)}
    answered = [sent_index.get(r.stamp, -1) for r in chunks]
    diag = run.diagnostics
    counted = {kind: int(diag.get(f"rejected_{kind}", 0)) for kind in set(MALFORMED.values())}
    sent_by_counter = collections.Counter()
    for kind, n in run.malformed.items():
        sent_by_counter[MALFORMED[kind]] += n
    rejected = {k[len("rejected_"):]: int(v) for k, v in diag.items() if k.startswith("rejected_")}
    frame_drops = {k: v for k, v in rejected.items() if k in FRAME_DROPS}
    unexpected_rejections = {k: v for k, v in rejected.items()
                             if k not in counted and k not in FRAME_DROPS}

    # Frames the node never saw: a reliable KEEP_LAST queue (the feeder's writer keeps 10) can
    # still overwrite samples when the node's input callbacks fall behind on a loaded machine.
    lost = len(run.sent) - int(diag.get("frames_total", 0))

    def all_counted(kind: str) -> bool:
        sent = sent_by_counter.get(kind, 0)
        if kind in SUPERSEDABLE or (kind.startswith("image") and lost > 0):
            return counted[kind] <= sent
        return counted[kind] == sent

    samples = run.samples
    after = [s for s in samples if s["t"] >= warmup]
    rss_after = np.array([s["rss_mib"] for s in after]) if after else np.array([np.nan])
    window = max(1, len(after) // 10)
    growth = float(np.median(rss_after[-window:]) - np.median(rss_after[:window])) if after else None
    slope = None
    if len(after) >= 3:
        t = np.array([s["t"] for s in after]) / 60.0
        slope = float(np.polyfit(t, rss_after, 1)[0])

    def pct(values):
        ms = np.asarray(values, np.float64) * 1e3
        if not ms.size:
            return None
        return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
                "max": float(ms.max()), "n": int(ms.size)}

    good = [r for r in run.reloads if r["expected_success"]]
    bad = [r for r in run.reloads if not r["expected_success"]]
    plan_changes = sum(1 for a, b in zip(chunks, chunks[1:]) if a.chunk.plan_id != b.chunk.plan_id)
    load = os.getloadavg()
    return {
        "config": {"policy": policy, "duration_s": duration, "rate_hz": rate,
                   "reload_period_s": reload_period, "bad_plan_every": bad_every,
                   "malformed_per_s": malformed_per_s, "warmup_s": warmup,
                   "torch_threads": torch_threads},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                    "load_average_at_end": [round(x, 2) for x in load],
                    "python": platform.python_version(), "platform": platform.platform()},
        "crashes": {"node_alive_at_end": alive, "exit_code": exit_code,
                    "tracebacks": output.count("Traceback"), "errors": run.errors},
        # what the node printed last, when it died or raised: with faulthandler on in the node, a
        # native crash's thread stacks (the one soak failure so far came without them)
        "node_output_tail": output[-6000:] if exit_code != 0 or "Traceback" in output else "",
        "chunks": {"frames_sent": len(run.sent), "chunks_received": len(chunks),
                   "ratio": len(chunks) / max(len(run.sent), 1),
                   "node_frames_total": int(diag.get("frames_total", 0)),
                   "lost_before_node": lost,
                   "node_chunks_total": int(diag.get("chunks_total", 0)),
                   "node_frames_dropped_stale": int(diag.get("frames_dropped_total", 0)),
                   "node_frames_dropped_other": frame_drops,
                   "mixed_plan": len(mixed), "wrong_instruction": wrong_instruction,
                   "unknown_stamp": answered.count(-1),
                   "in_order": answered == sorted(answered),
                   "plan_changes_seen": plan_changes,
                   "by_plan": dict(collections.Counter(r.chunk.plan_id for r in chunks))},
        "malformed": {"sent": dict(run.malformed), "sent_by_counter": dict(sent_by_counter),
                      "counted_by_node": counted,
                      "all_counted": all(all_counted(k) for k in counted),
                      "superseded_before_node": {
                          k: sent_by_counter.get(k, 0) - counted[k] for k in SUPERSEDABLE},
                      "other_rejections": unexpected_rejections},
        "reloads": {"total": len(run.reloads), "good": len(good), "bad": len(bad),
                    "good_succeeded": sum(r["success"] for r in good),
                    "bad_refused": sum(not r["success"] for r in bad),
                    "inconsistent": [r for r in run.reloads if not r["consistent"]],
                    "latency_good_ms": pct([r["seconds"] for r in good]),
                    "latency_bad_ms": pct([r["seconds"] for r in bad]),
                    "node_reloads": int(diag.get("reloads", 0)),
                    "node_reloads_refused": int(diag.get("reloads_refused", 0)),
                    "log": run.reloads},
        "memory": {"rss_mib_start": samples[0]["rss_mib"] if samples else None,
                   "rss_mib_at_warmup_end": float(np.median(rss_after[:window])) if after else None,
                   "rss_mib_end": samples[-1]["rss_mib"] if samples else None,
                   "rss_mib_max": max(s["rss_mib"] for s in samples) if samples else None,
                   "growth_after_warmup_mib": growth, "slope_after_warmup_mib_per_min": slope,
                   "fds": [samples[0]["fds"], samples[-1]["fds"]] if samples else None,
                   "threads": [samples[0]["threads"], samples[-1]["threads"]] if samples else None,
                   "gpu": "none (CPU run)" if all(s["gpu_mib"] is None for s in samples)
                   else [s["gpu_mib"] for s in samples]},
        "samples": samples,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    t = np.array([s["t"] for s in samples])
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    axes[0].plot(t, [s["rss_mib"] for s in samples], label="node RSS")
    axes[0].axvline(result["config"]["warmup_s"], color="grey", ls=":", label="end of warm-up")
    axes[0].set_ylabel("MiB")
    axes[0].legend(loc="lower right")
    rates = np.diff([s["chunks"] for s in samples]) / np.maximum(np.diff(t), 1e-9)
    frames = np.diff([s["frames"] for s in samples]) / np.maximum(np.diff(t), 1e-9)
    axes[1].plot(t[1:], frames, label="frames sent /s")
    axes[1].plot(t[1:], rates, label="chunks received /s")
    axes[1].set_ylabel("per second")
    axes[1].legend(loc="lower right")
    for r in result["reloads"]["log"]:
        colour = "tab:green" if r["success"] else "tab:red"
        axes[2].scatter(r["t"], r["seconds"] * 1e3, color=colour, s=12)
    axes[2].set_ylabel("reload ms (green ok, red refused)")
    axes[2].set_xlabel("seconds")
    c = result["chunks"]
    fig.suptitle(f"soak: {result['config']['policy']} policy, {c['frames_sent']} frames, "
                 f"{c['chunks_received']} chunks, {c['mixed_plan']} mixed-plan, "
                 f"{result['reloads']['total']} reloads\n{result['machine']['cpu']}, load "
                 f"{result['machine']['load_average_at_end'][0]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of streaming")
    parser.add_argument("--policy", choices=("micro", "shipped"), default="shipped")
    parser.add_argument("--rate", type=float, default=30.0, help="camera frames per second")
    parser.add_argument("--reload-period", type=float, default=5.0)
    parser.add_argument("--bad-every", type=int, default=3, help="every n-th reload is a bad plan")
    parser.add_argument("--malformed-per-s", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds before memory growth is counted (default 30%% of the "
                             "duration, at most 120 s: the allocator settles after a few reloads)")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--label", default=None)
    args = parser.parse_args()
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.Random().randrange(150, 230)))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("PYTHONPATH", str(REPO))
    load_before = os.getloadavg()
    result = soak(args.duration, args.policy, args.rate, args.reload_period, args.bad_every,
                  args.malformed_per_s, args.warmup, args.torch_threads)
    result["machine"]["load_average_at_start"] = [round(x, 2) for x in load_before]
    args.out.mkdir(parents=True, exist_ok=True)
    label = args.label or f"{args.policy}_{int(args.duration)}s"
    (args.out / f"soak_{label}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / f"soak_{label}.png")
    short = {k: result[k] for k in ("crashes", "chunks", "malformed", "memory")}
    short["reloads"] = {k: v for k, v in result["reloads"].items() if k != "log"}
    print(json.dumps(short, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
