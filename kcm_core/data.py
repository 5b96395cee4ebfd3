"""Text data in, tokenized batches out.

``load_text_data`` reads a local CSV / TSV / JSON / JSONL / Parquet / TXT file (through ``pandas``) or
a Hugging Face hub dataset (through ``datasets``) into a ``TextData``: plain tuples of texts (and
optional second texts and integer labels), small enough to hold in memory, hashable enough to cache
on. ``TextData.sample`` draws the seeded subset every caller uses (the CLI, the app, the benchmarks).
``make_batches`` tokenizes it with dynamic padding into the ``dict[str, Tensor]`` batches every other
module consumes; ``mean_length`` is their average real length.

Labels: non-negative integers are kept as they are (they are class ids); strings (and negative
integers) are numbered in sorted order and their values kept as ``label_names``. Before labels meet a
model, ``labels_for_model`` turns them into that model's class ids: names through its
``config.label2id``, integers as its own ids, and anything it cannot predict is refused.

Size bounds (why: a 20 MB one-line file once took 3.1 GB): every text is cut to
``MAX_CHARS_PER_TEXT`` characters as it is read; TXT, CSV/TSV and JSON-lines files are streamed (line
by line, or in pandas chunks) and a load stops past ``MAX_TOTAL_CHARS`` characters in all; the
formats read whole (a JSON array or object, Parquet) are refused above ``MAX_WHOLE_FILE_BYTES``.
"""
from __future__ import annotations

import codecs
import contextlib
import copy
import json
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

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

# Every text is cut to this many characters as it is read, and again before tokenising. A model reads
# at most max_len tokens (512 for BERT-likes, a few thousand for long-context models) and ordinary
# text averages about 4 characters per token, so 100,000 characters (~25,000 tokens) never change what
# a model sees. Without the cut a fast tokenizer builds tokens and offsets for the whole string before
# truncating: one 20 MB line took 3.1 GB.
MAX_CHARS_PER_TEXT = 100_000
# The loader keeps every text in memory: a load stops with an error past this many characters of text
# in all (0.5 to 2 GB as Python strings; GLUE's largest training set, MNLI, holds about 80 million).
MAX_TOTAL_CHARS = 500_000_000
# JSON arrays or objects and Parquet files are parsed whole (they cannot be streamed line by line), so
# they are refused above this size; CSV, TSV, JSON lines and TXT are streamed and have no such bound.
MAX_WHOLE_FILE_BYTES = 1 << 30
_CSV_CHUNK_ROWS = 10_000          # rows per pandas chunk: a few MB of a typical file at a time


@dataclass(frozen=True)
class TextData:
    """Texts with optional second texts (pair tasks) and optional integer labels (``>= 0``).

    ``label_names[i]`` is the original value (or class name) of label ``i``; ``None`` when the labels
    are integers without names (class ids as they are). ``labels_by_name`` is True when the labels
    only number ``label_names`` in sorted order (a file's string labels, or negative integers): then
    only the names mean anything to a model (``labels_for_model``), never the positions. ``source``
    says where the data came from, for reports.
    """

    texts: tuple[str, ...]
    text_pairs: tuple[str, ...] | None = None
    labels: tuple[int, ...] | None = None
    label_names: tuple[str, ...] | None = None
    source: str = ""
    labels_by_name: bool = False

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
        if self.labels_by_name and (self.labels is None or self.label_names is None):
            raise ValueError("labels_by_name needs labels and label_names")

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

    The text column defaults to ``text``, then ``sentence``, then the first column holding a string
    that is not a number. CSV/TSV cells are read verbatim (a text ``007`` or ``NA`` stays as written;
    only an empty cell is missing). Labels are read from ``label_column``, or from a column named
    exactly ``label`` / ``labels`` when present: integers ``>= 0`` are kept as class ids, strings and
    negative integers are numbered by sorted name (``labels_for_model`` matches either to a model).
    Every text is cut to ``MAX_CHARS_PER_TEXT`` characters; see the module docstring for the size bounds.
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
        texts = _read_txt(path)
        if not texts:
            raise ValueError(f"{path} holds only blank lines")
        return TextData(texts=texts, source=str(path))
    return _from_columns(_read_columns(path, suffix), {}, str(path), text_column, text_pair_column,
                         label_column, typed_labels=_READERS[suffix][1] != "csv")


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


class _Refused(ValueError):
    """A clear refusal from inside a reader (a size bound), passed through as it is."""


class _TextBudget:
    """Cuts every string cell to ``MAX_CHARS_PER_TEXT`` as it is read and stops the load once the
    texts kept pass ``MAX_TOTAL_CHARS`` in all (read at call time, so tests can lower them)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.total = 0

    def __call__(self, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        value = value[:MAX_CHARS_PER_TEXT]
        self.total += len(value)
        if self.total > MAX_TOTAL_CHARS:
            raise _Refused(f"{self.path} holds more than {MAX_TOTAL_CHARS:,} characters of text, more than "
                           "one load keeps in memory; use a sample of it (e.g. `shuf -n 100000`)")
        return value


def _read_txt(path: Path) -> tuple[str, ...]:
    """One stripped text per non-blank line, each line read at most ``MAX_CHARS_PER_TEXT`` at a time
    (the rest of a longer line is skipped without ever being held)."""
    budget = _TextBudget(path)
    texts = []
    with path.open(encoding="utf-8-sig") as fh:
        while line := fh.readline(MAX_CHARS_PER_TEXT):
            if not line.endswith("\n"):                 # cut (or the last line): skip to the next one
                while (rest := fh.readline(1 << 16)) and not rest.endswith("\n"):
                    pass
            if text := line.strip():
                texts.append(budget(text))
    return tuple(texts)


def _read_columns(path: Path, suffix: str) -> dict[str, list]:
    """One local file as plain columns (``{name: [value per row]}``), every string cut by a budget.

    Missing cells come back as ``None`` or NaN, as ``_from_columns`` expects. CSV/TSV cells are all
    read as text (``"007"`` stays ``"007"``; labels are typed later); JSON values keep the types the
    file gave them (no guessing of numbers or dates from strings).
    """
    kind, reader, options = _READERS[suffix]
    budget = _TextBudget(path)
    try:
        if reader == "csv":
            return _read_csv(path, options, budget)
        if reader == "json" and (options.get("lines") or _first_char(path) != "["):
            try:
                return _read_json_lines(path, budget)
            except _Refused:
                raise
            except ValueError:
                if suffix == ".jsonl":
                    raise
            # A .json file that is not JSON lines: one (possibly pretty-printed) object of columns.
        return _read_whole(path, reader, budget)
    except _Refused:
        raise
    except Exception as err:  # the parsers raise many exception types; all mean "not readable as X"
        first = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"could not read {path} as {kind}: {type(err).__name__}: {first}") from None


def _read_csv(path: Path, options: dict[str, Any], budget: _TextBudget) -> dict[str, list]:
    """A CSV/TSV file read ``_CSV_CHUNK_ROWS`` rows at a time, every cell as a string (only an empty
    cell is missing: a text "NA" or "null" is kept as written)."""
    import pandas as pd
    columns: dict[str, list] = {}
    with pd.read_csv(path, encoding="utf-8-sig", dtype=str, keep_default_na=False, na_values=[""],
                     chunksize=_CSV_CHUNK_ROWS, **options) as chunks:
        for frame in chunks:
            for name in frame.columns:
                columns.setdefault(str(name), []).extend(budget(v) for v in frame[name].tolist())
    return columns


def _read_json_lines(path: Path, budget: _TextBudget) -> dict[str, list]:
    """A JSON-lines file, one line at a time: each non-blank line one object (a row)."""
    columns: dict[str, list] = {}
    rows = 0
    with path.open(encoding="utf-8-sig") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ValueError(f"line {number} is not valid JSON ({err})") from None
            if not isinstance(record, dict):
                raise ValueError(f"line {number} is a JSON {type(record).__name__}, not an object of "
                                 "column values")
            for key in record:
                columns.setdefault(str(key), [None] * rows)
            for key, values in columns.items():
                values.append(budget(record.get(key)))
            rows += 1
    return columns


def _read_whole(path: Path, reader: str, budget: _TextBudget) -> dict[str, list]:
    """A JSON array or object, or a Parquet file: parsed whole, so refused above a size bound."""
    import pandas as pd
    size = path.stat().st_size
    if size > MAX_WHOLE_FILE_BYTES:
        raise _Refused(f"{path} is {size:,} bytes; a JSON array or Parquet file is read whole, so it must "
                       f"be at most {MAX_WHOLE_FILE_BYTES:,} bytes: convert it to JSON lines or CSV, which "
                       "are read in chunks")
    if reader == "parquet":
        frame = pd.read_parquet(path)
    else:
        # pandas < 3 also guesses dates in columns named like dates unless told not to; 3 deprecates that.
        options = {"dtype": False} if int(pd.__version__.split(".")[0]) >= 3 else {
            "dtype": False, "convert_dates": False}
        frame = pd.read_json(path, encoding="utf-8-sig", **options)
    return {str(name): [budget(v) for v in frame[name].tolist()] for name in frame.columns}


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
                  label_column: str | None, *, typed_labels: bool = True) -> TextData:
    """Build ``TextData`` from named columns; ``class_names`` holds ClassLabel names per column.

    ``typed_labels`` is False for CSV/TSV files, whose cells are all strings: their label cells are
    read as numbers where they are written as numbers (``"1"`` -> 1, ``"0.5"`` -> 0.5).
    """
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
        values = columns[label_col] if typed_labels else [_typed_cell(v) for v in columns[label_col]]
        labels, label_names = _map_labels(values, label_col, class_names.get(label_col),
                                          source, explicit=label_column is not None)
    by_name = label_names is not None and label_col not in class_names
    if text_column is None and text_col not in DEFAULT_TEXT_COLUMNS:     # a guess: say which column it took
        source = f"{source} (text from its column {text_col!r}: it has no {' or '.join(DEFAULT_TEXT_COLUMNS)} column)"
    return TextData(texts=texts, text_pairs=pairs, labels=labels, label_names=label_names, source=source,
                    labels_by_name=by_name)


_INT_CELL = re.compile(r"[+-]?\d+")
_FLOAT_CELL = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")


def _typed_cell(value: Any) -> Any:
    """A CSV cell as the number or truth value it spells (as pandas would type it), else as it is."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if _INT_CELL.fullmatch(text):
        return int(text)
    if _FLOAT_CELL.fullmatch(text):
        return float(text)
    return {"true": True, "false": False}.get(text.lower(), value)


def _default_text_column(columns: dict[str, list], source: str) -> str:
    """``text``, then ``sentence``, then the first column holding a string that is not a number (a
    column of numbers only, such as an id, is never a default text: name it with text_column)."""
    for name in DEFAULT_TEXT_COLUMNS:
        if name in columns:
            return name
    for name, values in columns.items():
        if any(isinstance(v, str) and isinstance(_typed_cell(v), str) for v in values[:100]):
            return name
    raise ValueError(f"{source} has no string column to use as text; available columns: "
                     f"{', '.join(columns)} (name one with text_column)")


def _text_values(values: list, column: str, source: str) -> tuple[str, ...]:
    """The column as texts, each cut to ``MAX_CHARS_PER_TEXT``; numbers are written as text (a CSV
    cell exactly as in the file, a JSON number as Python prints it)."""
    out = []
    for row, value in enumerate(values):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise ValueError(f"{source}: row {row} has no value in text column {column!r}")
        if not isinstance(value, str):
            if isinstance(value, (list, dict)):
                raise ValueError(f"{source}: column {column!r} holds {type(value).__name__} values, not "
                                 "text; name the text column with text_column")
            value = str(value)
        out.append(value[:MAX_CHARS_PER_TEXT])
    return tuple(out)


def _map_labels(values: list, column: str, class_names: list[str] | None, source: str,
                explicit: bool) -> tuple[tuple[int, ...] | None, tuple[str, ...] | None]:
    """Labels plus names: integers >= 0 as they are (class ids, no names); strings and negative
    integers numbered in sorted order with their values as names; ClassLabel ids with its names."""
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
            raise ValueError(f"{source}: row {row} has no value in label column {column!r}; give every "
                             "row a label or remove the unlabeled rows")
    if all(isinstance(v, bool) for v in values):
        values = [int(v) for v in values]
    elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        fractional = next((v for v in values if not math.isfinite(v) or float(v) != int(v)), None)
        if fractional is not None:
            raise ValueError(f"{source}: label column {column!r} holds non-integer numbers (e.g. "
                             f"{fractional}); only classification labels (integers or names) are supported")
        values = [int(v) for v in values]
    elif not all(isinstance(v, str) for v in values):
        kinds = sorted({type(v).__name__ for v in values})
        raise ValueError(f"{source}: label column {column!r} mixes value types ({', '.join(kinds)}); "
                         "labels must be all integers or all strings")
    if all(isinstance(v, int) and v >= 0 for v in values):
        return tuple(values), None                   # class ids as they are: never renumbered
    unique = sorted(set(values))
    index = {v: i for i, v in enumerate(unique)}
    return tuple(index[v] for v in values), tuple(str(v) for v in unique)


def _load_hub(name: str, config_name: str | None, split: str | None, text_column: str | None,
              text_pair_column: str | None, label_column: str | None) -> TextData:
    """A hub dataset split through ``datasets.load_dataset``, failing fast and clearly offline."""
    from . import hub
    label = f"{name}/{config_name}" if config_name else name
    if hub.hub_offline():
        import datasets
        if not datasets.config.HF_HUB_OFFLINE:
            # Offline was switched on after `datasets` was imported: it would still try the network.
            raise ValueError(f"HF_HUB_OFFLINE is set, so hub dataset {label!r} cannot be loaded; "
                             "use a local file")
    else:
        hub.check_hub(name, kind="dataset", what=f"load dataset {label!r}")
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


def labels_for_model(data: TextData, model_config: Any) -> TextData:
    """``data`` with its labels turned into the class ids of the model whose config is ``model_config``
    (its ``id2label``); see ``labels_for_classes``. Every caller that pairs labels with a model's
    predictions (the CLI's prune and evaluate, the app, fine-tuning's evaluation) goes through here."""
    if not data.has_labels:
        return data
    id2label = getattr(model_config, "id2label", None)
    if not id2label:
        raise ValueError(f"the model ({type(model_config).__name__}) has no id2label in its config, so "
                         "labels cannot be matched to its classes; use a sequence classifier")
    return labels_for_classes(data, id2label)


def labels_for_classes(data: TextData, id2label: Mapping[int, str]) -> TextData:
    """``data`` with every label replaced by the id of the class ``id2label`` gives it.

    A model has real class names unless they are the defaults ``LABEL_0, LABEL_1, ...``. Then:
    a named label (a string, a ClassLabel name) is matched to a class name (exactly, else ignoring
    case); an integer label (or a name spelling one) is the model's own class id, except that a model
    whose class names are themselves integers (fine-tuned here on labels ``-1``/``1`` it names its
    classes ``"-1"``, ``"1"``) is matched by name. A model without real names accepts only class ids
    (and ``LABEL_k`` names); a file's string labels cannot be matched to it. A label that matches no
    class raises ``ValueError`` naming it, the model's classes and what to do; nothing is renumbered.
    The result's ``label_names`` are the model's class names (None when it has none).
    """
    if not data.has_labels:
        return data
    classes = {int(i): str(name) for i, name in id2label.items()}
    named = any(name != f"LABEL_{i}" for i, name in classes.items())
    ids: dict[int, int] = {}
    for label in sorted(set(data.labels)):
        name = data.label_names[label] if data.label_names is not None else None
        found = _class_id(label, name, data.labels_by_name, classes, named)
        if found is None:
            raise ValueError(_unknown_label(data, label, name, classes, named))
        ids[label] = found
    in_order = sorted(classes) == list(range(len(classes)))
    names = tuple(classes[i] for i in range(len(classes))) if named and in_order else None
    return replace(data, labels=tuple(ids[y] for y in data.labels), label_names=names,
                   labels_by_name=False)


def _class_id(label: int, name: str | None, by_name: bool, classes: dict[int, str],
              named: bool) -> int | None:
    """The model class of one data label (its position ``label`` and its name, if any), or None."""
    number = label if name is None else _as_int(name)
    if named:
        found = _match_name(name, classes) if name is not None else None
        if found is None and number is not None:
            found = (_match_name(str(number), classes) if _integer_names(classes)
                     else number if number in classes else None)
        return found
    if name is not None and name in {f"LABEL_{i}": i for i in classes}:
        return int(name[len("LABEL_"):])
    if not by_name:              # ids given with the data (plain integers, a ClassLabel, the demo)
        number = label
    return number if number is not None and number in classes else None


def _match_name(name: str, classes: dict[int, str]) -> int | None:
    exact = [i for i, n in classes.items() if n == name]
    if exact:
        return exact[0]
    folded = [i for i, n in classes.items() if n.casefold() == name.casefold()]
    return folded[0] if len(folded) == 1 else None


def _as_int(text: str) -> int | None:
    return int(text) if _INT_CELL.fullmatch(text.strip()) else None


def _integer_names(classes: dict[int, str]) -> bool:
    return all(_as_int(n) is not None for n in classes.values())


def _unknown_label(data: TextData, label: int, name: str | None, classes: dict[int, str],
                   named: bool) -> str:
    shown = label if name is None else (_as_int(name) if _as_int(name) is not None else name)
    listed = [f"{i}={n}" if named else str(i) for i, n in sorted(classes.items())]
    listed = listed[:10] + (["..."] if len(listed) > 10 else [])
    ids = f"0-{len(classes) - 1}"
    if not named and isinstance(shown, str):
        advice = (f"its classes have no names, so give the labels as its class ids {ids} (or add "
                  "id2label and label2id to its config.json)")
    else:
        advice = (f"use the labels the model was trained on (its class ids {ids}"
                  f"{' or names' if named else ''}), or a model trained for this data")
    return (f"{data.source or 'the data'}: label {shown!r} is not one of the model's {len(classes)} "
            f"{'classes' if named else 'unnamed classes'} "
            f"({', '.join(listed)}); {advice}")


def training_classes(train: TextData) -> TextData:
    """Training data whose labels define a fresh head's classes: integer labels that are not already
    ``0..C-1`` (e.g. ``1``/``2``) become classes named ``"1"``, ``"2"`` (so the saved model matches
    the same file by name later); named labels and ``0..C-1`` are kept as they are."""
    if not train.has_labels or train.label_names is not None or not train.labels:
        return train
    unique = sorted(set(train.labels))
    if unique == list(range(len(unique))):
        return train
    index = {v: i for i, v in enumerate(unique)}
    return replace(train, labels=tuple(index[y] for y in train.labels),
                   label_names=tuple(str(v) for v in unique), labels_by_name=True)



# --------------------------------------------------------------------------- batches

def make_batches(data: TextData, tokenizer, *, max_len: int = 128, batch_size: int = 32,
                 with_labels: bool = True) -> list[dict[str, torch.Tensor]]:
    """Tokenize ``data`` in order into batches padded to each batch's longest sequence.

    Keys are whatever the tokenizer returns (``input_ids``, ``attention_mask``, ``token_type_ids``)
    plus ``labels`` (int64) when ``with_labels`` and the data has labels: class ids, so labels that
    only number their names (``labels_by_name``) are refused until ``labels_for_model`` has mapped
    them. Texts are cut to ``MAX_CHARS_PER_TEXT`` characters before tokenising. A tokenizer without a
    pad token (GPT-2) is copied and given its end-of-text token as pad; the caller's is never changed.
    """
    for name, value in (("max_len", max_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if len(data) == 0:
        raise ValueError("no texts to tokenize: the data is empty")
    if with_labels and data.labels_by_name:
        raise ValueError(f"the labels of {data.source or 'the data'} are names "
                         f"({', '.join(data.label_names[:5])}), not a model's class ids; map them with "
                         "kcm_core.data.labels_for_model(data, model.config) first")
    tokenizer = _with_pad_token(tokenizer)
    batches = []
    for start in range(0, len(data), batch_size):
        stop = start + batch_size
        pairs = list(data.text_pairs[start:stop]) if data.text_pairs is not None else None
        # Cut before tokenising: the tokenizer would otherwise split a huge text whole (MAX_CHARS_PER_TEXT).
        texts = [t[:MAX_CHARS_PER_TEXT] for t in data.texts[start:stop]]
        if pairs is not None:
            texts, pairs = _fit_pairs(tokenizer, texts, [t[:MAX_CHARS_PER_TEXT] for t in pairs], max_len)
        enc = tokenizer(texts, pairs, padding="longest", truncation=True, max_length=max_len,
                        return_tensors="pt")
        batch = {k: v for k, v in enc.items()}
        if with_labels and data.labels is not None:
            batch["labels"] = torch.tensor(data.labels[start:stop], dtype=torch.long)  # (B,)
        batches.append(batch)
    return batches


def _fit_pairs(tokenizer, texts: list[str], pairs: list[str], max_len: int) -> tuple[list[str], list[str]]:
    """Both sides of each pair cut to what the tokenizer's ``longest_first`` truncation keeps of them.

    Why: a fast tokenizer truncating a pair itself builds an overflow piece for every token it
    removes, so time and memory grow with the square of the length (two 100,000-character texts took
    over 20 GB). Cut here first, it removes at most a token at a boundary, and the result is the same.
    Slow tokenizers (no offsets) are left to truncate as they always have.
    """
    budget = max_len - tokenizer.num_special_tokens_to_add(pair=True)
    if not getattr(tokenizer, "is_fast", False) or budget < 2:
        return texts, pairs
    first, second = _token_ends(tokenizer, texts, max_len), _token_ends(tokenizer, pairs, max_len)
    cut_texts, cut_pairs = [], []
    for text, pair, ends_a, ends_b in zip(texts, pairs, first, second):
        keep_a, keep_b = _longest_first(len(ends_a), len(ends_b), budget)
        cut_texts.append(_cut_at(text, ends_a, keep_a, max_len))
        cut_pairs.append(_cut_at(pair, ends_b, keep_b, max_len))
    return cut_texts, cut_pairs


def _token_ends(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    """Character end of each of the first ``max_len`` tokens of every text (one sequence at a time,
    which truncates cheaply; lengths capped at ``max_len`` decide the pair rule just as well)."""
    enc = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_len,
                    return_offsets_mapping=True)
    return [[end for _, end in offsets] for offsets in enc["offset_mapping"]]


def _longest_first(a: int, b: int, budget: int) -> tuple[int, int]:
    """Tokens kept of a pair of ``a`` and ``b`` tokens under ``longest_first`` (the rule of Hugging
    Face ``tokenizers``: the shorter side whole if it fits in half, else both cut to about half)."""
    n1, n2, swap = (b, a, True) if a > b else (a, b, False)
    n2 = n1 if n1 > budget else max(n1, budget - n1)
    if n1 + n2 > budget:
        n1 = budget // 2
        n2 = n1 + budget % 2
    if swap:
        n1, n2 = n2, n1
    return min(a, n1), min(b, n2)


def _cut_at(text: str, ends: list[int], keep: int, max_len: int) -> str:
    if keep >= len(ends) and len(ends) < max_len:     # all of its tokens are kept
        return text
    return text[:ends[keep - 1]] if keep > 0 else ""


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
