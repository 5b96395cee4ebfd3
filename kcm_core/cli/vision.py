"""The CLI's image path: ``demo-vision`` as a model and data source, image folders and tables as data, and
``pixel_values`` batches made by the model's own image processor (``kcm_core.images``). The commands
themselves stay in ``kcm_core.cli``: an image classifier is a classifier, with the same report."""
from __future__ import annotations

from pathlib import Path

from ..runtime import Progress

DEMO_VISION = "demo-vision"


def is_vision(model) -> bool:
    from ..arch import model_shape
    return model_shape(model.config).vision


def is_image_source(source: str | None) -> bool:
    """The vision demo, a folder, or a single image: sources only the image loader reads."""
    if not source:
        return False
    from ..images import is_image_file
    return source == DEMO_VISION or Path(source).is_dir() or is_image_file(source)


def demo_model_path(progress: Progress) -> str:
    from ..demos import vision as demo_vision
    return str(demo_vision.prepare_vision_demo(progress=progress)["model_dir"])


def demo_folder() -> str:
    from ..demos import vision as demo_vision
    return str(demo_vision.vision_demo_dir())


def load_images(source: str, split: str, args, progress: Progress | None, hub_split: str | None = None):
    """``source`` as ``ImageData``: the vision demo's ``split``, or a folder / table / image file, or a
    Hugging Face image dataset (a ``save_to_disk`` folder or a hub name) read at ``hub_split`` with
    ``--data-config``."""
    if source == DEMO_VISION:
        from ..demos import vision as demo_vision
        demo_vision.prepare_vision_demo(progress=progress)
        return demo_vision.load_vision_split(split)
    if source in ("demo", "demo-lm"):        # the text demos: never looked up as a hub dataset name
        raise ValueError(f"'{source}' holds text, but an image model reads images; pass '{DEMO_VISION}', an image "
                         "folder (one sub-folder per class), a table of image paths or a Hugging Face image dataset")
    from ..images import load_image_data
    return load_image_data(source, image_column=getattr(args, "image_column", None),
                           label_column=getattr(args, "label_column", None), split=hub_split,
                           config_name=getattr(args, "data_config", None))


def image_batches(data, processor, model, batch_size: int, *, with_labels: bool = True,
                  progress: Progress | None = None) -> list:
    from ..images import image_batches as batches
    return batches(data, processor, model.config, batch_size=batch_size, with_labels=with_labels,
                   progress=progress)


def check_image_data(data, model) -> None:
    """Text data for an image model (or the other way round) is refused with what to pass instead."""
    from ..images import ImageData
    if is_vision(model) and not isinstance(data, ImageData):
        raise ValueError(f"{type(model).__name__} reads images, but {data.source or 'the data'} is text; pass an "
                         f"image folder (one sub-folder per class), a CSV/Parquet with an image-path column "
                         f"(--image-column), or '{DEMO_VISION}'")
    if not is_vision(model) and isinstance(data, ImageData):
        raise ValueError(f"{type(model).__name__} reads text, but {data.source or 'the data'} holds images")
