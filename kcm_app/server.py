"""Shared-server mode: what a browser user may read and write on the machine the app runs on.

One switch, read from the environment when the app starts a run:

- ``KCM_SHARED_SERVER=1`` turns the mode on (default off: a single user on their own machine may read
  and write any path, as before).
- ``KCM_ALLOWED_ROOTS=/path/a:/path/b`` (``os.pathsep``-separated): local model folders, data files
  and export folders must resolve (``..``, ``~`` and links followed) inside one of these folders.
  Relative paths are taken inside the first one. None given: local paths and exports are off.
- ``KCM_ALLOW_HUB=0/1``: hub model ids and hub datasets (default 0 in shared mode).
- ``KCM_ALLOW_UPLOADS=0/1``: file uploads (default 1).

The start-up model and data that the operator names with ``KCM_APP_MODEL`` / ``KCM_APP_DATA`` are
always allowed. A refusal never says whether a path outside the roots exists: the same sentence is
given for any such path, before anything is read. In shared mode uncaught errors show no details in
the browser (``client.showErrorDetails = "none"``, set here at run time; ``streamlit run app.py
--client.showErrorDetails=none`` does the same from the first run on).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")     # name or owner/name


@dataclass(frozen=True)
class ServerSettings:
    """The shared-server switches (``settings()`` reads them from the environment)."""

    shared: bool = False
    roots: tuple[Path, ...] = ()
    allow_hub: bool = True
    allow_uploads: bool = True
    trusted: tuple[str, ...] = ()            # the operator's KCM_APP_MODEL / KCM_APP_DATA

    @property
    def local_paths(self) -> bool:
        return not self.shared or bool(self.roots)

    def describe(self) -> str:
        """One line for the sidebar: what this server allows."""
        if not self.shared:
            return ""
        where = ", ".join(str(r) for r in self.roots) if self.roots else "off"
        return (f"Shared server: local paths {'inside ' + where if self.roots else where}; hub "
                f"{'on' if self.allow_hub else 'off'}; uploads {'on' if self.allow_uploads else 'off'}.")


def _flag(environ: Mapping[str, str], name: str, default: bool) -> bool:
    value = environ.get(name)
    if value is None:
        return default
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    raise ValueError(f"{name} must be 0 or 1, got {value!r}; fix the server's environment")


def settings(environ: Mapping[str, str] = os.environ) -> ServerSettings:
    """The settings in ``environ``; a malformed value raises ``ValueError`` (fail closed)."""
    shared = _flag(environ, "KCM_SHARED_SERVER", False)
    if not shared:
        return ServerSettings()
    roots = []
    for text in (environ.get("KCM_ALLOWED_ROOTS") or "").split(os.pathsep):
        if text.strip():
            root = Path(text.strip()).expanduser().resolve()
            if not root.is_dir():
                raise ValueError(f"KCM_ALLOWED_ROOTS names {text.strip()}, which is not a folder; fix "
                                 "the server's environment")
            roots.append(root)
    trusted = tuple(environ[k].strip() for k in ("KCM_APP_MODEL", "KCM_APP_DATA") if environ.get(k))
    return ServerSettings(True, tuple(roots), _flag(environ, "KCM_ALLOW_HUB", False),
                          _flag(environ, "KCM_ALLOW_UPLOADS", True), trusted)


def apply_streamlit_options(config: ServerSettings | None = None) -> None:
    """In shared mode, hide exception details from browsers (a traceback shows server paths)."""
    config = config or settings()
    if config.shared:
        import streamlit as st
        st.set_option("client.showErrorDetails", "none")


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def confine(ref: str, what: str, config: ServerSettings | None = None, *, trust: bool = True) -> str:
    """The path to use for the local ``ref`` (a model folder, a data file, an export folder).

    Not shared: ``ref`` as given. Shared: its resolved absolute path when that lies inside the roots;
    otherwise one ``ValueError`` sentence that is the same whether the path exists or not. With
    ``trust``, the operator's start-up paths (``KCM_APP_MODEL``/``KCM_APP_DATA``) pass as they are."""
    config = config or settings()
    ref = ref.strip()
    if not config.shared or (trust and ref in config.trusted):
        return ref
    if not config.roots:
        raise ValueError(f"{what}s on this machine are turned off on this shared server; "
                         f"{_alternatives(config)}")
    path = Path(ref).expanduser()
    try:
        # resolve() follows links, so a link inside a root to a file outside it is refused too
        resolved = (path if path.is_absolute() else config.roots[0] / path).resolve()
    except (OSError, RuntimeError):          # a link loop: outside by definition
        resolved = None
    if resolved is None or not _inside(resolved, config.roots):
        raise ValueError(f"{what}s must lie inside {', '.join(str(r) for r in config.roots)} on this "
                         f"shared server; {ref!r} does not")
    return str(resolved)


def check_hub(what: str, config: ServerSettings | None = None) -> None:
    """Refuse hub downloads when this shared server turns them off."""
    config = config or settings()
    if config.shared and not config.allow_hub:
        raise ValueError(f"hub {what}s are turned off on this shared server (KCM_ALLOW_HUB=0); "
                         f"{_alternatives(config)}")


def confine_folder(ref: str, what: str, config: ServerSettings | None = None) -> str:
    """``confine`` for a folder whose files are read (a model folder): shared, every file and folder in
    it must resolve inside the roots too, so a link inside a root to a file outside it is refused."""
    config = config or settings()
    folder = confine(ref, what, config)
    if not config.shared or ref.strip() in config.trusted or not Path(folder).is_dir():
        return folder
    for parent, dirs, files in os.walk(folder):        # links are listed, not followed
        for name in dirs + files:
            try:
                inside = _inside((Path(parent) / name).resolve(), config.roots)
            except (OSError, RuntimeError):             # a link loop
                inside = False
            if not inside:
                raise ValueError(f"{what}s must lie inside {', '.join(str(r) for r in config.roots)} on this "
                                 f"shared server; {ref.strip()!r} holds {name}, a link to somewhere else")
    return folder


def hub_ref(ref: str, what: str, config: ServerSettings | None = None) -> str:
    """The hub model id or dataset name to load for ``ref``, refused when the hub is turned off.

    Shared: ``ref`` must be a hub id (``name`` or ``owner/name``) that names nothing relative to the
    server's working folder, because ``from_pretrained`` and ``load_dataset`` try a local path first: a
    "hub id" would otherwise read any folder or file the server can (confine's roots bypassed). The
    operator's start-up model and data pass as they are."""
    config = config or settings()
    check_hub(what, config)
    ref = ref.strip()
    if not config.shared or ref in config.trusted:
        return ref
    local = ref and (os.path.lexists(ref) or os.path.lexists(ref.split("/")[0]))
    if not _HUB_NAME.match(ref) or ".." in ref or local:
        raise ValueError(f"hub {what}s must be given as a hub id (name or owner/name) on this shared "
                         f"server; {ref!r} is not one")
    return ref


def check_uploads(config: ServerSettings | None = None) -> None:
    config = config or settings()
    if config.shared and not config.allow_uploads:
        raise ValueError(f"uploads are turned off on this shared server (KCM_ALLOW_UPLOADS=0); "
                         f"{_alternatives(config)}")


def export_folder(text: str, config: ServerSettings | None = None) -> Path:
    """The absolute folder an export named ``text`` writes (confined to the roots in shared mode)."""
    config = config or settings()
    if not text.strip():
        raise ValueError("name the output folder to write the pruned model to")
    if config.shared:
        if not config.roots:
            raise ValueError("exports are turned off on this shared server (no KCM_ALLOWED_ROOTS); "
                             "download the report instead")
        return Path(confine(text, "export folder", config, trust=False))
    return Path(text.strip()).expanduser().resolve()


def _alternatives(config: ServerSettings) -> str:
    options = ["the embedded demo"]
    if config.local_paths:
        options.append(f"a path inside {', '.join(str(r) for r in config.roots)}")
    if config.allow_hub:
        options.append("a hub id")
    if config.allow_uploads:
        options.append("an uploaded file (data)")
    return "choose " + ", ".join(options[:-1]) + (" or " if len(options) > 1 else "") + options[-1]
