"""Which installed files a simulator run really uses: the shared part of the trimmed runtimes
scripts/make_libero_bundle.sh and scripts/make_metaworld_bundle.sh build for the GPU machine
(64 MiB a call, working tree included), where whole simulator installs do not fit.

Two sources, combined, so that neither misses what the other sees:
  - `record_opens()`: every file Python opens while active (an audit hook on the "open" event:
    XML that robosuite and LIBERO parse, bddl and init-state files, modules' data files);
  - `xml_files()` / `xml_includes()`: every `file*=` attribute of a compiled MuJoCo XML (meshes,
    textures, skyboxes) and every XML an <include> pulls in: MuJoCo reads those in C, where no
    Python hook sees them.

The suite-specific collectors (qvla_ros/sim/libero/bundle.py, qvla_ros/sim/metaworld_bundle.py)
build, reset, step and render every task inside `record_opens()` and add the XML's files; their
per-task union and command line (`collect_union`, `collector_main`) are here too. The build
scripts also run them under strace where strace exists (scripts/bundle_steps.sh).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Iterable, Iterator

__all__ = ["xml_files", "xml_includes", "record_opens", "existing_files", "write_list",
           "collect_union", "collector_main"]


def xml_files(xml: str, base_dir: str | os.PathLike | None = None) -> set[str]:
    """Absolute paths of the files a MuJoCo XML names (`file`, `fileright`, ... attributes).

    Relative names are resolved as MuJoCo does: against <compiler meshdir/texturedir/assetdir>
    for meshes/textures (hfields, skins too), then against `base_dir` (the XML's folder)."""
    root = ET.fromstring(xml)
    compiler = root.find("compiler")
    dirs = {k: (compiler.get(k) if compiler is not None else None) for k in ("meshdir", "texturedir", "assetdir")}
    kind_dir = {"mesh": dirs["meshdir"] or dirs["assetdir"], "skin": dirs["meshdir"] or dirs["assetdir"],
                "hfield": dirs["assetdir"], "texture": dirs["texturedir"] or dirs["assetdir"]}
    out: set[str] = set()
    for element in root.iter():
        for attr, value in element.attrib.items():
            if not attr.startswith("file") or not value:
                continue
            path = Path(value)
            if not path.is_absolute():
                prefix = kind_dir.get(element.tag)
                if prefix:
                    path = Path(prefix) / path
                if not path.is_absolute() and base_dir is not None:
                    path = Path(base_dir) / path
            out.add(os.path.normpath(str(path)))
    return out


def xml_includes(path: str | os.PathLike) -> set[str]:
    """The XML file at `path` and every file its <include file=...> elements pull in, nested
    includes too (absolute paths of existing files). A relative include is looked up against the
    main file's folder (MuJoCo's rule) and, failing that, against the including file's folder."""
    main = os.path.normpath(os.path.abspath(path))
    main_dir = os.path.dirname(main)
    seen: set[str] = set()
    todo = [main]
    while todo:
        current = todo.pop()
        if current in seen or not os.path.isfile(current):
            continue
        seen.add(current)
        for element in ET.parse(current).getroot().iter("include"):
            name = (element.get("file") or "").replace("\\", "/")
            if not name:
                continue
            for base in (main_dir, os.path.dirname(current)):
                candidate = os.path.normpath(os.path.join(base, name))
                if os.path.isfile(candidate):
                    todo.append(candidate)
                    break
    return seen


class _OpenRecorder:
    """Records the paths of files opened through Python (audit event "open") while active.
    Audit hooks cannot be removed, so one is installed per process and switched on and off."""

    _instance: "_OpenRecorder | None" = None

    def __init__(self):
        self.paths: set[str] = set()
        self.active = False
        sys.addaudithook(self._hook)

    @classmethod
    def get(cls) -> "_OpenRecorder":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def _hook(self, event, args):
        if not self.active or event != "open" or not args:
            return
        path = args[0]
        if isinstance(path, int):
            return
        try:
            path = os.fsdecode(path)
        except TypeError:
            return
        self.paths.add(os.path.normpath(os.path.abspath(path)))


@contextlib.contextmanager
def record_opens() -> Iterator[set[str]]:
    """`with record_opens() as opened:` collects into `opened` the absolute paths of the files
    Python opens inside the block (directories and missing files included; see existing_files)."""
    recorder = _OpenRecorder.get()
    recorder.paths = set()
    recorder.active = True
    opened: set[str] = set()
    try:
        yield opened
    finally:
        recorder.active = False
        opened |= recorder.paths
        recorder.paths = set()


def existing_files(paths: Iterable[str]) -> set[str]:
    """Those of `paths` that are regular files."""
    return {p for p in paths if os.path.isfile(p)}


def write_list(paths: Iterable[str], out: str | os.PathLike) -> None:
    """The paths, sorted, one a line."""
    Path(out).write_text("".join(p + "\n" for p in sorted(paths)))


def collect_union(jobs: Iterable[tuple[str, Callable[[], set[str]]]], log=None) -> set[str]:
    """Union of the files of every (label, collect) job, each run once, in order; `log` (when
    given) hears "label: N files (M so far)" after each."""
    used: set[str] = set()
    for label, run in jobs:
        files = run()
        used |= files
        if log:
            log(f"{label}: {len(files)} files ({len(used)} so far)")
    return used


def collector_main(argv: list[str] | None, description: str,
                   add_args: Callable[[argparse.ArgumentParser], None], steps: int,
                   collect: Callable[..., set[str]]) -> int:
    """A collector's command line: its own arguments (`add_args`), then --no-render, --steps
    (default `steps`) and --out; `collect(args, log)` gives the files, written to --out sorted,
    one a line."""
    parser = argparse.ArgumentParser(description=description)
    add_args(parser)
    parser.add_argument("--no-render", action="store_true")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--out", required=True, help="file to write the paths to")
    args = parser.parse_args(argv)
    used = collect(args, lambda m: print(m, file=sys.stderr, flush=True))
    write_list(used, args.out)
    print(f"{len(used)} files -> {args.out}", file=sys.stderr)
    return 0
