"""Writing a folder or a file so that readers see the old one or the complete new one, never half.

``atomic_folder`` hands out a hidden temporary sibling of the target; when the block ends normally the
temporary folder is renamed into place (an existing target, when ``overwrite`` allows it, is moved
aside first and put back if the rename fails); when anything goes wrong, including a
``KeyboardInterrupt``, the temporary folder is removed. Exports, the fine-tuned model and the demo
cache all go through it.

Before any heavy work, writers check their target here: ``check_protected`` (never the model or data a
run reads, nor a folder inside or around them), ``check_replaceable`` (overwrite replaces only a real
folder holding the writer's marker files: an earlier output of ours, never a file, a link or someone's
folder) and ``check_writable`` (the nearest existing parent takes a new folder). ``disk_errors`` turns a
full disk or a refused write during the work into one ``ValueError`` sentence.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Sequence

# Errors of the disk or the file system, not of the program: worth one sentence, not a traceback.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


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


# ``temporary_sibling`` names: ``.<target>.<tag>-<pid>-<8 hex>``, nothing looser.
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<tag>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


def clean_stale(folder: Path) -> list[Path]:
    """Tidy what killed writers left in ``folder``, for every target in it: a dead process's
    temporary sibling is deleted; its ``old`` sibling (the previous output, moved aside just before
    the final rename) is put back when nothing took its place, else deleted. Returns what was
    removed or restored."""
    touched = []
    for path in folder.glob(".*") if folder.is_dir() else ():
        match = _SIBLING.match(path.name)
        if not match or int(match["pid"]) == os.getpid() or _alive(int(match["pid"])):
            continue
        target = folder / match["name"]
        if match["tag"] == "old" and not (target.exists() or target.is_symlink()):
            os.replace(path, target)         # killed between the two renames: nothing is lost
        else:
            remove(path)
        touched.append(path)
    return touched


# --------------------------------------------------------------------------- checks before writing

def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def check_protected(target: str | os.PathLike, protected: Iterable[str | os.PathLike],
                    what: str = "output folder") -> None:
    """Refuse a ``target`` that is, lies inside or contains one of the ``protected`` paths (the model
    and data a run reads). Resolved paths are compared, so ``../``, ``~`` and links do not slip past;
    a protected path that does not exist has nothing to lose and is skipped."""
    where = _resolved(target)
    for path in protected:
        if not path or not os.path.lexists(Path(path).expanduser()):
            continue
        source = _resolved(path)
        relation = ("is" if where == source else "is inside" if source in where.parents
                    else "contains" if where in source.parents else None)
        if relation:
            raise ValueError(f"{what} {target} {relation} {path}, which this run reads; choose a "
                             "path outside it")


def check_replaceable(target: str | os.PathLike, markers: Sequence[str],
                      protected: Iterable[str | os.PathLike] = (), kind: str = "export") -> None:
    """Raise ``ValueError`` unless an existing ``target`` may be replaced: a real folder (not a link,
    not a file) holding every one of ``markers``, i.e. an earlier output of the same writer."""
    target = Path(target)
    check_protected(target, protected)
    names = " and ".join(markers)
    if target.is_symlink():
        raise ValueError(f"{target} is a symbolic link; overwrite replaces only a real folder holding "
                         f"an earlier {kind} ({names}): choose a new folder name")
    if not target.is_dir():
        raise ValueError(f"{target} is a file, not a folder; overwrite replaces only an earlier {kind} "
                         "folder: choose a new folder name")
    missing = [m for m in markers if not (target / m).is_file()]
    if missing:
        raise ValueError(f"{target} is not an earlier {kind} (it has no {' or '.join(missing)}), so "
                         "overwrite will not replace it: choose a new folder name, or remove it yourself")


def _nearest_existing(path: Path) -> Path:
    for folder in (path, *path.parents):
        if os.path.lexists(folder):
            return folder
    return Path(path.anchor or ".")


def check_writable(target: str | os.PathLike, what: str = "output folder") -> None:
    """Refuse ``target`` now, before the work, when its folder cannot be created: a parent that is a
    file, or one this process may not write. Probed by making (and removing) a folder there, since
    permission bits say nothing for root, read-only mounts or ``/proc``."""
    target = Path(target).expanduser().absolute()
    parent = _nearest_existing(target.parent)
    if not parent.is_dir():
        raise ValueError(f"cannot create {what} {target}: {parent} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".kcm-write-test-", dir=parent))
    except OSError as err:
        raise ValueError(f"cannot write {what} {target}: {parent} does not accept new files "
                         f"({err.strerror or err}); choose a folder you can write to") from err


@contextlib.contextmanager
def disk_errors(target: str | os.PathLike) -> Iterator[None]:
    """A full disk, an exceeded quota or a refused write while writing ``target`` becomes one
    ``ValueError`` sentence (the atomic writers have already removed their partial output)."""
    from safetensors import SafetensorError
    try:
        yield
    except OSError as err:
        if err.errno not in _DISK_ERRNOS:
            raise
        raise ValueError(f"could not write {target}: {err.strerror or err}; nothing was written "
                         "(free some space or choose another folder)") from err
    except SafetensorError as err:       # safetensors words the OS error in its own text
        code = _safetensors_errno(err)
        if code not in _DISK_ERRNOS:
            raise
        raise ValueError(f"could not write {target}: {os.strerror(code)}; nothing was written "
                         "(free some space or choose another folder)") from err


def _safetensors_errno(err: BaseException) -> int | None:
    """The OS error number in a ``SafetensorError`` raised while writing ("I/O error: No space left on
    device (os error 28)", or an older release's "IoError(Os { code: 28, ... })"); None when none."""
    found = re.search(r"os error (\d+)|Os \{ code: (\d+)", str(err))
    return int(found.group(1) or found.group(2)) if found else None


# --------------------------------------------------------------------------- writing

def move_into_place(tmp: Path, target: Path, overwrite: bool,
                    markers: Sequence[str] | None = None) -> None:
    """Rename ``tmp`` to ``target``; an existing target is replaced only with ``overwrite`` (and, when
    ``markers`` are given, only if it still is an earlier output holding them)."""
    if not (target.exists() or target.is_symlink()):
        os.replace(tmp, target)
        return
    if not overwrite:                        # appeared while we were writing
        raise ValueError(f"{target} already exists; pass overwrite=True (CLI: --overwrite)")
    if markers is not None:                  # checked again: it may have changed during the work
        check_replaceable(target, markers)
    old = temporary_sibling(target, "old")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)              # put the previous one back
        raise
    remove(old)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, *, overwrite: bool = False,
                  markers: Sequence[str] | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it becomes ``target``, on failure it is removed.

    An existing ``target`` is replaced only with ``overwrite``, never when it is a file or a link, and
    with ``markers`` only when it holds them (``check_replaceable``), checked before and at the end."""
    target = Path(target)
    clean_stale(target.parent)               # first: it may put back an interrupted run's previous output
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise ValueError(f"{target} already exists; pass overwrite=True (CLI: --overwrite)")
        check_replaceable(target, markers or ())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
        normalise_permissions(tmp)
        move_into_place(tmp, target, overwrite, markers or ())
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
