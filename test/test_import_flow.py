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

Any upward import fails, and so does any import circle between modules of the package (a module
that, through its imports at any depth, imports itself), function-level imports included: a lazy
import only hides a circle until the function runs. Run as a script to list both:
`python test/test_import_flow.py`.
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

def rank(module: str) -> int:
    if module.rsplit(".", 1)[-1] == VERBS:
        return 7
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return dict(LAYERS)[best]


def _modules(root: Path = ROOT):
    for path in sorted((root / "qvla_ros").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        yield path, ".".join(parts), path.name == "__init__.py"
    for path in sorted((root / "kernels").rglob("*.py")):
        parts = ("qvla_ros",) + path.relative_to(root).with_suffix("").parts
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


def _module_names(root: Path = ROOT) -> set[str]:
    return {m.rsplit(".__init__", 1)[0] for _, m, _ in _modules(root)} | {"qvla_ros.msg", "qvla_ros.srv"}


def import_edges(root: Path = ROOT) -> dict[tuple[str, str], list[str]]:
    """(importer, imported module) -> ["path:line", ...] for every import between modules of the
    package (a module importing itself, or its own name through `from . import`, is left out)."""
    known = _module_names(root)
    found: dict[tuple[str, str], list[str]] = {}
    for path, module, is_package in _modules(root):
        importer = module.rsplit(".__init__", 1)[0]
        for line, name in imports(path, module, is_package):
            # `from pkg import name`: keep the name only where it is a module
            parent = name.rsplit(".", 1)[0]
            target = name if name in known else parent if parent in known else name
            where = f"{path.relative_to(root)}:{line}"
            if target != importer and where not in found.get((importer, target), []):
                found.setdefault((importer, target), []).append(where)
    return found


def violations(root: Path = ROOT) -> dict[tuple[str, str], list[str]]:
    """(importer, imported) -> ["path:line", ...] for every import that points up."""
    return {(a, b): where for (a, b), where in import_edges(root).items() if rank(b) > rank(a)}


def cycles(root: Path = ROOT) -> list[list[str]]:
    """Every import circle, one per set of modules that import each other (a strongly connected
    component of the import graph), as the path [m0, m1, ..., m0] that closes it."""
    graph: dict[str, set[str]] = {}
    for a, b in import_edges(root):
        graph.setdefault(a, set()).add(b)
    # Tarjan's algorithm, iterative (the package's import chains are deeper than is safe to recurse)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    return [_closing_path(graph, component) for component in components]


def _closing_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component."""
    first = min(component)
    came_from: dict[str, str] = {}
    frontier = [first]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child == first:  # node closes the circle: walk back to first
                    back = [node]
                    while back[-1] != first:
                        back.append(came_from[back[-1]])
                    return back[::-1] + [first]
                if child in component and child not in came_from:
                    came_from[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{sorted(component)} is not a cycle")


def _where(edges, path: list[str]) -> str:
    return ", ".join(f"{a} -> {b} ({edges[(a, b)][0]})" for a, b in zip(path, path[1:]))


def test_no_upward_import():
    found = violations()
    assert not found, "imports against the flow:\n" + "\n".join(
        f"  {a} -> {b}  ({', '.join(where)})" for (a, b), where in sorted(found.items()))


def test_no_import_circle():
    edges = import_edges()
    found = cycles()
    assert not found, "import circles:\n" + "\n".join(f"  {_where(edges, path)}" for path in found)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("from .x import y\n\ndef f():\n    from ..sim.suite import TASKS\n"
                      "    import importlib\n    importlib.import_module('qvla_ros.ros.demo')\n")
    found = [name for _, name in imports(source, "qvla_ros.policy.mod", False)]
    assert found == ["qvla_ros.policy.x", "qvla_ros.sim.suite", "qvla_ros.ros.demo"]
    assert rank("qvla_ros.sim.suite") > rank("qvla_ros.policy.mod") > rank("qvla_ros.io")
    assert rank("qvla_ros.sim.commands") == rank("qvla_ros.cli") > rank("qvla_ros.ros.demo")


def test_the_checker_finds_an_upward_import_and_a_circle(tmp_path):
    """A tree with one upward import (policy -> sim) and one circle (quant.a -> quant.b -> quant.c ->
    quant.a, one link a function-level import); the real package must not trip either check."""
    files = {
        "qvla_ros/__init__.py": "",
        "qvla_ros/policy/__init__.py": "",
        "qvla_ros/policy/model.py": "def f():\n    from ..sim.suite import TASKS\n",
        "qvla_ros/quant/__init__.py": "",
        "qvla_ros/quant/a.py": "from .b import x\n",
        "qvla_ros/quant/b.py": "from qvla_ros.quant import c\n",
        "qvla_ros/quant/c.py": "def g():\n    import qvla_ros.quant.a\n",
        "qvla_ros/sim/__init__.py": "",
        "qvla_ros/sim/suite.py": "from ..policy.model import f\n",
        "kernels/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert set(violations(tmp_path)) == {("qvla_ros.policy.model", "qvla_ros.sim.suite")}
    circles = {tuple(path) for path in cycles(tmp_path)}
    # policy.model <-> sim.suite is a circle too (the upward import closes it)
    assert circles == {("qvla_ros.quant.a", "qvla_ros.quant.b", "qvla_ros.quant.c", "qvla_ros.quant.a"),
                       ("qvla_ros.policy.model", "qvla_ros.sim.suite", "qvla_ros.policy.model")}


if __name__ == "__main__":
    for (a, b), where in sorted(violations().items()):
        print(f"upward: {a} -> {b}  {', '.join(where)}")
    for path in cycles():
        print(f"circle: {_where(import_edges(), path)}")
