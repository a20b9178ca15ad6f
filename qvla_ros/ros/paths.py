"""Where the nodes find files named by relative paths (plans, checkpoints, parameter files).

A relative path in a parameter file such as `config/plans/qvla_b4.qvlaplan` means the same thing
whether the package runs from a source checkout, a pip install (files under
<prefix>/share/qvla_ros) or a colcon workspace (the ament share directory).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE = "qvla_ros"


def data_roots() -> list[Path]:
    """Folders that relative paths are looked up in, first match wins: the working directory,
    the source checkout, then the installed share directories."""
    roots = [Path.cwd()]
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "config").is_dir():
        roots.append(checkout)
    roots.append(Path(sys.prefix) / "share" / PACKAGE)
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
        try:
            roots.append(Path(get_package_share_directory(PACKAGE)))
        except (PackageNotFoundError, OSError):  # OSError: no AMENT_PREFIX_PATH (not sourced)
            pass
    except ImportError:
        pass
    return list(dict.fromkeys(roots))


def resolve(path: str) -> str:
    """`path` made absolute: as is when absolute or when nothing matches (so that error messages
    name what the user wrote), else the first data root holding it. "" stays "" (the default)."""
    if not path or os.path.isabs(path):
        return path
    expanded = os.path.expanduser(path)
    if os.path.isabs(expanded):
        return expanded
    for root in data_roots():
        candidate = root / expanded
        if candidate.exists():
            return str(candidate)
    return path


def config_file(name: str) -> str:
    """Absolute path of a shipped parameter file config/<name>."""
    for root in data_roots():
        candidate = root / "config" / name
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(f"parameter file config/{name} not found in {', '.join(map(str, data_roots()))}")
