"""Text data in, tokenized batches out.

``load_text_data`` reads a local CSV / TSV / JSON / JSONL / Parquet / TXT file (through ``pandas``) or
a Hugging Face hub dataset (through ``datasets``) into a ``TextData``: plain tuples of texts (and
optional second texts and integer labels), small enough to hold in memory, hashable enough to cache
on. ``TextData.sample`` draws the seeded subset every caller uses (the CLI, the app, the benchmarks).
``make_batches`` tokenizes it with dynamic padding into the ``dict[str, Tensor]`` batches every other
module consumes; ``mean_length`` is their average real length.

Labels are always the integers ``0..C-1``; when the file held something else (``-1``/``1``,
``"neg"``/``"pos"``) the original values are kept, in order, as ``label_names``.
"""
from __future__ import annotations

import codecs
import contextlib
import copy
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .runtime import Batch

# Suffix -> (format named in error messages, pandas reader, its options).
_READERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    ".csv": ("CSV", "csv", {}),
    # GLUE-style TSV files hold unbalanced quotes inside sentences; quoting=3 (csv.QUOTE_NONE)
    # reads them verbatim instead of swallowing lines until the next quote.
    ".tsv": ("CSV", "csv", {"sep": "\t", "quoting": 3}),
    ".json": ("JSON", "json", {}),
    ".jsonl": ("JSON", "json", {"lines": True}),
    ".parquet": ("PARQUET", "parquet", {}),
}
_TEXT_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".txt")   # checked for UTF-8 before reading
SUPPORTED_SUFFIXES: tuple[str, ...] = tuple(_READERS) + (".txt",)
DEFAULT_TEXT_COLUMNS = ("text", "sentence")
DEFAULT_LABEL_COLUMNS = ("label", "labels")


@dataclass(frozen=True)
class TextData:
    """Texts with optional second texts (pair tasks) and optional integer labels ``0..C-1``.

    ``label_names[i]`` is the original value (or class name) of label ``i``; ``None`` when the labels
    were already ``0..C-1`` integers without names. ``source`` says where the data came from, for
    reports.
    """

    texts: tuple[str, ...]
    text_pairs: tuple[str, ...] | None = None
    labels: tuple[int, ...] | None = None
    label_names: tuple[str, ...] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        n = len(self.texts)
        if self.text_pairs is not None and len(self.text_pairs) != n:
            raise ValueError(f"text_pairs has {len(self.text_pairs)} entries but texts has {n}")
        if self.labels is not None:
            if len(self.labels) != n:
                raise ValueError(f"labels has {len(self.labels)} entries but texts has {n}")
            bad = [y for y in self.labels if y < 0]
            if bad:
                raise ValueError(f"labels must be integers >= 0, got {bad[0]}")
            if self.label_names is not None and self.labels and max(self.labels) >= len(self.label_names):
                raise ValueError(f"label {max(self.labels)} has no name: label_names has only "
                                 f"{len(self.label_names)} entries")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    @property
    def num_classes(self) -> int:
        """Number of classes: ``len(label_names)`` when named, else ``max(label) + 1``; 0 unlabeled."""
        if self.labels is None:
            return 0
        if self.label_names is not None:
            return len(self.label_names)
        return max(self.labels) + 1 if self.labels else 0

    def subset(self, indices: Sequence[int]) -> TextData:
        """The rows at ``indices`` (in that order), keeping ``label_names`` and ``source``."""
        n = len(self)
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise ValueError(f"subset index {bad[0]} is out of range for {n} rows")

        def pick(values: tuple | None) -> tuple | None:
            return None if values is None else tuple(values[i] for i in idx)

        return replace(self, texts=pick(self.texts), text_pairs=pick(self.text_pairs),
                       labels=pick(self.labels))

    def sample(self, n: int | None, seed: int, *, shuffled: bool = False) -> TextData:
        """A seeded random subset of ``n`` rows (see ``seeded_indices``), in their original order, or
        with ``shuffled`` in the seeded draw's order (so that its first rows are a random subset too).

        ``self`` itself when ``n`` is None or at least ``len(self)`` and not ``shuffled``.
        ``label_names`` and ``source`` are kept as they are.
        """
        _check_sample_size(n)
        if (n is None or n >= len(self)) and not shuffled:
            return self
        return self.subset(seeded_indices(len(self), n, seed, shuffled=shuffled))


def seeded_indices(total: int, n: int | None, seed: int, *, shuffled: bool = False) -> list[int]:
    """Ascending indices of a seeded random subset of ``n`` of ``range(total)`` (with ``shuffled``:
    the same subset in the order it was drawn).

    The subset is the first ``n`` entries of ``torch.randperm(total)`` drawn with a
    ``torch.Generator`` seeded with ``seed``, sorted: the same ``(total, n, seed)`` always gives the
    same rows, and for one ``(total, seed)`` a smaller subset is contained in every larger one (so
    ``range(total)`` minus the subset is a held-out set that never overlaps it). ``n`` of None or at
    least ``total`` means every index.
    """
    _check_sample_size(n)
    if (n is None or n >= total) and not shuffled:
        return list(range(total))
    gen = torch.Generator().manual_seed(int(seed))
    drawn = torch.randperm(total, generator=gen)[:total if n is None else n]
    return drawn.tolist() if shuffled else drawn.sort().values.tolist()


def _check_sample_size(n: int | None) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"sample size must be a positive integer or None, got {n!r}")


# --------------------------------------------------------------------------- loading

def load_text_data(source: str | os.PathLike, *, text_column: str | None = None,
                   text_pair_column: str | None = None, label_column: str | None = None,
                   split: str | None = None, config_name: str | None = None,
                   limit: int | None = None, seed: int = 0) -> TextData:
    """Read texts (and labels when present) from a local file or a hub dataset.

    ``source`` is a path ending in one of ``SUPPORTED_SUFFIXES`` or a hub dataset name (``"glue"``
    with ``config_name="sst2"`` and ``split="validation"``). ``split`` and ``config_name`` apply to
    hub datasets only. A ``.txt`` file holds one unlabeled text per line (blank lines dropped).

    The text column defaults to ``text``, then ``sentence``, then the first string column. Labels are
    read from ``label_column``, or from a column named exactly ``label`` / ``labels`` when present.
    ``limit`` keeps a random subset of that many rows, in file order (``TextData.sample(limit, seed)``).
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"data source must be a file path or a hub dataset name, got {source!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    path = Path(source).expanduser()
    if path.is_dir():
        raise ValueError(f"{source} is a folder; give a data file ({', '.join(SUPPORTED_SUFFIXES)})")
    if path.is_file():
        data = _load_local(path, text_column, text_pair_column, label_column)
    elif _looks_like_path(source):
        raise ValueError(f"no data file at {source}; give an existing {'/'.join(SUPPORTED_SUFFIXES)} "
                         "file or a hub dataset name")
    else:
        data = _load_hub(source, config_name, split, text_column, text_pair_column, label_column)
    if limit is not None and limit < len(data):
        data = replace(data.sample(limit, seed),
                       source=f"{data.source} (random {limit} of {len(data)}, seed {seed})")
    return data


def _looks_like_path(source: str) -> bool:
    """True for strings that can only mean a local file (a suffix we read, a separator we know)."""
    if Path(source).suffix.lower() in SUPPORTED_SUFFIXES or source.startswith((".", "/", "~", "\\")):
        return True
    head = source.split("/")[0]
    return len(source.split("/")) > 2 or (head != source and Path(head).is_dir())


def _load_local(path: Path, text_column: str | None, text_pair_column: str | None,
                label_column: str | None) -> TextData:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(f"cannot read {path.name}: unsupported file type {suffix or '(none)'!r}; "
                         f"use one of {', '.join(SUPPORTED_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): choose a file with one text per row")
    if suffix in _TEXT_SUFFIXES:
        _check_utf8(path)
    if suffix == ".txt":
        if text_pair_column or label_column:
            raise ValueError(f"{path.name} is a plain text file (one text per line): it has no columns, "
                             "so text_pair_column and label_column cannot be used")
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
        texts = tuple(line for line in lines if line)
        if not texts:
            raise ValueError(f"{path} holds only blank lines")
        return TextData(texts=texts, source=str(path))
    return _from_columns(_read_with_pandas(path, suffix), {}, str(path), text_column, text_pair_column,
                         label_column)


def _check_utf8(path: Path, chunk: int = 1 << 20) -> None:
    """Raise ``ValueError`` if ``path`` is not valid UTF-8 (read in chunks: files may be large)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as fh:
        try:
            while block := fh.read(chunk):
                decoder.decode(block)
                offset += len(block)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text (invalid byte near offset {offset + err.start}); "
                             "re-save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None


def _read_with_pandas(path: Path, suffix: str) -> dict[str, list]:
    """Read one local file with ``pandas`` into plain columns (``{name: [value per row]}``).

    Missing cells come back as ``None`` or NaN, as ``_from_columns`` expects. JSON values keep the
    types the file gave them (``dtype=False``: no guessing of numbers or dates from strings); CSV
    columns are typed over the whole file at once (``low_memory=False``), never chunk by chunk.
    """
    import pandas as pd
    kind, reader, options = _READERS[suffix]
    try:
        if reader == "csv":
            frame = pd.read_csv(path, encoding="utf-8-sig", low_memory=False, **options)
        elif reader == "json":
            frame = _read_json(path, lines=options.get("lines", _first_char(path) != "["))
        else:
            frame = pd.read_parquet(path)
    except Exception as err:  # the parsers raise many exception types; all mean "not readable as X"
        first = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"could not read {path} as {kind}: {type(err).__name__}: {first}") from None
    return {str(name): frame[name].tolist() for name in frame.columns}


def _read_json(path: Path, lines: bool):
    """A JSON file as a frame: JSON lines, else one array of records or one object of columns."""
    import pandas as pd
    # pandas < 3 also guesses dates in columns named like dates unless told not to; 3 deprecates that.
    options = {"dtype": False} if int(pd.__version__.split(".")[0]) >= 3 else {
        "dtype": False, "convert_dates": False}
    if lines:
        try:
            return pd.read_json(path, lines=True, encoding="utf-8-sig", **options)
        except ValueError:
            if path.suffix.lower() == ".jsonl":
                raise
    # A .json file that is not JSON lines: one (possibly pretty-printed) array or object.
    return pd.read_json(path, encoding="utf-8-sig", **options)


def _first_char(path: Path) -> str:
    """The first non-blank character of a UTF-8 text file ('' when there is none)."""
    with path.open(encoding="utf-8-sig") as fh:
        while block := fh.read(4096):
            if stripped := block.lstrip():
                return stripped[0]
    return ""


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence ``datasets`` progress bars for the block (the library never prints), then restore."""
    import datasets
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _from_columns(columns: dict[str, list], class_names: dict[str, list[str]], source: str,
                  text_column: str | None, text_pair_column: str | None,
                  label_column: str | None) -> TextData:
    """Build ``TextData`` from named columns; ``class_names`` holds ClassLabel names per column."""
    names = list(columns)
    if not names or not len(columns[names[0]]):
        raise ValueError(f"{source} has no rows")
    text_col = text_column or _default_text_column(columns, source)
    for role, col in (("text", text_col), ("text pair", text_pair_column), ("label", label_column)):
        if col is not None and col not in columns:
            raise ValueError(f"{source} has no {role} column {col!r}; available columns: {', '.join(names)}")
    texts = _text_values(columns[text_col], text_col, source)
    pairs = _text_values(columns[text_pair_column], text_pair_column, source) if text_pair_column else None
    label_col = label_column or next((c for c in DEFAULT_LABEL_COLUMNS if c in columns), None)
    labels, label_names = None, None
    if label_col is not None:
        labels, label_names = _map_labels(columns[label_col], label_col, class_names.get(label_col),
                                          source, explicit=label_column is not None)
    return TextData(texts=texts, text_pairs=pairs, labels=labels, label_names=label_names, source=source)


def _default_text_column(columns: dict[str, list], source: str) -> str:
    for name in DEFAULT_TEXT_COLUMNS:
        if name in columns:
            return name
    for name, values in columns.items():
        if any(isinstance(v, str) for v in values[:100]):
            return name
    raise ValueError(f"{source} has no string column to use as text; available columns: "
                     f"{', '.join(columns)} (name one with text_column)")


def _text_values(values: list, column: str, source: str) -> tuple[str, ...]:
    out = []
    for row, value in enumerate(values):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise ValueError(f"{source}: row {row} has no value in text column {column!r}")
        if not isinstance(value, str):
            if isinstance(value, (list, dict)):
                raise ValueError(f"{source}: column {column!r} holds {type(value).__name__} values, not "
                                 "text; name the text column with text_column")
            value = str(value)
        out.append(value)
    return tuple(out)


def _map_labels(values: list, column: str, class_names: list[str] | None, source: str,
                explicit: bool) -> tuple[tuple[int, ...] | None, tuple[str, ...] | None]:
    """Labels as ``0..C-1`` plus the original values (or ClassLabel names) as names."""
    if class_names is not None:  # a hub ClassLabel: ints already index class_names; -1 means unlabeled
        if all(v == -1 for v in values):
            if explicit:
                raise ValueError(f"{source}: every label in column {column!r} is -1 (this split is "
                                 "unlabeled, e.g. a GLUE test split); use a labeled split")
            return None, None
        if any(v is None or v < 0 for v in values):
            raise ValueError(f"{source}: some rows of label column {column!r} are unlabeled (-1)")
        return tuple(int(v) for v in values), tuple(class_names)
    for row, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            raise ValueError(f"{source}: row {row} has no value in label column {column!r}")
    if all(isinstance(v, bool) for v in values):
        values = [int(v) for v in values]
    elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        fractional = next((v for v in values if float(v) != int(v)), None)
        if fractional is not None:
            raise ValueError(f"{source}: label column {column!r} holds non-integer numbers (e.g. "
                             f"{fractional}); only classification labels are supported")
        values = [int(v) for v in values]
    elif not all(isinstance(v, str) for v in values):
        kinds = sorted({type(v).__name__ for v in values})
        raise ValueError(f"{source}: label column {column!r} mixes value types ({', '.join(kinds)}); "
                         "labels must be all integers or all strings")
    unique = sorted(set(values))
    if all(isinstance(v, int) for v in unique) and unique == list(range(len(unique))):
        return tuple(values), None
    index = {v: i for i, v in enumerate(unique)}
    return tuple(index[v] for v in values), tuple(str(v) for v in unique)


def _load_hub(name: str, config_name: str | None, split: str | None, text_column: str | None,
              text_pair_column: str | None, label_column: str | None) -> TextData:
    """A hub dataset split through ``datasets.load_dataset``, failing fast and clearly offline."""
    from .models import check_hub, hub_offline
    label = f"{name}/{config_name}" if config_name else name
    if hub_offline():
        import datasets
        if not datasets.config.HF_HUB_OFFLINE:
            # Offline was switched on after `datasets` was imported: it would still try the network.
            raise ValueError(f"HF_HUB_OFFLINE is set, so hub dataset {label!r} cannot be loaded; "
                             "use a local file")
    else:
        check_hub(name, kind="dataset", what=f"load dataset {label!r}")
    import datasets
    # Hub downloads go to the ordinary `datasets` cache, so a second run (or HF_HUB_OFFLINE=1) reuses them.
    with _quiet_datasets():
        try:
            loaded = datasets.load_dataset(name, config_name, split=split,
                                           download_config=datasets.DownloadConfig(max_retries=1))
        except datasets.exceptions.DatasetNotFoundError:
            raise ValueError(f"no dataset {label!r} on the Hugging Face hub (or it is private); "
                             "check the name or use a local file") from None
        except (OSError, ConnectionError) as err:
            raise ValueError(f"could not reach the Hugging Face hub to load dataset {label!r} from this "
                             f"machine ({type(err).__name__}); use a local file instead") from None
        except ValueError as err:  # missing config, unknown split, ...
            raise ValueError(f"could not load hub dataset {label!r}: {err}") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if len(splits) != 1:
            raise ValueError(f"hub dataset {label!r} has splits {', '.join(splits)}; choose one with split")
        split = splits[0]
        loaded = loaded[split]
    class_names = {col: list(feat.names) for col, feat in loaded.features.items()
                   if isinstance(feat, datasets.ClassLabel)}
    source = f"hub:{label}" + (f" [{split}]" if split else "")
    return _from_columns(loaded.to_dict(), class_names, source, text_column, text_pair_column,
                         label_column)


# --------------------------------------------------------------------------- labels

def check_labels_for_model(data: TextData, num_labels: int) -> None:
    """Raise ``ValueError`` unless ``data`` has labels usable with a ``num_labels``-way classifier."""
    if not data.has_labels:
        raise ValueError(f"{data.source or 'the data'} has no labels; name the label column")
    present = len(set(data.labels))
    if present < 2:
        raise ValueError(f"{data.source or 'the data'} has only one class; a classifier needs at least "
                         "two classes")
    if data.num_classes > num_labels:
        raise ValueError(f"{data.source or 'the data'} has {data.num_classes} classes but the model "
                         f"predicts only {num_labels} labels")


def align_labels(data: TextData, label_names: Sequence[str] | None) -> TextData:
    """``data`` with its labels renumbered to follow ``label_names`` (e.g. a training set's order).

    Needed when two files were mapped separately: a test file holding only ``"pos"`` rows would map
    ``"pos"`` to 0 on its own. Unnamed labels are kept as they are.
    """
    if not data.has_labels or data.label_names is None or label_names is None:
        return data
    target = {name: i for i, name in enumerate(label_names)}
    unknown = [n for n in data.label_names if n not in target]
    if unknown:
        raise ValueError(f"{data.source or 'the data'} has label {unknown[0]!r}, which is not one of "
                         f"{', '.join(map(repr, label_names))}")
    labels = tuple(target[data.label_names[y]] for y in data.labels)
    return replace(data, labels=labels, label_names=tuple(label_names))


# --------------------------------------------------------------------------- batches

def make_batches(data: TextData, tokenizer, *, max_len: int = 128, batch_size: int = 32,
                 with_labels: bool = True) -> list[dict[str, torch.Tensor]]:
    """Tokenize ``data`` in order into batches padded to each batch's longest sequence.

    Keys are whatever the tokenizer returns (``input_ids``, ``attention_mask``, ``token_type_ids``)
    plus ``labels`` (int64) when ``with_labels`` and the data has labels. A tokenizer without a pad
    token (GPT-2) is copied and given its end-of-text token as pad; the caller's is never changed.
    """
    for name, value in (("max_len", max_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if len(data) == 0:
        raise ValueError("no texts to tokenize: the data is empty")
    tokenizer = _with_pad_token(tokenizer)
    batches = []
    for start in range(0, len(data), batch_size):
        stop = start + batch_size
        pairs = list(data.text_pairs[start:stop]) if data.text_pairs is not None else None
        enc = tokenizer(list(data.texts[start:stop]), pairs, padding="longest", truncation=True,
                        max_length=max_len, return_tensors="pt")
        batch = {k: v for k, v in enc.items()}
        if with_labels and data.labels is not None:
            batch["labels"] = torch.tensor(data.labels[start:stop], dtype=torch.long)  # (B,)
        batches.append(batch)
    return batches


def _with_pad_token(tokenizer):
    if getattr(tokenizer, "pad_token", None) is not None:
        return tokenizer
    eos = getattr(tokenizer, "eos_token", None)
    if eos is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither a pad token nor an end-of-text token "
                         "to pad with; set tokenizer.pad_token first")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = eos
    return tokenizer


def mean_length(batches: Sequence[Batch]) -> float:
    """Average number of real tokens per sequence: the attention mask's ones, or every position of
    ``input_ids`` when a batch has no mask (as ``token_mask`` counts them); 0.0 for images."""
    tokens = sequences = 0
    for batch in batches:
        mask = batch.get("attention_mask")
        if mask is None:
            mask = batch.get("input_ids")
            if mask is None:
                return 0.0
            mask = torch.ones_like(mask)
        tokens += int(mask.sum())
        sequences += int(mask.shape[0])
    return tokens / sequences if sequences else 0.0
