"""qvla_sim_bridge: puts the benchmark (qvla_ros.sim) on ROS topics, so a policy node closes the
loop through DDS exactly as it would on a robot.

The benchmark is parameter `suite` (qvla_ros/sim/benchmarks.py): the MetaWorld suite (default) or
LIBERO (`libero-object`, `libero-spatial`: two 224 px cameras, 8 proprio values, 7-d actions,
evaluation initial states 30-49).

For each episode (task x seed, the seeds of `qvla eval`): publish the instruction, then repeat
    publish the observation: proprio, image2, image, all with one stamp
    wait for the ActionChunk whose stamp is that observation's (and whose instruction is the
        episode's); if none comes within `chunk_timeout`, publish the observation again
    execute the chunk open-loop for `replan_steps` steps (0 = all of it)
until success or the step limit, then report the episode on `episode_result` and in the log.
The simulation waits for the policy (lock-step), so the outcome does not depend on how fast the
policy runs: the same seeds give the same episodes as `qvla eval` with one environment.

Topics (relative):
    image, image2      sensor_msgs/Image (rgb8, reliable)   the suite's two cameras
    proprio            sensor_msgs/JointState               MetaWorld: ee_x, ee_y, ee_z, gripper;
                                                            LIBERO: eef_x, eef_y, eef_z, eef_ax,
                                                            eef_ay, eef_az, finger_l, finger_r
    instruction        std_msgs/String (transient local)    the episode's instruction
    action_chunk       qvla_ros/ActionChunk (subscribed)
    episode_result     std_msgs/String, one JSON object per episode ("type": "episode") and one
                       at the end ("type": "summary"); transient local, so late readers get all
"""
from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np
import rclpy
from rcl_interfaces.msg import IntegerRange, ParameterDescriptor
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String

from qvla_ros.msg import ActionChunk
from qvla_ros.ros.image_conversion import array_to_image
from qvla_ros.ros.topics import (
    CHUNK_QOS,
    INSTRUCTION_QOS,
    RESULTS_QOS,
    SENSOR_PUBLISHER_QOS,
)

NODE_NAME = "qvla_sim_bridge"


class EpisodeStopped(Exception):
    """The node is shutting down in the middle of an episode."""


class SimBridge(Node):
    """See the module docstring."""

    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        # The simulator is imported when the first episode starts: MuJoCo, MetaWorld and LIBERO
        # take seconds.
        from qvla_ros.sim.benchmarks import DEFAULT_SUITE, SUITES, get_benchmark

        d = ParameterDescriptor
        # Unset (or 0) means "as `qvla eval` does", so the two cannot drift apart.
        self.declare_parameter("suite", DEFAULT_SUITE, d(
            description=f"benchmark: {', '.join(SUITES)}", read_only=True))
        self.declare_parameter("tasks", Parameter.Type.STRING_ARRAY, d(
            description="suite tasks to run, in order; unset = the whole suite", read_only=True))
        self.declare_parameter("episodes_per_task", 1, d(
            description="episodes of each task", read_only=True,
            integer_range=[IntegerRange(from_value=1, to_value=100000, step=1)]))
        self.declare_parameter("seed_offset", 0, d(
            description="held-out seed block, as `qvla eval --seed-offset`", read_only=True,
            integer_range=[IntegerRange(from_value=0, to_value=2**31 - 1, step=1)]))
        self.declare_parameter("replan_steps", 0, d(
            description="actions executed from each chunk before asking again; 0 = the whole chunk",
            read_only=True, integer_range=[IntegerRange(from_value=0, to_value=10000, step=1)]))
        self.declare_parameter("max_steps", 0, d(
            description="steps after which an episode counts as failed; 0 = the suite's",
            read_only=True, integer_range=[IntegerRange(from_value=0, to_value=10000, step=1)]))
        self.declare_parameter("image_size", 0, d(
            description="side of the square camera images in pixels; 0 = the suite's",
            read_only=True, integer_range=[IntegerRange(from_value=0, to_value=1024, step=1)]))
        self.declare_parameter("cameras", Parameter.Type.STRING_ARRAY, d(
            description="MuJoCo cameras published as image, image2; unset = the suite's",
            read_only=True))
        self.declare_parameter("chunk_timeout", 5.0, d(
            description="seconds to wait for a chunk before publishing the observation again",
            read_only=True))
        self.declare_parameter("start_timeout", 120.0, d(
            description="seconds to wait for a policy node before giving up", read_only=True))
        self.declare_parameter("exit_when_done", True, d(
            description="end the process after the last episode", read_only=True))

        # get_parameter_or: a typed parameter nobody set reads as None.
        p = lambda name: self.get_parameter_or(name).value  # noqa: E731
        self.bench = get_benchmark(p("suite"))
        self.tasks = self.bench.resolve_tasks(list(p("tasks")) if p("tasks") else None)
        self.episodes_per_task = p("episodes_per_task")
        self.seed_offset = p("seed_offset")
        # Every episode's seed exists before anything starts (LIBERO has 20 evaluation states).
        for episode in range(self.episodes_per_task):
            self.bench.eval_seed(episode, self.seed_offset)
        self.replan_steps = p("replan_steps")
        self.max_steps = p("max_steps") or self.bench.max_steps
        self.image_size = p("image_size") or self.bench.image_size
        self.cameras = tuple(p("cameras") or self.bench.cameras)
        self.chunk_timeout = p("chunk_timeout")
        self.start_timeout = p("start_timeout")
        self.exit_when_done = p("exit_when_done")
        if not 1 <= len(self.cameras) <= 2:
            raise ValueError(f"cameras: one or two are published (image, image2), got "
                             f"{list(self.cameras)}")

        topics = ("image", "image2")[: len(self.cameras)]
        self.image_pubs = [self.create_publisher(Image, t, SENSOR_PUBLISHER_QOS) for t in topics]
        self.proprio_pub = self.create_publisher(JointState, "proprio", SENSOR_PUBLISHER_QOS)
        self.instruction_pub = self.create_publisher(String, "instruction", INSTRUCTION_QOS)
        self.result_pub = self.create_publisher(String, "episode_result", RESULTS_QOS)
        self.create_subscription(ActionChunk, "action_chunk", self._on_chunk, CHUNK_QOS)

        self._cond = threading.Condition()
        self._chunks: list[ActionChunk] = []
        self._stop = threading.Event()
        self.done = threading.Event()
        self.failed = False
        self._images = [Image() for _ in topics]  # reused: array_to_image refills them
        self._thread = threading.Thread(target=self._run_all, name="qvla-sim", daemon=True)
        self._thread.start()

    def _on_chunk(self, msg: ActionChunk) -> None:
        with self._cond:
            self._chunks.append(msg)
            self._cond.notify_all()

    # The episodes -------------------------------------------------------------------------------
    def _run_all(self) -> None:
        try:
            # The first task's simulator is built while the policy node starts (a LIBERO scene
            # takes ~10 s on CPU, about what a node takes to load its policy).
            first = self._make_env(self.tasks[0])
            try:
                self._wait_for_policy()
            except BaseException:
                first.close()
                raise
            self._run_episodes(first)
        except EpisodeStopped:
            pass
        except Exception as exc:  # report, then end: a broken simulator cannot be served around
            self.failed = True
            self.get_logger().error(f"simulation stopped: {type(exc).__name__}: {exc}")
        finally:
            self.done.set()

    def _wait_for_policy(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        self.get_logger().info("waiting for a policy node on image/action_chunk")
        while not self._stop.is_set():
            if (self.image_pubs[0].get_subscription_count() > 0
                    and self.count_publishers("action_chunk") > 0):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"no policy node subscribed to "
                                   f"{self.image_pubs[0].topic_name} within {self.start_timeout} s")
            time.sleep(0.05)
        raise EpisodeStopped

    def _make_env(self, task):
        return self.bench.make_env(task.name, image_size=self.image_size, cameras=self.cameras,
                                   max_steps=self.max_steps)

    def _run_episodes(self, first_env) -> None:
        total = len(self.tasks) * self.episodes_per_task
        results = []
        start = time.monotonic()
        for i, task in enumerate(self.tasks):
            with (first_env if i == 0 else self._make_env(task)) as env:
                for episode in range(self.episodes_per_task):
                    seed = self.bench.eval_seed(episode, self.seed_offset)
                    result = self._run_episode(env, seed)
                    result.update(type="episode", index=len(results), total=total)
                    results.append(result)
                    self.result_pub.publish(String(data=json.dumps(result)))
                    self.get_logger().info(
                        f"episode {len(results)}/{total} {task.name} seed {seed}: "
                        f"{'success' if result['success'] else 'failure'} in {result['steps']} "
                        f"steps, {result['chunks']} chunks from plan(s) "
                        f"{', '.join(p or 'full precision' for p in result['plan_ids'])}; "
                        f"round trip p50 {result['round_trip_ms_p50']:.1f} ms")
        summary = _summarize(results, time.monotonic() - start)
        self.result_pub.publish(String(data=json.dumps(summary)))
        self.get_logger().info(
            f"done: {summary['successes']}/{summary['episodes']} episodes succeeded "
            f"({100 * summary['success_rate']:.0f}%); round trip p50 "
            f"{summary['round_trip_ms_p50']:.1f} ms, p99 {summary['round_trip_ms_p99']:.1f} ms")

    def _run_episode(self, env, seed: int) -> dict:
        obs = env.reset(seed)
        instruction = obs["instruction"]
        self.instruction_pub.publish(String(data=instruction))
        chunks, plan_ids, round_trips, latencies, inference = 0, [], [], [], []
        success = False
        while True:
            chunk, round_trip = self._request(obs, instruction)
            chunks += 1
            if chunk.plan_id not in plan_ids:
                plan_ids.append(chunk.plan_id)
            if chunk.action_dim != self.bench.action_dim:
                raise ValueError(f"chunk of {chunk.action_dim}-d actions; {self.bench.name} takes "
                                 f"{self.bench.action_dim} ({self.bench.action_text})")
            round_trips.append(round_trip)
            latencies.append(chunk.latency)
            inference.append(chunk.inference_time)
            actions = np.asarray(chunk.actions, np.float32).reshape(chunk.horizon,
                                                                    chunk.action_dim)
            keep = len(actions) if not self.replan_steps else min(self.replan_steps,
                                                                   len(actions))
            for t in range(keep):
                # Render only the observation the policy will read (the last of the chunk).
                obs, success = env.step(actions[t], render=t == keep - 1)
                if success or env.done_by_time:
                    break
            if success or env.done_by_time:
                break
        return {"task": env.task.name, "seed": seed, "success": bool(success),
                "steps": env.steps, "chunks": chunks, "plan_ids": plan_ids,
                "suite": self.bench.name, "action_shape": [int(chunk.horizon), int(chunk.action_dim)],
                "instruction": instruction,
                "round_trip_ms_p50": _ms(round_trips, 50), "round_trip_ms_p99": _ms(round_trips, 99),
                "node_latency_ms_p50": _ms(latencies, 50),
                "inference_ms_p50": _ms(inference, 50), "inference_ms_p99": _ms(inference, 99),
                "round_trips_ms": [round(1e3 * r, 3) for r in round_trips]}

    def _request(self, obs: dict, instruction: str) -> tuple[ActionChunk, float]:
        """Publish `obs` and return the chunk that answers it, with the round-trip time."""
        while True:
            if self._stop.is_set():
                raise EpisodeStopped
            stamp = self.get_clock().now().to_msg()
            with self._cond:
                self._chunks.clear()
            sent = time.monotonic()
            self._publish(obs, stamp)
            deadline = sent + self.chunk_timeout
            with self._cond:
                answer = self._answer(stamp)
                while answer is None and not self._stop.is_set():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                    answer = self._answer(stamp)
            if answer is not None and answer.instruction == instruction:
                return answer, time.monotonic() - sent
            if answer is not None:
                # The node computed it before the episode's instruction reached it: ask again.
                self.get_logger().info(f"chunk answered {answer.instruction!r}, not "
                                       f"{instruction!r}; publishing the observation again")
            elif not self._stop.is_set():
                self.get_logger().warning(f"no chunk within {self.chunk_timeout} s; publishing "
                                          f"the observation again")

    def _answer(self, stamp) -> ActionChunk | None:
        """The chunk received for the observation stamped `stamp` (older ones are ignored)."""
        for chunk in self._chunks:
            s = chunk.header.stamp
            if (s.sec, s.nanosec) == (stamp.sec, stamp.nanosec):
                return chunk
        return None

    def _publish(self, obs: dict, stamp) -> None:
        proprio = JointState()
        proprio.header.stamp = stamp
        proprio.name = list(self.bench.proprio_names)
        proprio.position = [float(v) for v in obs["proprio"]]
        self.proprio_pub.publish(proprio)
        # The first camera last: its arrival is what makes the policy node run.
        for cam in range(len(self.image_pubs) - 1, -1, -1):
            msg = array_to_image(obs["images"][cam], "rgb8", msg=self._images[cam])
            msg.header.stamp = stamp
            msg.header.frame_id = self.cameras[cam]
            self.image_pubs[cam].publish(msg)

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=10.0)


def _ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds) * 1e3, q)) if seconds else float("nan")


def _summarize(results: list[dict], wall_s: float) -> dict:
    per_task: dict[str, list[int]] = {}
    for r in results:
        per_task.setdefault(r["task"], []).append(int(r["success"]))
    round_trips = [ms / 1e3 for r in results for ms in r["round_trips_ms"]]
    successes = sum(int(r["success"]) for r in results)
    return {"type": "summary", "episodes": len(results), "successes": successes,
            "success_rate": successes / len(results) if results else 0.0,
            "per_task": {t: sum(v) / len(v) for t, v in per_task.items()},
            "round_trip_ms_p50": _ms(round_trips, 50), "round_trip_ms_p99": _ms(round_trips, 99),
            "wall_s": wall_s}


def main(args: list[str] | None = None) -> int:
    rclpy.init(args=args if args is not None else sys.argv)
    node = executor = None
    code = 0
    try:
        executor = SingleThreadedExecutor()
        node = SimBridge()
        executor.add_node(node)
        while rclpy.ok() and not (node.done.is_set() and node.exit_when_done):
            executor.spin_once(timeout_sec=0.1)
        # Let the last results reach their readers before the publisher goes away.
        linger = time.monotonic() + 1.0
        while rclpy.ok() and time.monotonic() < linger:
            executor.spin_once(timeout_sec=0.1)
    except ValueError as exc:
        rclpy.logging.get_logger(NODE_NAME).fatal(f"cannot start: {exc}")
        code = 1
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.stop()
            code = code or (1 if node.failed else 0)
        if executor is not None:
            executor.shutdown()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
