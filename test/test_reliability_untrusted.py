"""Untrusted files: plans and checkpoints come from other machines and people, so reading one must
never run code (no pickle on any load path) and sizes are checked before memory is allocated.

The first test scans the library's source (qvla_ros/, kernels/, scripts/) for deserializers
that can run code: pickle/marshal/shelve/dill/joblib loads, torch.load without weights_only=True,
numpy.load without allow_pickle=False, yaml.load without a safe loader. Each exception is listed
here with why it is no load path for outside files; a new one fails the test.
"""
import ast
import json
import struct
import time
from pathlib import Path

import pytest

from qvla_ros.policy import CheckpointError, load_policy, make_policy
from qvla_ros.quant.plan import MAX_PLAN_BYTES, BitPlan, PlanError

REPO = Path(__file__).resolve().parent.parent
SOURCES = ["qvla_ros", "kernels", "scripts"]

# (file, function call) -> why it is allowed. Keep this list short and honest. It is empty: the
# last entry (`qvla compare` unpickling its own cached policies) went when that cache became
# safetensors + JSON (now the one quantized-checkpoint format, quant/checkpoint.py).
ALLOWED: dict[tuple[str, str], str] = {}
UNSAFE_MODULE_CALLS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"),
                       ("marshal", "load"), ("marshal", "loads"), ("shelve", "open"),
                       ("dill", "load"), ("dill", "loads"), ("joblib", "load"),
                       ("cloudpickle", "load"), ("cloudpickle", "loads")}


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_calls(path: Path) -> list[tuple[str, int, str]]:
    """(call, line, why) for each deserialization in `path` that can run code."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        parts = tuple(name.rsplit(".", 1)) if "." in name else ("", name)
        if parts in UNSAFE_MODULE_CALLS:
            found.append((name, node.lineno, "runs code from the file"))
        elif name == "torch.load" and not _is_const(_keyword(node, "weights_only"), True):
            found.append((name, node.lineno, "torch.load without weights_only=True unpickles"))
        elif name in ("np.load", "numpy.load") and _is_const(_keyword(node, "allow_pickle"), True):
            found.append((name, node.lineno, "numpy.load with allow_pickle=True"))
        elif name == "yaml.load":
            loader = _dotted(_keyword(node, "Loader")) if _keyword(node, "Loader") else ""
            if not loader.endswith(("SafeLoader", "CSafeLoader")):
                found.append((name, node.lineno, "yaml.load without a safe loader"))
        elif name in ("yaml.unsafe_load", "yaml.full_load"):
            found.append((name, node.lineno, "yaml loader that builds objects"))
    return found


def test_no_code_running_deserializer_on_any_load_path():
    files = [p for root in SOURCES for p in (REPO / root).rglob("*.py")]
    assert len(files) > 20
    offending, allowed_seen = [], set()
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        for call, line, why in unsafe_calls(path):
            if (rel, call) in ALLOWED:
                allowed_seen.add((rel, call))
            else:
                offending.append(f"{rel}:{line}: {call}: {why}")
    assert not offending, "\n".join(offending)
    # An exception that no longer exists is removed from the list (it must not linger).
    assert allowed_seen == set(ALLOWED), set(ALLOWED) - allowed_seen


def test_the_scan_recognises_each_unsafe_form(tmp_path):
    """The scanner itself, on code written to be caught (and code that must pass)."""
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle, torch, yaml, numpy as np\n"
                   "pickle.loads(b'')\ntorch.load('x')\ntorch.load('x', weights_only=False)\n"
                   "np.load('x', allow_pickle=True)\nyaml.load('a')\nyaml.unsafe_load('a')\n")
    assert [c for c, _, _ in unsafe_calls(bad)] == [
        "pickle.loads", "torch.load", "torch.load", "np.load", "yaml.load", "yaml.unsafe_load"]
    good = tmp_path / "good.py"
    good.write_text("import torch, yaml, numpy as np\ntorch.load('x', weights_only=True)\n"
                    "np.load('x', allow_pickle=False)\nyaml.load('a', Loader=yaml.SafeLoader)\n"
                    "yaml.safe_load('a')\n")
    assert unsafe_calls(good) == []


def test_an_oversized_plan_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "huge.json"
    with open(path, "wb") as fh:  # sparse: the size is real, the disk is not used
        fh.truncate(MAX_PLAN_BYTES + 1)
    start = time.perf_counter()
    with pytest.raises(PlanError, match="larger than any bit plan"):
        BitPlan.load(path)
    assert time.perf_counter() - start < 5  # refused from the size, not after reading 256 MiB


def test_a_safetensors_header_claiming_huge_sizes_is_refused(tmp_path):
    directory = make_policy("micro", seed=0).save_pretrained(tmp_path / "ckpt")
    weights = directory / "model.safetensors"
    raw = weights.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    # A header length far past the file, then a tensor whose offsets claim 2**40 bytes.
    weights.write_bytes(struct.pack("<Q", 2 ** 40) + raw[8:])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_policy(directory)
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] = 2 ** 40
    text = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    with pytest.raises(CheckpointError):
        load_policy(directory)
