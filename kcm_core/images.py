"""Image data in, ``pixel_values`` batches out.

``load_image_data`` reads one of three layouts into an ``ImageData`` (file paths plus optional labels):

- a folder with one sub-folder per class (the common "ImageFolder" layout): the sub-folder names are the
  class names;
- a folder of images without class sub-folders: unlabeled images (enough for scoring and the scaling
  step; accuracy needs labels);
- a CSV / TSV / JSON lines / Parquet table with an image-path column (paths relative to the table's
  folder) and an optional label column.

``ImageData`` is a ``TextData`` whose "texts" are the image files, so the seeded ``sample``, ``subset``
and the label matching of ``kcm_core.data`` (``labels_for_model``: class names to the model's ids, or a
clear refusal naming the label) apply to images unchanged. ``image_batches`` opens the files and lets
the model's own image processor resize and normalise them: the processor, not this module, decides
the model's input size and statistics.

Bad input is a ``ValueError`` naming the file: a file that is not a readable image, a path that does
not exist, a folder with no images. Files without an image suffix inside a folder (a README, a
``.DS_Store``) are skipped, and their number is stated in ``ImageData.source``. Images whose colour mode
differs from what the model reads (greyscale for an RGB model, RGBA, palette) are converted, and
``image_batches`` says how many through its progress callback.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .data import TextData
from .runtime import Progress, tell

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
DEFAULT_IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filename")
DEFAULT_LABEL_COLUMNS = ("label", "labels", "class")


@dataclass(frozen=True)
class ImageData(TextData):
    """Images as file paths (held in ``texts``, also named ``paths``) with optional labels: see
    ``TextData`` for the labels' conventions. Nothing is decoded until ``image_batches``."""

    @property
    def paths(self) -> tuple[str, ...]:
        return self.texts


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def load_image_data(source: str | os.PathLike, *, image_column: str | None = None,
                    label_column: str | None = None) -> ImageData:
    """``source`` (a folder or a table file, see the module docstring) as ``ImageData``."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _from_folder(path)
    if not path.exists():
        raise ValueError(f"image data {source} does not exist")
    if path.suffix.lower() in TABLE_SUFFIXES:
        return _from_table(path, image_column, label_column)
    if is_image_file(path):
        return ImageData(texts=(str(path),), source=f"image {path}")
    raise ValueError(f"{source} is neither a folder of images nor a table ({', '.join(TABLE_SUFFIXES)}) "
                     "with an image-path column")


def _from_folder(folder: Path) -> ImageData:
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
    class_dirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    loose = [p for p in entries if p.is_file() and not p.name.startswith(".")]
    loose_images = [p for p in loose if is_image_file(p)]
    if class_dirs and loose_images:
        raise ValueError(f"{folder} holds both class sub-folders ({class_dirs[0].name}, ...) and loose images "
                         f"({loose_images[0].name}, ...): put every image in its class folder, or use a "
                         "folder without sub-folders for unlabeled images")
    if not class_dirs:
        if not loose_images:
            raise ValueError(f"{folder} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
        source = f"unlabeled images in {folder} ({len(loose_images)} images{_skipped(loose, loose_images)})"
        return ImageData(texts=tuple(str(p) for p in loose_images), source=source)
    paths, labels, skipped = [], [], 0
    for label, class_dir in enumerate(class_dirs):
        files = sorted((p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith(".")),
                       key=lambda p: p.relative_to(class_dir).as_posix())
        images = [p for p in files if is_image_file(p)]
        if not images:
            raise ValueError(f"class folder {class_dir} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
        skipped += len(files) - len(images)
        paths += [str(p) for p in images]
        labels += [label] * len(images)
    skipped += len(loose)
    note = f", skipped {skipped} files that are not images" if skipped else ""
    source = f"image folder {folder} ({len(paths)} images in {len(class_dirs)} classes{note})"
    return ImageData(texts=tuple(paths), labels=tuple(labels), label_names=tuple(p.name for p in class_dirs),
                     source=source, labels_by_name=True)


def _skipped(files: Sequence[Path], images: Sequence[Path]) -> str:
    n = len(files) - len(images)
    return f", skipped {n} files that are not images" if n else ""


def _from_table(path: Path, image_column: str | None, label_column: str | None) -> ImageData:
    import pandas as pd
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif suffix in (".json", ".jsonl"):
            frame = pd.read_json(path, lines=suffix == ".jsonl")
        else:
            frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    except Exception as err:  # pandas and pyarrow raise many types for a broken file
        raise ValueError(f"{path} cannot be read as {suffix[1:].upper()} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    column = _pick_column(frame.columns, image_column, DEFAULT_IMAGE_COLUMNS, "image-path", path, "--image-column")
    label = _pick_column(frame.columns, label_column, DEFAULT_LABEL_COLUMNS, "label", path, "--label-column",
                         required=label_column is not None)
    paths = []
    for row, value in enumerate(frame[column].tolist()):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{path}, row {row + 1}: column {column!r} holds {value!r}, not an image path")
        image = Path(value).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise ValueError(f"{path}, row {row + 1}: image file {image} does not exist")
        paths.append(str(image))
    if not paths:
        raise ValueError(f"{path} has no rows: no images to read")
    if label is None:
        return ImageData(texts=tuple(paths), source=f"{path} ({len(paths)} unlabeled images)")
    values = frame[label].tolist()
    if any(v is None or (isinstance(v, float) and v != v) for v in values):
        row = next(i for i, v in enumerate(values) if v is None or (isinstance(v, float) and v != v))
        raise ValueError(f"{path}, row {row + 1}: the label column {label!r} is empty")
    names = sorted({str(v) for v in values})
    index = {name: i for i, name in enumerate(names)}
    return ImageData(texts=tuple(paths), labels=tuple(index[str(v)] for v in values), label_names=tuple(names),
                     source=f"{path} ({len(paths)} images, {len(names)} classes)", labels_by_name=True)


def _pick_column(columns, wanted: str | None, defaults: Sequence[str], what: str, path: Path, option: str,
                 required: bool = True) -> str | None:
    names = [str(c) for c in columns]
    if wanted is not None:
        if wanted not in names:
            raise ValueError(f"{path} has no column {wanted!r} (columns: {', '.join(names)})")
        return wanted
    found = next((c for c in defaults if c in names), None)
    if found is None and required:
        raise ValueError(f"{path} has no {what} column (looked for {', '.join(defaults)}; columns: "
                         f"{', '.join(names)}); name it with {option}")
    return found


# --------------------------------------------------------------------------- decoding

def open_image(path: str | os.PathLike, mode: str):
    """``(image, its original mode)``: the image at ``path`` decoded and converted to ``mode`` ("RGB" or
    "L"); a ``ValueError`` naming the file when it cannot be read as an image."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            image.load()
            return (image if image.mode == mode else image.convert(mode)), image.mode
    except FileNotFoundError:
        raise ValueError(f"image file {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = "not an image PIL can read" if isinstance(err, UnidentifiedImageError) else str(err) or type(err).__name__
        raise ValueError(f"{path} is not a readable image ({reason})") from None


def image_mode(model_config) -> str:
    """The PIL mode the model reads: RGB for three channels, L for one."""
    channels = getattr(model_config, "num_channels", 3)
    if channels not in (1, 3):
        raise ValueError(f"the model reads {channels}-channel images; only 1 (greyscale) or 3 (RGB) are supported")
    return "RGB" if channels == 3 else "L"


def image_batches(data: TextData, processor, model_config, *, batch_size: int = 32, with_labels: bool = True,
                  progress: Progress | None = None) -> list[dict[str, torch.Tensor]]:
    """``data``'s images in order as batches of ``pixel_values`` (what ``processor`` makes of them) plus
    ``labels`` when ``with_labels`` and the data has class ids (map names first with
    ``kcm_core.data.labels_for_model``). Images in another colour mode than the model reads are
    converted, and ``progress`` hears how many."""
    mode = image_mode(model_config)
    problem = ("no images: the data is empty" if len(data) == 0 else
               f"batch_size must be a positive integer, got {batch_size!r}"
               if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1 else
               f"the labels of {data.source or 'the data'} are class names, not the model's class ids; map them "
               "with kcm_core.data.labels_for_model(data, model.config) first"
               if with_labels and data.labels_by_name else None)
    if problem:
        raise ValueError(problem)
    converted: Counter = Counter()
    batches = []
    for start in range(0, len(data), batch_size):
        images = []
        for path in data.texts[start:start + batch_size]:
            image, original = open_image(path, mode)
            images.append(image)
            if original != mode:
                converted[original] += 1
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]   # (B, C, H, W)
        batch = {"pixel_values": pixels}
        if with_labels and data.labels is not None:
            batch["labels"] = torch.tensor(data.labels[start:start + batch_size], dtype=torch.long)  # (B,)
        batches.append(batch)
    if converted:
        what = ", ".join(f"{n} {m}" for m, n in sorted(converted.items()))
        tell(progress, f"images: converted {sum(converted.values())} images to {mode} for this model ({what})", 1.0)
    return batches

