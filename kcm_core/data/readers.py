"""Readers: each data source as plain columns (``{name: [value per row]}``) or lines, within size budgets.

A local CSV / TSV / JSON / JSONL / Parquet file through ``pandas`` (or line by line), a ``.txt`` file
one text per line, a Hugging Face hub dataset split through ``datasets`` (after one short probe of the
hub: ``kcm_core.hub``). What the columns mean (which holds the text, which the labels) is
``kcm_core.data.loading``'s business, not the readers'.

Size bounds (why: a 20 MB one-line file once took 3.1 GB): every text is cut to
``MAX_CHARS_PER_TEXT`` characters as it is read; TXT, CSV/TSV and JSON-lines files are streamed (line
by line, or in pandas chunks) and a load stops past ``MAX_TOTAL_CHARS`` characters in all; the
formats read whole (a JSON array or object, Parquet) are refused above ``MAX_WHOLE_FILE_BYTES``.
"""
from __future__ import annotations

import codecs
import contextlib
import json
import re
from pathlib import Path
from typing import Any, Iterator

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
# CSV and TSV cells are all read as text ("007" stays "007"); a label column is typed later (typed_cell).
TEXT_CELL_SUFFIXES = (".csv", ".tsv")

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


# --------------------------------------------------------------------------- local files

def check_file(path: Path) -> None:
    """``ValueError`` unless ``path`` has a suffix we read, is not empty and (a text format) is UTF-8."""
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(f"cannot read {path.name}: unsupported file type {suffix or '(none)'!r}; "
                         f"use one of {', '.join(SUPPORTED_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): choose a file with one text per row")
    if suffix in _TEXT_SUFFIXES:
        _check_utf8(path)


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


def read_lines(path: Path) -> tuple[str, ...]:
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


def read_columns(path: Path) -> dict[str, list]:
    """One local file (not ``.txt``) as plain columns (``{name: [value per row]}``), every string cut
    by a budget.

    Missing cells come back as ``None`` or NaN. CSV/TSV cells are all read as text (``"007"`` stays
    ``"007"``; labels are typed later, ``typed_cell``); JSON values keep the types the file gave them
    (no guessing of numbers or dates from strings).
    """
    suffix = path.suffix.lower()
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


# --------------------------------------------------------------------------- cells

INT_CELL = re.compile(r"[+-]?\d+")
FLOAT_CELL = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")


def typed_cell(value: Any) -> Any:
    """A CSV cell as the number or truth value it spells (as pandas would type it), else as it is."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if INT_CELL.fullmatch(text):
        return int(text)
    if FLOAT_CELL.fullmatch(text):
        return float(text)
    return {"true": True, "false": False}.get(text.lower(), value)


# --------------------------------------------------------------------------- the hub

def read_hub(name: str, config_name: str | None = None,
             split: str | None = None) -> tuple[dict[str, list], dict[str, list[str]], str]:
    """A hub dataset split through ``datasets.load_dataset``, failing fast and clearly offline:
    (its columns, the class names of each ``ClassLabel`` column, a source line for reports)."""
    import datasets
    loaded, source = hub_dataset(name, config_name, split)
    class_names = {col: list(feat.names) for col, feat in loaded.features.items()
                   if isinstance(feat, datasets.ClassLabel)}
    return loaded.to_dict(), class_names, source


def hub_dataset(name: str, config_name: str | None = None, split: str | None = None):
    """(one split of a hub dataset as a ``datasets.Dataset``, a source line for reports), through
    ``datasets.load_dataset``, failing fast and clearly offline; a dataset with several splits and no
    ``split`` is refused with their names."""
    from .. import hub
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
    with quiet_datasets():
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
    return loaded, f"hub:{label}" + (f" [{split}]" if split else "")


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Silence ``datasets`` progress bars for the block (the library never prints), then restore."""
    import datasets
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
