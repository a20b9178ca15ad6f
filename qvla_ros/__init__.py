"""qvla_ros: action-centric mixed-bit quantization of Vision-Language-Action policies.

The library (policy/, quant/, sim/, cli) imports without ROS. The ROS interfaces generated from
msg/ and srv/ install as qvla_ros.msg and qvla_ros.srv into the environment's site-packages;
extend_path lets them sit beside a source checkout of this package.
"""
from pathlib import Path as _Path
from pkgutil import extend_path as _extend_path

__path__ = _extend_path(__path__, __name__)

# In a source checkout the kernels live at the top level (kernels/, the design card's layout) and
# setup.py maps them to qvla_ros.kernels on install. Searching the checkout's root second makes
# `import qvla_ros.kernels` find the checkout's sources before any installed copy.
_here = _Path(__file__).resolve().parent
if not (_here / "kernels").is_dir() and (_here.parent / "kernels" / "__init__.py").is_file():
    __path__.insert(1, str(_here.parent))

__version__ = "0.1.0"
