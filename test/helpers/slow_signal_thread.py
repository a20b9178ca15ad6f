"""qvla_policy_node's main(), run `rounds` times (argv[1]; the rest are its ROS arguments), on one
CPU and with the threads rclpy.init() starts (the one that handles SIGINT/SIGTERM, and a log
flusher) at idle priority. At a SIGINT, that thread wakes the executor, and the main thread, woken,
always takes the CPU from it: the signal thread is still in the middle of its work while the node
shuts down. A loaded machine does this now and then; here it happens at every stop.

The test sends SIGINT each time the node says it is ready; the exit code is main()'s, or the
signal that killed the process."""
import os
import sys

# Before any thread starts: every thread of the process inherits it.
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import rclpy  # noqa: E402

from qvla_ros.ros import policy_node  # noqa: E402

_rclpy_init = rclpy.init


def _tasks() -> set[int]:
    return {int(tid) for tid in os.listdir("/proc/self/task")}


def init_with_slow_signal_thread(*args, **kwargs):
    before = _tasks()
    _rclpy_init(*args, **kwargs)
    for tid in _tasks() - before:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))


if __name__ == "__main__":
    rounds, ros_args = int(sys.argv[1]), sys.argv[2:]
    rclpy.init = init_with_slow_signal_thread  # policy_node calls rclpy.init() through the module
    for _ in range(rounds):
        code = policy_node.main([sys.argv[0]] + ros_args)
        if code:
            sys.exit(code)
    print(f"stopped cleanly {rounds} times", flush=True)
