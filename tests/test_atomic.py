"""kcm_core.atomic: a folder appears whole or not at all, and what killed writers left is cleaned up."""
import subprocess
import sys

import pytest

from kcm_core.atomic import atomic_folder, remove_stale_siblings, temporary_sibling


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_failed_write_leaves_nothing_and_keeps_the_old_folder(tmp_path):
    target = tmp_path / "out"
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_folder(target, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("second")
            raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(ValueError, match="already exists; pass overwrite=True"):
        with atomic_folder(target):
            pass


def test_siblings_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    target = tmp_path / "out"
    dead = tmp_path / f".out.tmp-{dead_pid()}-0000abcd"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 1000)
    old = tmp_path / f".out.old-{dead_pid()}-1111abcd"
    old.mkdir()
    live = temporary_sibling(target)           # this process's: alive
    live.mkdir()
    assert sorted(remove_stale_siblings(target)) == sorted([dead, old])
    assert live.exists() and not dead.exists() and not old.exists()
    with atomic_folder(target) as tmp:           # a new write cleans up too
        (tmp / "x").write_text("")
    assert target.is_dir()
