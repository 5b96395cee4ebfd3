"""Images uploaded in the sidebar, as a folder ``kcm_core.images.load_image_data`` reads.

Two shapes of upload: one zip of an ImageFolder (one sub-folder per class; images without sub-folders
are unlabeled), or a few single images (unlabeled, for a quick look). ``image_upload_folder`` writes
them into ``<upload folder>/<hash>/images``, where the hash covers the browser session and the files:
each session gets its own folder (nothing another session reads is ever written again), and the same
upload in the same session lands on the same path, so the data cache keyed by that path is reused.

A zip is extracted safely: members are checked before anything is written (no absolute paths, no
``..``, no links, at most ``MAX_FILES`` files and ``MAX_BYTES`` bytes once extracted), every byte
written is counted again (a member that decompresses to more than it declared stops the extraction),
and every image is decoded once, so a damaged member or a corrupt image is named in the error before
the app reads anything. macOS metadata (``__MACOSX/``, dot files) is left out; other files that are
not images are extracted, and the image loader counts and skips them. A zip whose images all sit in
one top folder (``clothes/boot/1.png``) is read from inside that folder.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import stat
import uuid
import zipfile
from pathlib import Path, PurePosixPath
from typing import Sequence

from kcm_core.images import IMAGE_SUFFIXES, is_image_file

MAX_BYTES = 512 * 2**20         # extracted, all files together
MAX_FILES = 20_000
UPLOAD_TYPES = ["zip"] + [s[1:] for s in IMAGE_SUFFIXES]


def image_upload_folder(files: Sequence[tuple[str, bytes]], folder: Path, session: str) -> Path:
    """The folder holding ``files`` (``(name, content)`` pairs as uploaded) under ``folder``, written
    once for ``session``; a ``ValueError`` naming the file or zip member that cannot be used."""
    if not files:
        raise ValueError("no images uploaded yet: drop a zip of an image folder (one sub-folder per class) "
                         "or a few image files on the uploader")
    digest = hashlib.sha1(session.encode())
    for name, content in files:
        digest.update(b"\0" + name.encode() + b"\0" + hashlib.sha1(content).digest())
    target = folder / digest.hexdigest()[:16] / "images"
    if target.is_dir():
        return target
    zips = [name for name, _ in files if name.lower().endswith(".zip")]
    if zips and len(files) > 1:
        raise ValueError(f"upload one zip ({zips[0]}) on its own, or image files without a zip")
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    work = target.parent / f".images.{uuid.uuid4().hex[:8]}.part"
    work.mkdir(mode=0o700)
    try:
        if zips:
            _extract(files[0][0], files[0][1], work)
            root = _unwrap(work)
        else:
            _write_images(files, work)
            root = work
        try:
            root.rename(target)                 # a reader never sees a half-written upload
        except OSError:
            if not target.is_dir():             # else a rerun of this session wrote it first
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _write_images(files: Sequence[tuple[str, bytes]], work: Path) -> None:
    total = sum(len(content) for _, content in files)
    if total > MAX_BYTES:
        raise ValueError(f"the images take {total / 2**20:.0f} MiB; at most {MAX_BYTES // 2**20} MiB are read")
    used: set[str] = set()
    for name, content in files:
        if not is_image_file(name):
            raise ValueError(f"{name} is not an image file ({', '.join(IMAGE_SUFFIXES)}) nor a zip of images")
        base = _safe_name(name)
        stem, suffix = os.path.splitext(base)
        n = 1
        while base.lower() in used:             # two uploads named alike both stay
            n += 1
            base = f"{stem}-{n}{suffix}"
        used.add(base.lower())
        _check_image(io.BytesIO(content), name)
        _write(work / base, content)


def _safe_name(name: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", PurePosixPath(name.replace("\\", "/")).name).strip("._")
    return base if Path(base).suffix else "image.png"


def _members(archive: zipfile.ZipFile, zip_name: str) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """The members to extract with their path parts, every one checked before anything is written."""
    chosen, total = [], 0
    for info in archive.infolist():
        name = info.filename.replace("\\", "/")
        parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
            raise ValueError(f"{zip_name}: member {info.filename!r} points outside the folder it is extracted to")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ValueError(f"{zip_name}: member {info.filename!r} is a link; links are not extracted")
        if info.is_dir() or not parts or parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
            continue
        total += info.file_size
        chosen.append((info, parts))
        if len(chosen) > MAX_FILES:
            raise ValueError(f"{zip_name} holds more than {MAX_FILES} files; upload fewer images")
        if total > MAX_BYTES:
            raise ValueError(f"{zip_name} extracts to more than {MAX_BYTES // 2**20} MiB; upload fewer images")
    if not any(is_image_file(parts[-1]) for _, parts in chosen):
        raise ValueError(f"{zip_name} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    return chosen


def _extract(zip_name: str, content: bytes, work: Path) -> None:
    try:
        archive = zipfile.ZipFile(io.BytesIO(content))
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{zip_name} is not a readable zip archive ({err})") from None
    with archive:
        root = work.resolve()
        written = 0
        for info, parts in _members(archive, zip_name):
            path = work.joinpath(*parts)
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not path.parent.resolve().is_relative_to(root):     # belt and braces after the checks above
                raise ValueError(f"{zip_name}: member {info.filename!r} points outside the folder")
            try:
                with archive.open(info) as source:
                    data = source.read(MAX_BYTES - written + 1)
            except Exception as err:   # BadZipFile (a bad CRC), zlib.error, RuntimeError (encrypted), ...
                raise ValueError(f"{zip_name}: member {info.filename!r} is damaged ({type(err).__name__}: "
                                 f"{err})") from None
            written += len(data)
            if written > MAX_BYTES:
                raise ValueError(f"{zip_name} extracts to more than {MAX_BYTES // 2**20} MiB; upload fewer images")
            if is_image_file(path):
                _check_image(io.BytesIO(data), f"{zip_name}: {info.filename}")
            _write(path, data)


def _check_image(stream: io.BytesIO, name: str) -> None:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(stream) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = "not an image PIL can read" if isinstance(err, UnidentifiedImageError) else str(err) or type(err).__name__
        raise ValueError(f"{name} is not a readable image ({reason})") from None


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _unwrap(work: Path) -> Path:
    """The folder the image folder starts at: inside a single top folder that holds sub-folders."""
    root = work
    while True:
        entries = [p for p in root.iterdir() if not p.name.startswith(".")]
        if len(entries) == 1 and entries[0].is_dir() and any(p.is_dir() for p in entries[0].iterdir()):
            root = entries[0]
        else:
            return root
