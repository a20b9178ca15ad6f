"""Atomic file writes: the one implementation every stage uses.

A reader (the ROS node reloading a plan, a resumed training run, a second eval process) sees
either the old file or the whole new one, never half of it. `atomic_write(path, write)` calls
`write(tmp)` with a path of the same name inside a private temporary folder beside `path`
(".NAME.XXXX.tmp/NAME"), flushes it to disk, gives it the permissions of any new file and
renames it into place. A folder, not a temporary file: some writers (safetensors, nvcc) make
their own temporary files beside the name they are given, so a write killed mid-way leaves its
debris under one dotted name that nothing reads, never a loose ".tmpXXXX" beside the target; a
writer that picks its format from the suffix (matplotlib) sees the target's own name.

At the bottom of the import flow: this module imports nothing from qvla_ros.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text"]


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], *,
                 keep_mode: bool = False) -> Path:
    """write(tmp) to a temporary path beside `path`, then rename it onto `path`; returns `path`.

    The parent folder is created if missing. The written file is fsynced before the rename and
    gets mode 0o666 less the umask (temporary files are private otherwise); keep_mode=True keeps
    the mode the writer gave it (a compiled library keeps its execute bits). On any error the
    target is untouched and the temporary folder is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        tmp = tmp_dir / path.name
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if not keep_mode:
            os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (see atomic_write)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (see atomic_write)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding))
