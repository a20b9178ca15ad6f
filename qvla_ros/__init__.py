"""qvla_ros: action-centric mixed-bit quantization of Vision-Language-Action policies.

The library (policy/, quant/, sim/, cli) imports without ROS. The ROS interfaces generated from
msg/ and srv/ install as qvla_ros.msg and qvla_ros.srv into the environment's site-packages;
extend_path lets them sit beside a source checkout of this package.

Packaging of the kernels: one mapping, `qvla_ros.kernels` -> the top-level kernels/ folder (the
design card's layout). An install carries it out by copying (setup.py's package_dir for pip, its
counterpart in CMakeLists.txt for colcon, which does not run setup.py); in a source checkout the
finder below resolves that one name to kernels/, so the checkout's kernels win over an installed
copy and nothing else of the checkout's root (bench/, test/) becomes part of the package.
"""
import importlib.abc as _abc
import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path
from pkgutil import extend_path as _extend_path

__path__ = _extend_path(__path__, __name__)

_CHECKOUT_KERNELS = _Path(__file__).resolve().parent.parent / "kernels"


class _CheckoutKernelsFinder(_abc.MetaPathFinder):
    """Finds `qvla_ros.kernels` (the package only; its modules are found inside it) in the checkout."""

    def find_spec(self, name, path=None, target=None):
        if name != f"{__name__}.kernels":
            return None
        return _util.spec_from_file_location(name, _CHECKOUT_KERNELS / "__init__.py",
                                             submodule_search_locations=[str(_CHECKOUT_KERNELS)])


# Installed, this file sits in site-packages/qvla_ros/ beside its copied kernels/: no finder.
if not (_Path(__file__).resolve().parent / "kernels").is_dir() and (_CHECKOUT_KERNELS / "__init__.py").is_file():
    if not any(isinstance(f, _CheckoutKernelsFinder) for f in _sys.meta_path):
        _sys.meta_path.insert(0, _CheckoutKernelsFinder())

__version__ = "0.1.0"
