"""Runs a test module as a script under Triton's CPU interpreter, in a subprocess.

TRITON_INTERPRET is read when triton is imported, so a module that wants interpreted kernels
runs in a fresh interpreter; its __main__ prints one JSON line of results last.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_interpreted(script: str | os.PathLike, *args: str, timeout: float = 600) -> dict:
    """The last stdout line of `python script *args` under TRITON_INTERPRET=1, parsed as JSON."""
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
