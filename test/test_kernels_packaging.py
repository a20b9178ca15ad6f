"""kernels/ reaches the package by one mapping, qvla_ros.kernels -> kernels/ (qvla_ros/__init__.py):
in a checkout the checkout's kernels are imported (not an installed copy), and nothing else of the
checkout's root becomes part of qvla_ros. Installs are checked by test_colcon_build.py."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PROBE = """
import importlib, json
import qvla_ros.kernels, qvla_ros.kernels.layout
out = {"kernels": qvla_ros.kernels.__file__, "layout": qvla_ros.kernels.layout.__file__, "importable": []}
for name in ("qvla_ros.bench", "qvla_ros.test", "qvla_ros.scripts"):
    try:
        importlib.import_module(name)
        out["importable"].append(name)
    except ImportError:
        pass
print(json.dumps(out))
"""


def test_the_checkout_imports_its_own_kernels_and_nothing_else_of_its_root():
    import json

    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["kernels"] == str(REPO / "kernels" / "__init__.py")
    assert found["layout"] == str(REPO / "kernels" / "layout.py")
    assert found["importable"] == []
