"""Image data in, ``pixel_values`` batches out.

``load_image_data`` reads one of three layouts into an ``ImageData`` (file paths plus optional labels):

- a folder with one sub-folder per class (the common "ImageFolder" layout): the sub-folder names are the
  class names;
- a folder of images without class sub-folders: unlabeled images (enough for scoring and the scaling
  step; accuracy needs labels);
- a CSV / TSV / JSON lines / Parquet table with an image-path column (paths relative to the table's
  folder) and an optional label column;
- a Hugging Face image dataset: a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a
  ``DatasetDict`` and a ``split``), or a hub name (``beans`` with ``split="train"``, needs the network
  or the ``datasets`` cache). Its image column is the ``datasets.Image`` feature (or a column of PIL
  images), its labels an optional ``ClassLabel`` (or integer / string) column; the images stay encoded
  in memory (``ImageData.images``) and are named ``<dataset> row <i>`` in messages.

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
import io
from dataclasses import dataclass, replace
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
    ``TextData`` for the labels' conventions. Nothing is decoded until ``image_batches``.

    ``images``, when set, holds each image's encoded bytes (a Hugging Face dataset's rows); ``texts``
    then only name them for messages (``beans [train] row 12``)."""

    images: tuple[bytes, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.images is not None and len(self.images) != len(self.texts):
            raise ValueError(f"images has {len(self.images)} entries but texts has {len(self.texts)}")

    @property
    def paths(self) -> tuple[str, ...]:
        return self.texts

    def subset(self, indices: Sequence[int]) -> ImageData:
        if self.images is None:
            return super().subset(indices)
        whole = replace(self, images=None).subset(indices)     # checks the indices
        return replace(whole, images=tuple(self.images[int(i)] for i in indices))


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def load_image_data(source: str | os.PathLike, *, image_column: str | None = None,
                    label_column: str | None = None, split: str | None = None,
                    config_name: str | None = None) -> ImageData:
    """``source`` (a folder, a table file, a ``save_to_disk`` folder or a hub dataset name, see the
    module docstring) as ``ImageData``. ``split`` and ``config_name`` apply to Hugging Face datasets."""
    path = Path(source).expanduser()
    if path.is_dir() and is_saved_dataset(path):
        return _from_saved(path, split, image_column, label_column)
    if path.is_dir():
        return _from_folder(path)
    if not path.exists():
        from .data.loading import looks_like_path
        if looks_like_path(str(source)):
            raise ValueError(f"image data {source} does not exist")
        from .data.readers import hub_dataset
        dataset, label = hub_dataset(str(source), config_name, split)
        return from_hf_dataset(dataset, label, image_column=image_column, label_column=label_column)
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


# --------------------------------------------------------------------------- Hugging Face datasets

def is_saved_dataset(folder: str | os.PathLike) -> bool:
    """True for a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``)."""
    folder = Path(folder)
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file())


def _from_saved(folder: Path, split: str | None, image_column: str | None, label_column: str | None) -> ImageData:
    import datasets
    try:
        loaded = datasets.load_from_disk(str(folder), keep_in_memory=False)
    except Exception as err:  # datasets raises several types for a damaged folder
        raise ValueError(f"{folder} cannot be read as a saved Hugging Face dataset ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in loaded:
            what = "choose one with split (--split)" if split is None else f"there is no split {split!r}"
            raise ValueError(f"{folder} holds the splits {', '.join(splits)}; {what}")
        return from_hf_dataset(loaded[split], f"{folder} [{split}]", image_column=image_column,
                               label_column=label_column)
    if split is not None:
        raise ValueError(f"{folder} is a single saved split (a Dataset, not a DatasetDict); leave the split "
                         f"out (got {split!r})")
    return from_hf_dataset(loaded, str(folder), image_column=image_column, label_column=label_column)


def from_hf_dataset(dataset, source: str, *, image_column: str | None = None,
                    label_column: str | None = None) -> ImageData:
    """A ``datasets.Dataset`` with an image column as ``ImageData``: every image's encoded bytes (a PNG
    for a PIL image without them), labels from ``label_column`` (default ``label``, ``labels``,
    ``class``; a ``ClassLabel`` keeps its names for ``labels_for_model``). ``source`` names the dataset
    in messages and reports."""
    import datasets

    from .data.labels import label_ids
    features = dataset.features
    names = list(dataset.column_names)
    if image_column is not None:
        if image_column not in names:
            raise ValueError(f"{source} has no column {image_column!r} (columns: {', '.join(names)})")
        column = image_column
    else:
        found = [c for c in names if isinstance(features.get(c), datasets.Image)]
        if not found and len(dataset):
            found = [c for c in names if _is_pil(dataset[0][c])]
        if not found:
            raise ValueError(f"{source} has no image column (a datasets.Image feature or PIL images; columns: "
                             f"{', '.join(f'{c} ({_feature_name(features.get(c))})' for c in names)}); "
                             "name it with --image-column")
        column = found[0]
    if len(dataset) == 0:
        raise ValueError(f"{source} has no rows: no images to read")
    if isinstance(features.get(column), datasets.Image):
        from .data.readers import quiet_datasets
        with quiet_datasets():
            cells = dataset.cast_column(column, datasets.Image(decode=False))[column]
    else:
        cells = dataset[column]
    rows = [f"{source} row {i}" for i in range(len(cells))]
    blobs = tuple(_encoded(cell, row) for cell, row in zip(cells, rows))
    label = label_column or next((c for c in DEFAULT_LABEL_COLUMNS if c in names), None)
    if label is not None and label not in names:
        raise ValueError(f"{source} has no column {label!r} (columns: {', '.join(names)})")
    about = f"{source} ({len(blobs)} images"
    if label is None:
        return ImageData(texts=tuple(rows), images=blobs, source=about + ", unlabeled)")
    feature = features.get(label)
    class_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    labels, label_names = label_ids(list(dataset[label]), label, class_names, source, label_column is not None)
    if labels is None:
        return ImageData(texts=tuple(rows), images=blobs, source=about + ", unlabeled)")
    by_name = class_names is None and label_names is not None
    classes = len(label_names) if label_names is not None else len(set(labels))
    return ImageData(texts=tuple(rows), images=blobs, labels=labels, label_names=label_names,
                     labels_by_name=by_name, source=f"{about}, {classes} classes)")


def _is_pil(value) -> bool:
    from PIL import Image
    return isinstance(value, Image.Image)


def _feature_name(feature) -> str:
    return getattr(feature, "dtype", None) or type(feature).__name__


def _encoded(cell, row: str) -> bytes:
    """One image cell as encoded bytes: an undecoded ``datasets.Image`` cell (bytes, or a local path),
    or a PIL image (saved as PNG)."""
    if _is_pil(cell):
        buffer = io.BytesIO()
        cell.save(buffer, format="PNG")
        return buffer.getvalue()
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return bytes(cell["bytes"])
        if cell.get("path"):
            try:
                return Path(cell["path"]).read_bytes()
            except OSError as err:
                raise ValueError(f"{row}: image file {cell['path']} cannot be read ({err.strerror})") from None
    raise ValueError(f"{row} holds {type(cell).__name__}, not an image")


# --------------------------------------------------------------------------- decoding

def open_image(path: str | os.PathLike, mode: str, encoded: bytes | None = None):
    """``(image, its original mode)``: the image at ``path`` (or ``encoded``, bytes that ``path`` only
    names) decoded and converted to ``mode`` ("RGB" or "L"); a ``ValueError`` naming it when it cannot
    be read as an image."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path if encoded is None else io.BytesIO(encoded)) as image:
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
        blobs = getattr(data, "images", None)
        for i, path in enumerate(data.texts[start:start + batch_size], start):
            image, original = open_image(path, mode, None if blobs is None else blobs[i])
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

