"""Where the model and the data come from: hashable choices, environment defaults, fingerprints.

``KCM_APP_MODEL=<folder>`` and ``KCM_APP_DATA=<file>`` start the app on a local model and data file
instead of the embedded demo (the tests use them with a tiny model); ``KCM_APP_MODEL=demo-lm`` starts it
on the LM demo (model and documents; ``demo`` names the classifier demo, ``demo-vision`` the image demo;
``KCM_APP_DATA`` may name a folder of images, one sub-folder per class). ``KCM_APP_TEXT_COLUMN`` and
``KCM_APP_LABEL_COLUMN`` name the file's columns (default: ``text``/``sentence`` and ``label``);
``KCM_APP_BLOCK_SIZE`` sets a language model's starting block size; ``KCM_APP_STREAM=1`` opens the
local folder layer by layer (``kcm_core.streamed.passes``: for a model larger than memory). Loading itself goes through
``kcm_core.models``, ``kcm_core.data``, ``kcm_core.demos.classifier`` and ``kcm_core.demos.lm``.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import stat
import tempfile
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import torch

MODEL_KINDS = {"demo": "Classifier demo (MiniLM, sentence polarity)",
               "demo-lm": "LM demo (SmolLM2-135M, movie reviews)",
               "demo-vision": "Vision demo (DINOv2-S ViT, Fashion-MNIST)",
               "folder": "Local folder", "hub": "Hugging Face hub id"}
DEMO_KINDS = ("demo", "demo-lm", "demo-vision")
DATA_KINDS = {"demo": "Classifier demo split", "demo-lm": "LM demo documents", "demo-vision": "Vision demo images",
              "file": "File on this machine", "upload": "Upload a file",
              "images": "Upload images (a zip or files)", "hub": "Hub dataset"}
UPLOAD_KINDS = ("upload", "images")     # written by this server process into its private upload folder
EVAL_LIMIT = 800            # test sentences (the demo's test split has exactly 800)
BATCH_SIZE = 32

# Causal language models in the app: text becomes blocks of LM_BLOCK_SIZE tokens. Sized for a new
# budget to evaluate in well under a minute on two CPU cores with the 135M-parameter LM demo (the CLI
# uses 32 calibration blocks and scales on 8: kcm_core.cli.lm): 16 calibration blocks to score with
# (4,096 tokens), scales fitted on the first 4 (the scaling fit grows with tokens x kept neurons^2),
# perplexity, agreement and KL on 8 held-out blocks (2,048 tokens, each run through the pruned and the
# unpruned model).
LM_BLOCK_SIZE = 256
LM_CALIBRATION_BLOCKS = 16
LM_SCALE_BLOCKS = 4
LM_EVAL_BLOCKS = 8
LAYERWISE_SUFFIX = "#layer-by-layer"   # a model key's mark for a folder opened layer by layer
LM_BATCH = 4                # blocks per forward pass (logits take B x block x vocabulary floats)


@dataclass(frozen=True)
class ModelChoice:
    kind: str = "demo"       # demo | folder | hub
    ref: str = ""            # folder path or hub id (empty for the demo)
    stream: bool = False     # a local folder opened layer by layer (never whole in memory)

    def __post_init__(self):
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model source must be one of {', '.join(MODEL_KINDS)}, got {self.kind!r}")
        if self.kind not in DEMO_KINDS and not self.ref.strip():
            raise ValueError(f"name the {MODEL_KINDS[self.kind].lower()} to load")
        if self.stream and self.kind != "folder":
            raise ValueError("only a local folder opens layer by layer (its safetensors files are read one "
                             "layer at a time); download a hub model to a folder first")

    def describe(self) -> str:
        where = MODEL_KINDS[self.kind] if self.kind in DEMO_KINDS else f"{MODEL_KINDS[self.kind]}: {self.ref}"
        return where + (" (layer by layer)" if self.stream else "")


@dataclass(frozen=True)
class DataChoice:
    kind: str = "demo"                  # demo | file | upload | images | hub (an upload is saved as a
                                        # file, uploaded images as a folder: kcm_app.image_uploads)
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
        if self.kind == "images" and not self.ref.strip():
            raise ValueError("no images uploaded yet: drop a zip of an image folder (one sub-folder per class; "
                             "images without sub-folders are unlabeled) or a few image files on the uploader")
        if self.kind not in DEMO_KINDS and not self.ref.strip():
            raise ValueError(f"name the {DATA_KINDS[self.kind].lower()} to read")

    def describe(self) -> str:
        return DATA_KINDS[self.kind] if self.kind in DEMO_KINDS else f"{DATA_KINDS[self.kind]}: {self.ref}"


@dataclass(frozen=True)
class SampleChoice:
    """How the unlabeled scoring sample is drawn and tokenised. For a causal language model ``size``
    counts calibration blocks and ``max_len`` is the block size (tokens per block)."""

    size: int = 512
    max_len: int = 128
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.size, int) and self.size >= 1):
            raise ValueError(f"sample size must be a positive integer, got {self.size!r}")
        if not (isinstance(self.max_len, int) and self.max_len >= 8):
            raise ValueError(f"sequence length must be an integer >= 8, got {self.max_len!r}")

    def fitted(self, positions: int | None) -> SampleChoice:
        """This choice with ``max_len`` shortened to a model's ``positions`` (None: no limit); longer
        inputs would crash the model's forward pass."""
        if positions is None or self.max_len <= positions:
            return self
        return replace(self, max_len=positions)


def max_len_choices(lengths: Sequence[int], positions: int | None) -> list[int]:
    """The slider's lengths that a model with ``positions`` takes, ending at ``positions`` itself when
    it falls between two of them (100 positions: 32, 64, 100); all of them for a model without a limit."""
    if positions is None:
        return list(lengths)
    fit = [n for n in lengths if n <= positions]
    if positions < max(lengths) and positions not in fit:
        fit.append(positions)
    return fit


def nearest_choice(value: int, choices: Sequence[int]) -> int:
    """``value`` when it is a choice, else the longest choice below it (the shortest if none is)."""
    return max((c for c in choices if c <= value), default=min(choices))


def env_defaults(environ: Mapping[str, str] = os.environ) -> tuple[ModelChoice, DataChoice]:
    """The start-up model and data: the classifier demo, unless the ``KCM_APP_*`` variables name
    others (``KCM_APP_MODEL=demo-lm``: the LM demo with its documents)."""
    name = (environ.get("KCM_APP_MODEL") or "").strip()
    stream = (environ.get("KCM_APP_STREAM") or "").strip().lower() in ("1", "true", "yes")
    model = (ModelChoice(name) if name in DEMO_KINDS else ModelChoice("folder", name, stream=stream) if name
             else ModelChoice())
    if environ.get("KCM_APP_DATA"):
        data = DataChoice("file", environ["KCM_APP_DATA"],
                          text_column=environ.get("KCM_APP_TEXT_COLUMN") or None,
                          label_column=environ.get("KCM_APP_LABEL_COLUMN") or None)
    else:
        data = DataChoice(model.kind if model.kind in ("demo-lm", "demo-vision") else "demo")
    return model, data


def env_block_size(environ: Mapping[str, str] = os.environ) -> int:
    """The starting block size for language models (``KCM_APP_BLOCK_SIZE``, default ``LM_BLOCK_SIZE``)."""
    text = (environ.get("KCM_APP_BLOCK_SIZE") or "").strip()
    if not text:
        return LM_BLOCK_SIZE
    if not text.isdigit() or int(text) < 8:
        raise ValueError(f"KCM_APP_BLOCK_SIZE must be an integer of at least 8 tokens, got {text!r}")
    return int(text)


def model_key(choice: ModelChoice, resolved_path: str | None = None) -> str:
    """A cache key for a model: its source, plus the config's modification time for folders (so a
    folder saved again is loaded again)."""
    key = f"{choice.kind}:{choice.ref}"
    if resolved_path and Path(resolved_path, "config.json").exists():
        key += f"@{Path(resolved_path, 'config.json').stat().st_mtime_ns}"
    return key + (LAYERWISE_SUFFIX if choice.stream else "")


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


_uploads: Path | None = None


def _private(folder: Path) -> bool:
    """Still our own 0700 folder (a temp cleaner may have removed it, someone may have replaced it)."""
    try:
        info = folder.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o077


def upload_dir() -> Path:
    """This server process's private upload folder: made once with ``mkdtemp`` (mode 0700, a fresh
    unguessable name, so no other local user can pre-create or read what lands there) and removed
    when the process exits."""
    global _uploads
    if _uploads is None or not _private(_uploads):
        _uploads = Path(tempfile.mkdtemp(prefix="kcm-uploads-"))
        atexit.register(shutil.rmtree, _uploads, ignore_errors=True)
    return _uploads


def is_upload(path: str | os.PathLike) -> bool:
    """True for a file that ``upload_path`` wrote into ``upload_dir()`` (or the folder that
    ``kcm_app.image_uploads.image_upload_folder`` wrote there)."""
    return _uploads is not None and Path(path).resolve().parent.parent == _uploads.resolve()


def upload_path(name: str, content: bytes, folder: Path) -> Path:
    """Where an uploaded file is kept: a folder named by its content hash (same upload, same path)
    holding the file under its own name, so messages about it name what the user uploaded. Folders
    are made 0700 and the file 0600: an upload is one user's data."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name).strip("._") or "upload"
    if not Path(base).suffix:
        base += ".txt"
    path = folder / hashlib.sha1(content).hexdigest()[:16] / base
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
        # O_EXCL: never write through a file or link someone else put there first
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            tmp.replace(path)                      # a reader never sees a half-written upload
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path
