"""Loading: a file path or a hub dataset name in, ``TextData`` out.

``load_text_data`` tells a local file from a hub id, has ``kcm_core.data.readers`` read it into plain
columns, and decides what they mean: which column is the text (``text``, ``sentence``, else the first
column of words), which the second text, which the labels (``kcm_core.data.labels.label_ids``).
"""
from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

from . import readers
from .labels import label_ids
from .text_data import TextData

DEFAULT_TEXT_COLUMNS = ("text", "sentence")
DEFAULT_LABEL_COLUMNS = ("label", "labels")


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
    Every text is cut to ``MAX_CHARS_PER_TEXT`` characters; ``kcm_core.data.readers`` says the size bounds.
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
        raise ValueError(f"{source} is a folder; give a data file ({', '.join(readers.SUPPORTED_SUFFIXES)})")
    if path.is_file():
        data = _load_local(path, text_column, text_pair_column, label_column)
    elif looks_like_path(source):
        raise ValueError(f"no data file at {source}; give an existing {'/'.join(readers.SUPPORTED_SUFFIXES)} "
                         "file or a hub dataset name")
    else:
        columns, class_names, read_from = readers.read_hub(source, config_name, split)
        data = _from_columns(columns, class_names, read_from, text_column, text_pair_column, label_column)
    if limit is not None and limit < len(data):
        data = replace(data.sample(limit, seed),
                       source=f"{data.source} (random {limit} of {len(data)}, seed {seed})")
    return data


def looks_like_path(source: str) -> bool:
    """True for strings that can only mean a local file (a suffix we read, a separator we know)."""
    if Path(source).suffix.lower() in readers.SUPPORTED_SUFFIXES or source.startswith((".", "/", "~", "\\")):
        return True
    head = source.split("/")[0]
    return len(source.split("/")) > 2 or (head != source and Path(head).is_dir())


def _load_local(path: Path, text_column: str | None, text_pair_column: str | None,
                label_column: str | None) -> TextData:
    readers.check_file(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        if text_pair_column or label_column:
            raise ValueError(f"{path.name} is a plain text file (one text per line): it has no columns, "
                             "so text_pair_column and label_column cannot be used")
        texts = readers.read_lines(path)
        if not texts:
            raise ValueError(f"{path} holds only blank lines")
        return TextData(texts=texts, source=str(path))
    return _from_columns(readers.read_columns(path), {}, str(path), text_column, text_pair_column,
                         label_column, typed_labels=suffix not in readers.TEXT_CELL_SUFFIXES)


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
        values = columns[label_col] if typed_labels else [readers.typed_cell(v) for v in columns[label_col]]
        labels, label_names = label_ids(values, label_col, class_names.get(label_col),
                                        source, explicit=label_column is not None)
    by_name = label_names is not None and label_col not in class_names
    if text_column is None and text_col not in DEFAULT_TEXT_COLUMNS:     # a guess: say which column it took
        source = f"{source} (text from its column {text_col!r}: it has no {' or '.join(DEFAULT_TEXT_COLUMNS)} column)"
    return TextData(texts=texts, text_pairs=pairs, labels=labels, label_names=label_names, source=source,
                    labels_by_name=by_name)



def _default_text_column(columns: dict[str, list], source: str) -> str:
    """``text``, then ``sentence``, then the first column holding a string that is not a number (a
    column of numbers only, such as an id, is never a default text: name it with text_column)."""
    for name in DEFAULT_TEXT_COLUMNS:
        if name in columns:
            return name
    for name, values in columns.items():
        if any(isinstance(v, str) and isinstance(readers.typed_cell(v), str) for v in values[:100]):
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
        out.append(value[:readers.MAX_CHARS_PER_TEXT])
    return tuple(out)
