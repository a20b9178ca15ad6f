"""Shared part of the bundle checkers (scripts/check_libero_bundle.py,
scripts/check_metaworld_bundle.py): unpack a bundle archive, and run a check in a fresh
interpreter (`python -I`: no PYTHONPATH, no user site) whose sys.path starts with the bundle's
site-packages and where the bundle's top-level packages resolve in the bundle (or --extra-path
folders) only: one the bundle lacks fails to import instead of coming from the interpreter's own
site-packages.

A checker's child code is CHILD_PRELUDE followed by its own; the prelude leaves `cfg` (the JSON
config), `where(mod)`, `show_modules()` and `report_outside()` (prints the modules imported from
outside the bundle: those the target machine must have).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD_PRELUDE = r'''
import importlib.machinery, json, os, sys, time, traceback
cfg = json.loads(sys.argv[1])
allowed = cfg["allowed"]

class BundleOnly:
    """Resolves the bundle's top-level packages in the allowed folders only."""
    @staticmethod
    def find_spec(name, path=None, target=None):
        if "." in name or name not in cfg["bundled"]:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, allowed)
        if spec is None:
            raise ModuleNotFoundError(f"{name} is not in the bundle ({allowed})", name=name)
        return spec

sys.meta_path.insert(0, BundleOnly)
sys.path[:0] = allowed + [cfg["root"]]

def where(mod):
    m = sys.modules.get(mod) or __import__(mod)
    return getattr(m, "__file__", None) or list(getattr(m, "__path__", []))

def show_modules():
    print(f"python {sys.version.split()[0]} ({sys.executable}); MUJOCO_GL={os.environ.get('MUJOCO_GL')}")
    for mod in cfg["show"]:
        try:
            print(f"  {mod:28s} {getattr(__import__(mod), '__version__', '')!s:8s} {where(mod)}")
        except Exception as exc:
            print(f"  {mod:28s} NOT IMPORTED: {exc!r}")
    sys.stdout.flush()

def report_outside():
    bundle = [os.path.realpath(p) for p in allowed] + [os.path.realpath(cfg["root"])]
    outside = sorted({name.split(".")[0] for name, m in list(sys.modules.items())
                      if getattr(m, "__file__", None) and "site-packages" in m.__file__
                      and not any(os.path.realpath(m.__file__).startswith(b + os.sep) for b in bundle)})
    print("modules from outside the bundle (the machine must have them): " + ", ".join(outside))
'''


def unpack(archive: Path, dest: Path) -> Path:
    """Unpack `archive` into `dest`; the one folder in it that holds site-packages/."""
    with tarfile.open(archive) as tar:
        if sys.version_info >= (3, 12):
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)
    found = [p for p in dest.iterdir() if (p / "site-packages").is_dir()]
    if len(found) != 1:
        raise SystemExit(f"{archive}: expected one folder with site-packages/, found {found}")
    return found[0]


def add_source_args(parser: argparse.ArgumentParser, installed_help: str) -> None:
    """--installed / --archive / --bundle, --extra-path, --python."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--installed", action="store_true", help=installed_help)
    src.add_argument("--archive", type=Path, help="the .tar.xz; unpacked to a temporary folder")
    src.add_argument("--bundle", type=Path, help="an unpacked bundle (the folder holding site-packages/)")
    parser.add_argument("--extra-path", action="append", default=[], type=Path,
                        help="folder searched before the bundle (e.g. MuJoCo for another Python)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the check")


def run_check(args: argparse.Namespace, child: str, bundled: tuple[str, ...], show: tuple[str, ...],
              prefix: str, extra_cfg=None) -> int:
    """Unpack (with --archive) and run `child` under args.python with the config `cfg`:
    allowed (extra paths + the bundle's site-packages), root, bundled (empty with --installed),
    show, tmp (a temporary folder, also the child's working directory) and extra_cfg(tmp)'s keys."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        if args.archive:
            t0 = time.time()
            bundle = unpack(args.archive, Path(tmp))
            print(f"unpacked {args.archive} ({args.archive.stat().st_size / 2**20:.1f} MiB) into {bundle} "
                  f"in {time.time() - t0:.1f} s", flush=True)
        elif args.bundle:
            bundle = args.bundle.resolve()
        else:
            bundle = None
        cfg = {"allowed": [str(p.resolve()) for p in args.extra_path] +
                          ([str(bundle / "site-packages")] if bundle else []),
               "root": str(ROOT), "bundled": list(bundled) if bundle else [], "show": list(show),
               "tmp": tmp}
        if extra_cfg is not None:
            cfg.update(extra_cfg(Path(tmp)))
        env = dict(os.environ)
        if not env.get("MUJOCO_GL"):
            env["MUJOCO_GL"] = "egl"
        env.setdefault("PYOPENGL_PLATFORM", env["MUJOCO_GL"])
        return subprocess.call([args.python, "-I", "-c", child, json.dumps(cfg)], env=env, cwd=tmp)
