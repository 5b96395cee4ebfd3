"""Where the model and the data come from: hashable choices, environment defaults, fingerprints.

``KCM_APP_MODEL=<folder>`` and ``KCM_APP_DATA=<file>`` start the app on a local model and data file
instead of the embedded demo (the tests use them with a tiny model); ``KCM_APP_TEXT_COLUMN`` and
``KCM_APP_LABEL_COLUMN`` name the file's columns (default: ``text``/``sentence`` and ``label``). Loading itself goes through ``kcm_core.models``,
``kcm_core.data`` and ``kcm_core.demo``.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

MODEL_KINDS = {"demo": "Embedded demo", "folder": "Local folder", "hub": "Hugging Face hub id"}
DATA_KINDS = {"demo": "Demo split", "file": "File on this machine", "upload": "Upload a file",
              "hub": "Hub dataset"}
EVAL_LIMIT = 800            # test sentences (the demo's test split has exactly 800)
BATCH_SIZE = 32


@dataclass(frozen=True)
class ModelChoice:
    kind: str = "demo"       # demo | folder | hub
    ref: str = ""            # folder path or hub id (empty for the demo)

    def __post_init__(self):
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model source must be one of {', '.join(MODEL_KINDS)}, got {self.kind!r}")
        if self.kind != "demo" and not self.ref.strip():
            raise ValueError(f"name the {MODEL_KINDS[self.kind].lower()} to load")

    def describe(self) -> str:
        return MODEL_KINDS[self.kind] if self.kind == "demo" else f"{MODEL_KINDS[self.kind]}: {self.ref}"


@dataclass(frozen=True)
class DataChoice:
    kind: str = "demo"                  # demo | file | upload | hub (an upload is saved as a file)
    ref: str = ""
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    split: str | None = None
    config_name: str | None = None

    def __post_init__(self):
        if self.kind not in DATA_KINDS:
            raise ValueError(f"data source must be one of {', '.join(DATA_KINDS)}, got {self.kind!r}")
        if self.kind == "upload" and not self.ref.strip():
            raise ValueError("no file uploaded yet: drop a CSV, TSV, JSON, JSONL, Parquet or TXT file on the "
                             "uploader (one text per row; a label column enables accuracy)")
        if self.kind != "demo" and not self.ref.strip():
            raise ValueError(f"name the {DATA_KINDS[self.kind].lower()} to read")

    def describe(self) -> str:
        return DATA_KINDS[self.kind] if self.kind == "demo" else f"{DATA_KINDS[self.kind]}: {self.ref}"


@dataclass(frozen=True)
class SampleChoice:
    """How the unlabeled scoring sample is drawn and tokenised."""

    size: int = 512
    max_len: int = 128
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.size, int) and self.size >= 1):
            raise ValueError(f"sample size must be a positive integer, got {self.size!r}")
        if not (isinstance(self.max_len, int) and self.max_len >= 8):
            raise ValueError(f"sequence length must be an integer >= 8, got {self.max_len!r}")


def env_defaults(environ: Mapping[str, str] = os.environ) -> tuple[ModelChoice, DataChoice]:
    """The start-up model and data: the demo, unless the ``KCM_APP_*`` variables name others."""
    model = ModelChoice("folder", environ["KCM_APP_MODEL"]) if environ.get("KCM_APP_MODEL") else ModelChoice()
    if environ.get("KCM_APP_DATA"):
        data = DataChoice("file", environ["KCM_APP_DATA"],
                          text_column=environ.get("KCM_APP_TEXT_COLUMN") or None,
                          label_column=environ.get("KCM_APP_LABEL_COLUMN") or None)
    else:
        data = DataChoice()
    return model, data


def model_key(choice: ModelChoice, resolved_path: str | None = None) -> str:
    """A cache key for a model: its source, plus the config's modification time for folders (so a
    folder saved again is loaded again)."""
    key = f"{choice.kind}:{choice.ref}"
    if resolved_path and Path(resolved_path, "config.json").exists():
        key += f"@{Path(resolved_path, 'config.json').stat().st_mtime_ns}"
    return key


def batches_fingerprint(*groups: Sequence[Mapping[str, torch.Tensor]] | None) -> str:
    """A short hash of every tensor in the batch groups (token ids, masks, labels) and their order."""
    h = hashlib.sha1()
    for group in groups:
        h.update(b"|group|" if group is not None else b"|none|")
        for batch in group or ():
            for name in sorted(batch):
                t = batch[name]
                h.update(name.encode())
                h.update(str(tuple(t.shape)).encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def upload_path(name: str, content: bytes, folder: Path) -> Path:
    """Where an uploaded file is kept: a folder named by its content hash (same upload, same path)
    holding the file under its own name, so messages about it name what the user uploaded."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name).strip("._") or "upload"
    if not Path(base).suffix:
        base += ".txt"
    path = folder / hashlib.sha1(content).hexdigest()[:16] / base
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(content)
        tmp.replace(path)                          # a reader never sees a half-written upload
    return path
