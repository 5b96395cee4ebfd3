"""Text data in, tokenized batches out; one module per step, every public name importable from here.

- ``text_data``: ``TextData`` (plain tuples of texts, optional second texts and integer labels; small
  enough to hold in memory, hashable enough to cache on) and the seeded subset every caller draws
  (``TextData.sample``, ``seeded_indices``).
- ``readers``: a local CSV / TSV / JSON / JSONL / Parquet / TXT file (through ``pandas``, or line by
  line) or a hub dataset split (through ``datasets``) as plain columns, within the size bounds
  (``MAX_CHARS_PER_TEXT``, ``MAX_TOTAL_CHARS``, ``MAX_WHOLE_FILE_BYTES``: set them there, they are read
  at call time).
- ``loading``: ``load_text_data``, a path or a hub name to ``TextData``: which column is the text,
  which the labels.
- ``labels``: a label column as class ids (and names), and those ids matched to a model's classes
  (``labels_for_model``) before they meet its predictions.
- ``batches``: ``make_batches`` (tokenized, dynamically padded ``dict[str, Tensor]`` batches) and
  ``mean_length``.
"""
from .batches import make_batches, mean_length
from .labels import (align_labels, check_labels_for_model, label_ids, labels_for_classes, labels_for_model,
                     training_classes)
from .loading import DEFAULT_LABEL_COLUMNS, DEFAULT_TEXT_COLUMNS, load_text_data
from .readers import MAX_CHARS_PER_TEXT, MAX_TOTAL_CHARS, MAX_WHOLE_FILE_BYTES, SUPPORTED_SUFFIXES
from .text_data import TextData, seeded_indices

__all__ = [
    "DEFAULT_LABEL_COLUMNS", "DEFAULT_TEXT_COLUMNS", "MAX_CHARS_PER_TEXT", "MAX_TOTAL_CHARS",
    "MAX_WHOLE_FILE_BYTES", "SUPPORTED_SUFFIXES", "TextData", "align_labels", "check_labels_for_model",
    "label_ids", "labels_for_classes", "labels_for_model", "load_text_data", "make_batches", "mean_length",
    "seeded_indices", "training_classes",
]
