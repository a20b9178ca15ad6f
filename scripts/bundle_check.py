"""Shared part of the bundle checkers (scripts/check_libero_bundle.py,
scripts/check_metaworld_bundle.py): unpack a bundle archive, and run a check in a fresh
interpreter (`python -I`: no PYTHONPATH, no user site) whose sys.path starts with the bundle's
site-packages and where the bundle's top-level packages resolve in the bundle (or --extra-path
folders) only: one the bundle lacks fails to import instead of coming from the interpreter's own
site-packages.

A checker's child code is CHILD_PRELUDE followed by its own; the prelude leaves `cfg` (the JSON
config), `where(mod)`, `show_modules()`, `report_outside()` (prints the modules imported from
outside the bundle: those the target machine must have) and the per-task parts both checkers run:
`run_task()` (OK/FAIL line, into `results`), `first_frame()` (--save-images / --compare-images,
into `diffs`), `check_frames()`, `report_diffs()` and `finish()`. Their command-line side is
`add_frame_args()` / `frame_cfg()`.
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

results, diffs = [], []   # per task: passed; |first frame - reference| (with compare_images)

def run_task(label, body):
    """Runs body() (which returns the text after the label), prints `OK` or `FAIL` with the time."""
    t0 = time.time()
    try:
        text = body()
        line = f"OK   {label} ({time.time() - t0:.1f} s) {text}"
        results.append(True)
    except Exception as exc:
        line = f"FAIL {label} ({time.time() - t0:.1f} s) {type(exc).__name__}: {exc}"
        traceback.print_exc(limit=4)
        results.append(False)
    print(line, flush=True)

def first_frame(key, first, pixels=True):
    """Saves (save_images) or compares (compare_images) a task's first frame as KEY.npy; the text
    of the comparison ("" without one), with the share of pixels off by > 8 when `pixels`."""
    import numpy as np
    if cfg["save_images"]:
        np.save(os.path.join(cfg["save_images"], f"{key}.npy"), first)
    if not cfg["compare_images"]:
        return ""
    ref = np.load(os.path.join(cfg["compare_images"], f"{key}.npy")).astype(np.int16)
    d = np.abs(first.astype(np.int16) - ref)
    diffs.append(d)
    text = f" | vs reference: mean |diff| {d.mean():.3f}, max {d.max()}"
    if pixels:
        text += f", pixels differing by > 8: {(d.max(-1) > 8).mean() * 100:.2f}%"
    return text

def check_frames(obs):
    """Both cameras rendered at image_size, neither flat; proprio finite."""
    import numpy as np
    img = obs["images"]
    assert img.shape == (2, cfg["image_size"], cfg["image_size"], 3), img.shape
    assert all(float(im.std()) > 1.0 for im in img), "a camera image is flat"
    assert np.all(np.isfinite(obs["proprio"])), "proprio not finite"

def report_diffs(pixels=True):
    if diffs:
        import numpy as np
        d = np.stack(diffs)
        text = f"images vs reference over {len(diffs)} tasks: mean |diff| {d.mean():.3f} (0-255), max {d.max()}"
        if pixels:
            text += f", pixels differing by > 8 in any channel: {(d.max(-1) > 8).mean() * 100:.2f}%"
        print(text)

def finish():
    print(f"{sum(results)}/{len(results)} tasks OK")
    sys.exit(0 if results and all(results) else 1)
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


def add_frame_args(parser: argparse.ArgumentParser, image_size: int) -> None:
    """--steps, --image-size, --save-images, --compare-images."""
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=image_size)
    parser.add_argument("--save-images", type=Path, help="save each task's first frame (.npy) here")
    parser.add_argument("--compare-images", type=Path,
                        help="compare each task's first frame with those saved here (e.g. --installed's)")


def frame_cfg(args: argparse.Namespace) -> dict:
    """add_frame_args' values for the child's cfg (absolute paths); creates --save-images' folder."""
    if args.save_images:
        args.save_images.mkdir(parents=True, exist_ok=True)
    return {"steps": args.steps, "image_size": args.image_size,
            "save_images": str(args.save_images.resolve()) if args.save_images else None,
            "compare_images": str(args.compare_images.resolve()) if args.compare_images else None}


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
