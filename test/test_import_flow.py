"""The flow one way: every module under qvla_ros/ (and kernels/, installed as qvla_ros.kernels)
imports only from its own layer or the layers below it, function-level imports included.

Layers, bottom to top (an import may only point down or sideways):

    0  qvla_ros, io, dataset            package root, atomic writes, the demonstration file format
    1  qvla_ros.policy                  the model: never knows it is quantized or simulated
    2  qvla_ros.kernels                 mixed-bit GEMMs the quantized layers call
    3  qvla_ros.quant                   sensitivity, allocation, plans, packing, quantize
    4  qvla_ros.quant.baselines         RTN/GPTQ/AWQ/SmoothQuant behind QVLA's interface
    5  qvla_ros.sim                     benchmark, demonstrations, closed-loop evaluation of a policy
    6  qvla_ros.ros (+ msg, srv)        the nodes
    7  qvla_ros.cli, every */commands.py  the verbs: wiring stages together is their job

The pipeline's data run sim (demonstrations) -> policy -> quant -> kernels -> ros; the imports
differ where a stage consumes another's code: evaluation (sim) runs policies, so sim sits above
policy and quant, and quant calls the kernels, so kernels sit below quant.

A violation not in ALLOWED fails; so does an ALLOWED entry that no longer occurs (remove it).
Run as a script to list every upward import: `python test/test_import_flow.py`.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: (module prefix, rank); the longest matching prefix decides
LAYERS = (
    ("qvla_ros", 0), ("qvla_ros.io", 0), ("qvla_ros.dataset", 0),
    ("qvla_ros.policy", 1),
    ("qvla_ros.kernels", 2),
    ("qvla_ros.quant", 3),
    ("qvla_ros.quant.baselines", 4),
    ("qvla_ros.sim", 5),
    ("qvla_ros.ros", 6), ("qvla_ros.msg", 6), ("qvla_ros.srv", 6),
    ("qvla_ros.cli", 7),
)
#: the verb modules (policy/commands.py, quant/commands.py, ...) wire stages together: layer 7
VERBS = "commands"

#: known upward imports, (importer, imported) -> why it is still there
ALLOWED = {
    ("qvla_ros.quant.baselines.compare", "qvla_ros.sim.metrics"):
        "the comparison harness scores offline action error with sim's metric; an evaluation driver",
    ("qvla_ros.quant.baselines.compare", "qvla_ros.sim.evaluate"):
        "the comparison harness runs closed-loop evaluation; it is an evaluation driver kept in quant/",
    ("qvla_ros.quant.baselines.compare", "qvla_ros.sim.suite"):
        "the comparison harness names the benchmark's tasks; an evaluation driver kept in quant/",
    ("qvla_ros.kernels.testing", "qvla_ros.quant.packing"):
        "test helper: builds kernel inputs from the one packer (tests and bench use it, not the runtime)",
    ("qvla_ros.kernels.testing", "qvla_ros.quant.quantizer"):
        "test helper: the oracle quantizes activations with the one quantizer (tests and bench only)",
}


def rank(module: str) -> int:
    if module.rsplit(".", 1)[-1] == VERBS:
        return 7
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return dict(LAYERS)[best]


def _modules():
    for path in sorted((ROOT / "qvla_ros").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield path, ".".join(parts), path.name == "__init__.py"
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        parts = ("qvla_ros",) + path.relative_to(ROOT).with_suffix("").parts
        yield path, ".".join(parts), path.name == "__init__.py"


def imports(path: Path, module: str, is_package: bool):
    """(line, imported module) for every qvla_ros import in the file, at any depth; also
    importlib.import_module("qvla_ros....") with a literal name."""
    if is_package:
        module = module.rsplit(".__init__", 1)[0]
    package = module if is_package else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = ".".join(base[: len(base) - (node.level - 1)])
                if node.module:
                    names = [f"{base}.{node.module}"]
                else:  # from . import x: x may be a module
                    names = [f"{base}.{a.name}" for a in node.names]
            else:
                names = [node.module]
                names += [f"{node.module}.{a.name}" for a in node.names if node.module.startswith("qvla_ros")]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        for name in names:
            if name == "qvla_ros" or name.startswith("qvla_ros."):
                yield node.lineno, name


def _module_names() -> set[str]:
    return {m.rsplit(".__init__", 1)[0] for _, m, _ in _modules()} | {"qvla_ros.msg", "qvla_ros.srv"}


def violations() -> dict[tuple[str, str], list[str]]:
    """(importer, imported) -> ["path:line", ...] for every import that points up."""
    known = _module_names()
    found: dict[tuple[str, str], list[str]] = {}
    for path, module, is_package in _modules():
        importer = module.rsplit(".__init__", 1)[0]
        for line, name in imports(path, module, is_package):
            # `from pkg import name`: keep the name only where it is a module
            target = name if name in known else name.rsplit(".", 1)[0] if name.rsplit(".", 1)[0] in known else name
            where = f"{path.relative_to(ROOT)}:{line}"
            if rank(target) > rank(importer) and where not in found.get((importer, target), []):
                found.setdefault((importer, target), []).append(where)
    return found


def test_no_upward_import_outside_the_allow_list():
    new = {k: v for k, v in violations().items() if k not in ALLOWED}
    assert not new, "imports against the flow (fix them, or allow-list with a reason):\n" + "\n".join(
        f"  {a} -> {b}  ({', '.join(where)})" for (a, b), where in sorted(new.items()))


def test_the_allow_list_has_no_stale_entries():
    stale = sorted(set(ALLOWED) - set(violations()))
    assert not stale, f"no longer imported upward, remove from ALLOWED: {stale}"


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("from .x import y\n\ndef f():\n    from ..sim.suite import TASKS\n"
                      "    import importlib\n    importlib.import_module('qvla_ros.ros.demo')\n")
    found = [name for _, name in imports(source, "qvla_ros.policy.mod", False)]
    assert found == ["qvla_ros.policy.x", "qvla_ros.sim.suite", "qvla_ros.ros.demo"]
    assert rank("qvla_ros.sim.suite") > rank("qvla_ros.policy.mod") > rank("qvla_ros.io")
    assert rank("qvla_ros.quant.baselines.commands") == rank("qvla_ros.cli") > rank("qvla_ros.ros.demo")


if __name__ == "__main__":
    for (a, b), where in sorted(violations().items()):
        print(f"{a} -> {b}  {'ALLOWED: ' + ALLOWED[(a, b)] if (a, b) in ALLOWED else 'NEW'}  {', '.join(where)}")
