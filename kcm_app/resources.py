"""Heavy objects cached once for every browser session (``st.cache_resource``), keyed by ids.

Models are keyed by ``sources.model_key``; data by the (frozen, hashable) choices; the workspace by
both plus the sample settings. The cached objects are shared: nothing here or downstream changes them
(see ``kcm_app.engine``). Work that shows progress (building a workspace, scoring, evaluating) is not a cached function: it
goes through a ``SharedStore`` (itself a cached resource), so its progress bar can be drawn while it
runs without Streamlit replaying elements on a cache hit.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import streamlit as st

from kcm_core.arch import model_shape
from kcm_core.pipeline import resolve_seq_len
from kcm_core.runtime import Progress, tell

from . import background, disk_cache, server
from .engine import Workspace, WorkspaceInfo
from .sources import (BATCH_SIZE, DEMO_KINDS, EVAL_LIMIT, LM_BATCH, LM_EVAL_BLOCKS, DataChoice,
                      ModelChoice, SampleChoice, UPLOAD_KINDS, batches_fingerprint, is_upload, model_key)
from .store import SharedStore


# A local folder whose weight files take more than this share of the available memory opens layer by
# layer (``layerwise_reason``): the model is never whole in memory, at the cost of the evaluations.
MEMORY_SHARE = 0.8


@st.cache_resource(show_spinner=False)
def store(name: str) -> SharedStore:
    """One result store per kind of result, shared by all sessions."""
    return SharedStore(max_entries={"results": 512, "workspaces": 6}.get(name, 64))


@st.cache_resource(show_spinner=False)
def _precompute_registry() -> tuple[dict, threading.Lock]:
    return {}, threading.Lock()


def precompute(ws: Workspace, seed: int) -> background.Precompute:
    """The background work for this workspace (``kcm_app.background``), started once per server."""
    registry, lock = _precompute_registry()
    return background.start(ws, seed, store("results"), registry, lock)


def demo_summary(_progress: Progress | None = None) -> dict:
    """The prepared demo (prepared now, with progress, on a first start)."""
    from kcm_core.demos import classifier as demo
    return demo.prepare_demo(progress=_progress)


def lm_demo_summary(_progress: Progress | None = None) -> dict:
    """The prepared LM demo (prepared now, with progress, on a first start)."""
    from kcm_core.demos import lm as demo_lm
    return demo_lm.prepare_lm_demo(progress=_progress)


def vision_demo_summary(_progress: Progress | None = None) -> dict:
    """The prepared vision demo (prepared now, with progress, on a first start)."""
    from kcm_core.demos import vision as demo_vision
    return demo_vision.prepare_vision_demo(progress=_progress)


def demo_ready(kind: str = "demo") -> bool:
    """Whether the demo of ``kind`` (``demo``, ``demo-lm`` or ``demo-vision``) is prepared."""
    if kind == "demo-vision":
        from kcm_core.demos import vision as demo_vision
        return bool(demo_vision.vision_demo_ready())
    if kind == "demo-lm":
        from kcm_core.demos import lm as demo_lm
        return bool(demo_lm.lm_demo_ready())
    from kcm_core.demos import classifier as demo
    return bool(demo.demo_ready())


def model_path(choice: ModelChoice, progress: Progress | None = None) -> str:
    """The folder or hub id to load; on a shared server, refused (before any read) when it is a local
    folder outside the allowed roots or a hub id the server does not allow (``kcm_app.server``)."""
    if choice.kind == "demo":
        return str(demo_summary(progress)["model_dir"])
    if choice.kind == "demo-lm":
        return str(lm_demo_summary(progress)["model_dir"])
    if choice.kind == "demo-vision":
        return str(vision_demo_summary(progress)["model_dir"])
    if choice.kind == "hub":
        return server.hub_ref(choice.ref, "model")
    return server.confine_folder(choice.ref, "model folder")


def data_source(choice: DataChoice) -> str:
    """The file or hub name to read for ``choice``, checked like ``model_path`` (uploads must be
    files this server process wrote into its private upload folder)."""
    if choice.kind == "hub":
        return server.hub_ref(choice.ref, "dataset")
    if choice.kind in UPLOAD_KINDS:
        server.check_uploads()
        if server.settings().shared and not is_upload(choice.ref.strip()):
            raise ValueError("that upload is no longer on this server; upload the file again")
        return choice.ref.strip()
    return server.confine(choice.ref, "data file")


@st.cache_resource(show_spinner=False, max_entries=4)
def _load_model(key: str, path: str) -> tuple[Any, Any]:
    from kcm_core.models import load_model
    model, tokenizer = load_model(path)
    if model.training:   # a freshly built object, before anyone shares it
        model.eval()
    return model, tokenizer


@st.cache_resource(show_spinner=False, max_entries=4)
def _open_layerwise(key: str, path: str) -> tuple[Any, Any]:
    """A folder opened layer by layer: the empty skeleton (parameters on ``meta``: shapes and counts,
    no memory) and the tokenizer. Nothing fills this shared skeleton; work on it uses a fresh one
    (``engine.workspace.skeleton``)."""
    import torch

    from kcm_core.streamed.skeleton import Skeleton
    from kcm_core.models import load_processor
    if not Path(path).is_dir():
        raise ValueError(f"{path} is not a folder: layer by layer reads the safetensors files of a local "
                         "model folder (download a hub model first, e.g. with `hf download`)")
    sk = Skeleton(path, torch.device("cpu"))
    return sk.model, load_processor(path, {"local_files_only": True}, vision=sk.family.vision)


def layerwise_reason(choice: ModelChoice, progress: Progress | None = None) -> str | None:
    """Why a local folder should be opened layer by layer although it was not asked to be: its weight
    files exceed ``MEMORY_SHARE`` of this machine's available memory (loading it whole could exhaust
    the memory every session of this server shares); None when it fits, or for other sources."""
    if choice.kind != "folder" or choice.stream:
        return None
    import psutil

    from kcm_core.streamed.skeleton import checkpoint_bytes
    size = checkpoint_bytes(model_path(choice, progress))
    free = psutil.virtual_memory().available
    if size <= MEMORY_SHARE * free:
        return None
    return (f"its weight files take {size / 2**30:.1f} GiB and this machine has {free / 2**30:.1f} GiB of "
            "memory available")


def load_model(choice: ModelChoice, progress: Progress | None = None) -> tuple[str, Any, Any]:
    """(model key, model, tokenizer): loaded once per model id for all sessions. A folder opened layer
    by layer gives its empty skeleton as the model (``_open_layerwise``)."""
    path = model_path(choice, progress)
    key = model_key(choice, path)
    tell(progress, f"{'opening' if choice.stream else 'loading'} model {choice.describe()}", 0.5)
    model, tokenizer = (_open_layerwise if choice.stream else _load_model)(key, path)
    return key, model, tokenizer


@st.cache_resource(show_spinner=False, max_entries=8)
def load_data(choice: DataChoice, role: str = "train", images: bool = False) -> Any:
    """The chosen data as ``kcm_core.data.TextData`` (the demo's train or test split; the LM demo's
    calibration or evaluation documents); ``images`` (an image model's data): ``ImageData`` from a
    folder, table, uploaded images or a Hugging Face image dataset (``kcm_core.images``)."""
    if choice.kind == "demo":
        from kcm_core.demos import classifier as demo
        return demo.load_demo_split("train" if role == "train" else "test")
    if choice.kind == "demo-lm":
        from kcm_core.demos import lm as demo_lm
        lm_demo_summary()                # prepared by the model choice, or now when only the data is chosen
        return demo_lm.load_lm_split("calibration" if role == "train" else "evaluation")
    if choice.kind == "demo-vision":
        from kcm_core.demos import vision as demo_vision
        vision_demo_summary()
        return demo_vision.load_vision_split("train" if role == "train" else "test")
    from kcm_core.cli.vision import is_image_source
    if images or choice.kind == "images" or (choice.kind == "file" and is_image_source(choice.ref.strip())):
        from kcm_core.images import load_image_data
        return load_image_data(data_source(choice), image_column=choice.text_column,
                               label_column=choice.label_column, split=choice.split,
                               config_name=choice.config_name)
    from kcm_core.data import load_text_data
    return load_text_data(data_source(choice), text_column=choice.text_column,
                          text_pair_column=choice.text_pair_column, label_column=choice.label_column,
                          split=choice.split, config_name=choice.config_name)


def _by_length(data: Any, tokenizer: Any) -> Any:
    """The same examples ordered by token count, so evaluation batches carry little padding."""
    texts = list(getattr(data, "texts"))
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    return data.subset(order)


def split_data(choice: DataChoice, sample: SampleChoice, images: bool = False) -> tuple[Any, Any | None, str]:
    """(scoring sample, labeled evaluation data or None, where the evaluation data came from).

    The scoring sample is ``TextData.sample(size, seed)``, the same subset the CLI's ``--samples``
    draws. Without a separate test split, up to ``EVAL_LIMIT`` of the rows it left out (in file order)
    are held out for evaluation.
    """
    from kcm_core.data import seeded_indices
    train = load_data(choice, "train", images)
    if len(train) == 0:
        raise ValueError(f"the data {choice.describe()} holds no examples")
    scoring = train.sample(sample.size, sample.seed)
    if choice.kind in ("demo", "demo-vision"):
        return scoring, load_data(choice, "test", images), f"the {'vision ' if choice.kind == 'demo-vision' else ''}demo's test split"
    chosen = set(seeded_indices(len(train), sample.size, sample.seed))
    rest = [i for i in range(len(train)) if i not in chosen][:EVAL_LIMIT]
    if not getattr(train, "has_labels", False):
        # no accuracy, but agreement with the unpruned model needs no labels
        if len(rest) >= 20:
            return scoring, train.subset(rest), f"{len(rest)} held-out examples of the same data (no labels)"
        return scoring, None, "none (no label column)"
    if len(rest) >= 20:
        return scoring, train.subset(rest), f"{len(rest)} held-out examples of the same data"
    return scoring, train.sample(EVAL_LIMIT, sample.seed), (
        "the scoring sample itself (too few examples to hold some out)")


def _workspace(key: str, data: DataChoice, sample: SampleChoice, _model: Any, _tokenizer: Any,
               _progress: Progress | None = None, stream_dir: str = "") -> Workspace:
    from kcm_core.cli.vision import check_image_data
    from kcm_core.data import labels_for_model
    tell(_progress, "reading data", 0.6)
    scoring, evaluation, eval_source = split_data(data, sample, model_shape(_model.config).vision)
    check_image_data(scoring, _model)          # text for an image model, or images for a text model
    # The model's class ids, or one clear refusal (a label it cannot predict would score as wrong
    # and break the label-using scores), exactly as the CLI maps them.
    scoring = labels_for_model(scoring, _model.config)
    evaluation = None if evaluation is None else labels_for_model(evaluation, _model.config)
    tell(_progress, "tokenising", 0.8)
    make_batches = _batch_maker(_model, _tokenizer, sample, _progress)
    unlabeled = tuple(make_batches(scoring, BATCH_SIZE, False))
    labeled = eval_batches = None
    if getattr(scoring, "has_labels", False):
        labeled = tuple(make_batches(scoring, BATCH_SIZE, True))
    if evaluation is not None:           # without labels: the agreement with the unpruned model only
        if not model_shape(_model.config).vision:     # images all have one length
            evaluation = _by_length(evaluation, _tokenizer)
        eval_batches = tuple(make_batches(evaluation, 64, getattr(evaluation, "has_labels", False)))
    shape = model_shape(_model.config)
    info = WorkspaceInfo(model_path=key, model_name=_model_name(key), data=data.describe(),
                         data_source=str(getattr(scoring, "source", "")), sample=len(scoring),
                         eval_examples=len(evaluation) if eval_batches else 0, eval_source=eval_source,
                         max_len=sample.max_len, seed=sample.seed, labels=labeled is not None, asked=sample.size)
    return Workspace(model_key=key, model=_model, tokenizer=_tokenizer, shape=shape,
                     data_key=batches_fingerprint(unlabeled, labeled, eval_batches),
                     unlabeled=unlabeled, labeled=labeled, eval_batches=eval_batches,
                     seq_len=round(resolve_seq_len(shape, unlabeled, None), 2), info=info,
                     weights_hash=weights_hash(key, _model, stream_dir), stream_dir=stream_dir)


def _batch_maker(model: Any, processor: Any, sample: SampleChoice, progress: Progress | None):
    """``make(data, batch_size, with_labels)``: tokenized batches, or an image model's ``pixel_values``
    from its own image processor (``kcm_core.images``)."""
    from kcm_core import data as D
    from kcm_core import images
    if model_shape(model.config).vision:
        return lambda data, size, labels: images.image_batches(data, processor, model.config, batch_size=size,
                                                               with_labels=labels, progress=progress)
    return lambda data, size, labels: D.make_batches(data, processor, max_len=sample.max_len, batch_size=size,
                                                     with_labels=labels)


def _lm_workspace(key: str, data: DataChoice, sample: SampleChoice, _model: Any, _tokenizer: Any,
                  _progress: Progress | None = None, stream_dir: str = "") -> Workspace:
    """A causal LM's workspace: ``sample.size`` calibration blocks of ``sample.max_len`` tokens as the
    unlabeled sample, ``LM_EVAL_BLOCKS`` held-out blocks to evaluate on (perplexity, agreement, KL),
    disjoint by document (``kcm_core.lm.split_blocks``). No labels."""
    from kcm_core.lm import check_block_size, check_token_ids, split_blocks
    check_block_size(_model.config, sample.max_len)
    tell(_progress, "reading documents", 0.6)
    calibration = load_data(data, "train")
    if len(calibration) == 0:
        raise ValueError(f"the data {data.describe()} holds no documents")
    if data.kind == "demo-lm":
        evaluation, eval_source = load_data(data, "evaluation"), "the LM demo's held-out reviews"
    else:                                       # split_blocks halves one source by document
        evaluation, eval_source = calibration, "the second half of the documents"
    tell(_progress, "tokenising into blocks", 0.8)
    cal, ev = split_blocks(calibration, evaluation, _tokenizer, sample.max_len,
                           calibration_blocks=sample.size, evaluation_blocks=LM_EVAL_BLOCKS,
                           batch_size=LM_BATCH)
    check_token_ids(cal + ev, _model.config)
    unlabeled, eval_batches = tuple(cal), tuple(ev)
    blocks = sum(int(b["input_ids"].shape[0]) for b in unlabeled)
    eval_blocks = sum(int(b["input_ids"].shape[0]) for b in eval_batches)
    info = WorkspaceInfo(model_path=key, model_name=_model_name(key), data=data.describe(),
                         data_source=str(getattr(calibration, "source", "")), sample=blocks,
                         eval_examples=eval_blocks,
                         eval_source=f"{eval_blocks} held-out blocks of {sample.max_len} tokens, {eval_source}",
                         max_len=sample.max_len, seed=sample.seed, labels=False, asked=sample.size)
    return Workspace(model_key=key, model=_model, tokenizer=_tokenizer, shape=model_shape(_model.config),
                     data_key=batches_fingerprint(unlabeled, None, eval_batches), unlabeled=unlabeled,
                     labeled=None, eval_batches=eval_batches, seq_len=float(sample.max_len), info=info,
                     weights_hash=weights_hash(key, _model, stream_dir), stream_dir=stream_dir)


def weights_hash(key: str, model: Any, stream_dir: str = "") -> str:
    """The model's weights hash (``kcm_app.disk_cache``), computed once per loaded model; a folder
    opened layer by layer is keyed by its files instead (``disk_cache.checkpoint_hash``)."""
    if stream_dir:
        return store("results").get_or_compute(("weights-hash", key),
                                                lambda: disk_cache.checkpoint_hash(stream_dir))
    return store("results").get_or_compute(("weights-hash", key), lambda: disk_cache.weights_hash(model))


def _model_name(key: str) -> str:
    kind, _, rest = key.partition(":")
    return ({"demo": "the classifier demo", "demo-lm": "the LM demo", "demo-vision": "the vision demo"}.get(kind)
            or rest.split("@")[0])


def is_causal_lm(model: Any) -> bool:
    return model_shape(model.config).head == "lm"


def workspace(model: ModelChoice, data: DataChoice, sample: SampleChoice,
              progress: Progress | None = None) -> Workspace:
    """Model + data + batches for the sidebar's choices (built once per combination)."""
    if data.kind not in DEMO_KINDS:
        data_source(data)                # refused before any cache lookup, on every run
    key, net, tokenizer = load_model(model, progress)
    build = _lm_workspace if is_causal_lm(net) else _workspace
    stream_dir = model_path(model) if model.stream else ""
    return store("workspaces").get_or_compute(
        (key, data, sample), lambda: build(key, data, sample, net, tokenizer, progress, stream_dir))
