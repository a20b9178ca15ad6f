"""qvla_ros.io: the one atomic-write helper every stage's files go through."""
import os
import stat

import pytest

from qvla_ros.io import atomic_write, atomic_write_bytes, atomic_write_text


def _mode(path):
    umask = os.umask(0)
    os.umask(umask)
    return stat.S_IMODE(path.stat().st_mode), 0o666 & ~umask


def test_writes_whole_files_with_the_usual_permissions_and_no_debris(tmp_path):
    target = tmp_path / "sub" / "plan.json"  # the parent is made
    assert atomic_write_text(target, "new\n") == target
    assert target.read_text() == "new\n"
    got, want = _mode(target)
    assert got == want
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in target.parent.iterdir()) == ["plan.json"]


def test_the_writer_sees_the_targets_name_in_a_private_folder(tmp_path):
    seen = []
    atomic_write(tmp_path / "fig.png", lambda tmp: (seen.append(tmp), tmp.write_bytes(b"png")))
    assert seen[0].name == "fig.png" and seen[0].parent.name.startswith(".fig.png.")
    assert seen[0].parent.name.endswith(".tmp") and seen[0].parent.parent == tmp_path


def test_a_failed_write_leaves_the_old_file_and_no_debris(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_keep_mode_keeps_the_writers_permissions(tmp_path):
    def build(tmp):
        tmp.write_bytes(b"\x7fELF")
        os.chmod(tmp, 0o700)

    target = atomic_write(tmp_path / "lib.so", build, keep_mode=True)
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
