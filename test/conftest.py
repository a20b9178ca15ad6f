"""Shared fixtures. Every test that touches ROS gets its own ROS_DOMAIN_ID and log folder, so
tests never see each other's DDS traffic and nothing lands in the home folder."""
import itertools
import os
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Domains 1..100 (0 is everyone's default). Start at a random point so two test runs on one
# machine are unlikely to meet, then hand out a fresh domain per test.
_domains = itertools.count(random.Random(os.getpid()).randrange(100))


def _next_domain() -> int:
    return 1 + next(_domains) % 100


@pytest.fixture
def ros_env(tmp_path, monkeypatch):
    """Environment for ROS processes of one test: own domain, logs and ROS_HOME under tmp_path,
    discovery on this machine only. Applied to this process too (for in-process rclpy) and
    returned as a dict for subprocesses."""
    env = {
        "ROS_DOMAIN_ID": str(_next_domain()),
        "ROS_HOME": str(tmp_path / "ros_home"),
        "ROS_LOG_DIR": str(tmp_path / "ros_log"),
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
        "RMW_IMPLEMENTATION": "rmw_fastrtps_cpp",
        "PYTHONUNBUFFERED": "1",
        # Subprocesses import this checkout, exactly as the test process does.
        "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
    }
    # The transport the nodes ship with (config/fastdds_large_frames.xml), as the harness, the
    # launch files and `qvla demo` set it.
    from qvla_ros.ros.transport import transport_environment
    env.update(transport_environment({**os.environ, **env}))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    full = dict(os.environ)
    full.update(env)
    return full


@pytest.fixture
def feeder(ros_env):
    """A Feeder (qvla_ros/ros/feeder.py) spinning in the background in this process, on the
    test's ROS domain; a test file that needs more of it defines its own `feeder`."""
    import rclpy

    from qvla_ros.ros.feeder import Feeder

    rclpy.init()
    node = Feeder().spin_in_background()
    yield node
    node.close()
    rclpy.try_shutdown()


@pytest.fixture
def python_exe() -> str:
    return sys.executable
