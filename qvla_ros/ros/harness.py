"""Run the nodes as separate processes, the way `ros2 launch` does, and talk to them over DDS.

Used by `qvla demo`, the tests and the benchmarks, so all three start the same executables with
the same parameter files as launch/*.launch.py:

    proc = NodeProcess.start("qvla_policy_node", params_files=[config_file("policy_node.yaml")],
                             overrides={"plan": path}, env=env)
    proc.wait_for("ready: serving")
    ...
    proc.stop()
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from qvla_ros.ros.transport import apply_transport

EXECUTABLES = {
    "qvla_policy_node": "qvla_ros.ros.policy_node",
    "qvla_managed_policy_node": "qvla_ros.ros.managed_policy_node",
    "qvla_sim_bridge": "qvla_ros.ros.sim_bridge",
}


def executable_command(name: str) -> list[str]:
    """The installed console script beside this interpreter (what `ros2 run` would start), or
    `python -m <module>` where it is not installed."""
    if name not in EXECUTABLES:
        raise ValueError(f"unknown executable {name!r}; known: {', '.join(EXECUTABLES)}")
    script = Path(sys.executable).parent / name
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which(name)
    if found and Path(found).resolve().parent == Path(sys.executable).resolve().parent:
        return [found]
    return [sys.executable, "-m", EXECUTABLES[name]]


def ros_arguments(params_files: Iterable[str] = (), overrides: Mapping[str, object] | None = None,
                  remaps: Mapping[str, str] | None = None) -> list[str]:
    """`--ros-args` for parameter files (later ones win), `-p name:=value` overrides (they win
    over files) and `-r from:=to` remappings. Values are written as JSON, which is YAML."""
    args = ["--ros-args"]
    for path in params_files:
        args += ["--params-file", str(path)]
    for name, value in (overrides or {}).items():
        args += ["-p", f"{name}:={json.dumps(value)}"]
    for source, target in (remaps or {}).items():
        args += ["-r", f"{source}:={target}"]
    return args


class NodeProcess:
    """A node in its own process; its output (stdout + stderr) is collected line by line."""

    def __init__(self, popen: subprocess.Popen, name: str, echo: bool = False):
        self.popen = popen
        self.name = name
        self.echo = echo
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, executable: str, params_files: Iterable[str] = (),
              overrides: Mapping[str, object] | None = None,
              remaps: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None,
              echo: bool = False) -> "NodeProcess":
        command = executable_command(executable) + ros_arguments(params_files, overrides, remaps)
        env = dict(os.environ if env is None else env)
        # The shipped DDS transport profile (large camera frames), unless the caller chose one.
        apply_transport(env)
        # The node imports the same qvla_ros as its caller (a source checkout or an install).
        package_root = str(Path(__file__).resolve().parents[2])
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if package_root not in paths:
            env["PYTHONPATH"] = os.pathsep.join([package_root] + paths)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # Log lines as the console shows them, without colour codes, for wait_for().
        env.setdefault("RCUTILS_COLORIZED_OUTPUT", "0")
        popen = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, bufsize=1)
        return cls(popen, executable, echo=echo)

    def _read(self) -> None:
        for line in self.popen.stdout:
            line = line.rstrip("\n")
            if self.echo:
                print(f"[{self.name}] {line}", flush=True)
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 60.0, start: int = 0) -> str:
        """The first output line from index `start` on that matches the regular expression
        `pattern`; TimeoutError (with the output) if none comes, RuntimeError if the process
        ends first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = start
        with self._cond:
            while True:
                while index < len(self.lines):
                    if regex.search(self.lines[index]):
                        return self.lines[index]
                    index += 1
                if self.popen.poll() is not None and not self._reader.is_alive():
                    raise RuntimeError(f"{self.name} exited with code {self.popen.returncode} "
                                       f"before printing /{pattern}/:\n{self.output_unlocked()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self.name} printed no /{pattern}/ within {timeout} s:\n"
                                       f"{self.output_unlocked()}")
                self._cond.wait(min(remaining, 0.2))

    def output_unlocked(self) -> str:
        return "\n".join(self.lines[-80:])

    def stop(self, timeout: float = 30.0) -> int:
        """SIGINT (a clean ROS shutdown), then SIGKILL if it does not end in `timeout`."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._reader.join(timeout=5.0)
        return self.popen.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
