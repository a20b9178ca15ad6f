"""The DDS transport the nodes run with: config/fastdds_large_frames.xml, a Fast DDS profile
under which best-effort camera frames larger than ~512 KiB are delivered between processes on
one host (with Fast DDS's builtin transports they are not; see that file and
bench/ros/large_frames.json).

The variable is read by each process when it creates its first DDS participant, so it has to be
in the environment BEFORE rclpy.init(): the launch files put it in each node's environment,
`qvla demo`, the test harness and the benchmarks in their own and their children's. A user's own
choice (any of the variables below already set) is left alone. No rclpy import here: conftest
and the launch files use this module.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

PROFILE = "fastdds_large_frames.xml"
PROFILE_VARIABLES = ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE")
TRANSPORT_VARIABLES = PROFILE_VARIABLES + ("FASTDDS_BUILTIN_TRANSPORTS",)


def profile_path() -> str:
    """Absolute path of the shipped profile (source checkout or install)."""
    from qvla_ros.ros.paths import config_file

    return config_file(PROFILE)


def uses_fastdds(env: Mapping[str, str]) -> bool:
    return env.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp") in ("", "rmw_fastrtps_cpp",
                                                                 "rmw_fastrtps_dynamic_cpp")


def transport_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables to add to `env` (default: os.environ) so that a process started with it
    uses the shipped profile: {} when the RMW is not Fast DDS or the user chose a transport."""
    env = os.environ if env is None else env
    if not uses_fastdds(env) or any(env.get(v) for v in TRANSPORT_VARIABLES):
        return {}
    return {"FASTDDS_DEFAULT_PROFILES_FILE": profile_path()}


def apply_transport(env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """transport_environment(env) written into `env` (default: os.environ); returns env."""
    env = os.environ if env is None else env
    env.update(transport_environment(env))
    return env


def describe_transport(env: Mapping[str, str] | None = None) -> str:
    """One phrase for log lines: which DDS transport configuration this process runs with."""
    env = os.environ if env is None else env
    rmw = env.get("RMW_IMPLEMENTATION") or "rmw_fastrtps_cpp"
    if not uses_fastdds(env):
        return f"{rmw} (its own transport settings)"
    for name in PROFILE_VARIABLES:
        if env.get(name):
            shipped = os.path.basename(env[name]) == PROFILE
            return (f"Fast DDS profile {env[name]}"
                    + (" (shared memory, 32 MiB segments + UDPv4)" if shipped else ""))
    if env.get("FASTDDS_BUILTIN_TRANSPORTS"):
        return f"Fast DDS builtin transports {env['FASTDDS_BUILTIN_TRANSPORTS']}"
    return ("Fast DDS builtin transports (UDPv4 + shared memory with 512 KiB segments: "
            "best-effort messages over ~512 KiB are not delivered)")
