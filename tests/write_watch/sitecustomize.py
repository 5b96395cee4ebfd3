"""Put on PYTHONPATH by ``tests/test_distributed.py``: every Python process started with
``KCM_WATCH_WRITES=<folder>`` reports each file it opens for writing, each folder it makes and each
rename or removal under that folder, one line on stderr: ``kcm-write rank=<RANK> <event> <path>``.
That lets the test see which rank of a ``torchrun`` job wrote the output (rank 0, and no other).

Python's audit hooks see writes made through Python (``open``, ``os.*``, ``shutil.*``); a file that
native code writes directly (safetensors) shows up as the folder and rename that wrap it."""
import os
import sys

_ROOT = os.environ.get("KCM_WATCH_WRITES")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "shutil.copyfile",
                "shutil.move", "os.symlink", "os.truncate"}


def _under_root(path) -> str | None:
    if isinstance(path, int) or path is None:
        return None
    try:
        text = os.path.abspath(os.fsdecode(path))
    except TypeError:
        return None
    return text if text == _ROOT or text.startswith(_ROOT + os.sep) else None


def _hook(event: str, args: tuple) -> None:
    paths = []
    if event == "open" and len(args) >= 3:
        path, mode, flags = args[0], args[1], args[2]
        writing = (any(c in mode for c in "wax+") if isinstance(mode, str)
                   else bool((flags or 0) & _WRITE_FLAGS))
        if writing:
            paths = [path]
    elif event in _PATH_EVENTS:
        paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
    for path in paths:
        hit = _under_root(path)
        if hit is not None:
            os.write(2, f"kcm-write rank={os.environ.get('RANK', '-')} {event} {hit}\n".encode())


if _ROOT:
    _ROOT = os.path.abspath(_ROOT)
    sys.addaudithook(_hook)
