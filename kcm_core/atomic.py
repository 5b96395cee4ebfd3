"""Writing a folder or a file so that readers see the old one or the complete new one, never half.

``atomic_folder`` hands out a hidden temporary sibling of the target; when the block ends normally the
temporary folder is renamed into place (an existing target, when ``overwrite`` allows it, is moved
aside first and put back if the rename fails); when anything goes wrong, including a
``KeyboardInterrupt``, the temporary folder is removed. Exports, the fine-tuned model and the demo
cache all go through it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


def remove(path: Path) -> None:
    """Delete a file, a link or a folder tree; nothing if it is not there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def current_umask() -> int:
    # Read, not set-and-restore: os.umask(0) would briefly change it for every thread.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def normalise_permissions(folder: Path) -> None:
    """Some writers create 0600 files; a saved model is meant to be shared, so follow the umask."""
    umask = current_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def temporary_sibling(target: Path, tag: str = "tmp") -> Path:
    """A hidden, unique name beside ``target`` (same file system, so the final rename is atomic)."""
    return target.parent / f".{target.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's process: alive
        return True
    return True


def remove_stale_siblings(target: Path) -> list[Path]:
    """Delete the temporary siblings of ``target`` left by processes that no longer run (a killed
    export or fine-tune); returns what was removed. Siblings of live processes are left alone."""
    removed = []
    for tag in ("tmp", "old"):
        for path in target.parent.glob(f".{target.name}.{tag}-*"):
            pid = path.name[len(f".{target.name}.{tag}-"):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                remove(path)
                removed.append(path)
    return removed


def move_into_place(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``target``; an existing target is replaced only with ``overwrite``."""
    if not (target.exists() or target.is_symlink()):
        os.replace(tmp, target)
        return
    if not overwrite:                        # appeared while we were writing
        raise ValueError(f"{target} already exists; pass overwrite=True (CLI: --overwrite)")
    old = temporary_sibling(target, "old")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)              # put the previous one back
        raise
    remove(old)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it becomes ``target``, on failure it is removed."""
    target = Path(target)
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise ValueError(f"{target} already exists; pass overwrite=True (CLI: --overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(target)
    tmp = temporary_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
        normalise_permissions(tmp)
        move_into_place(tmp, target, overwrite)
    except BaseException:
        remove(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary sibling and a rename."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise
