"""The shared sidebar: model, data, sample settings; loading them (with progress) into the session."""
from __future__ import annotations

import uuid
from dataclasses import replace

import streamlit as st

from . import live, resources, server, state, ui
from .image_uploads import UPLOAD_TYPES, image_upload_folder
from .sources import (DATA_KINDS, DEMO_KINDS, LM_CALIBRATION_BLOCKS, MODEL_KINDS, DataChoice, ModelChoice,
                      SampleChoice, env_block_size, env_defaults, max_len_choices, nearest_choice,
                      upload_dir, upload_path)

MAX_LENS = [32, 64, 128, 256, 512]
BLOCK_SIZES = [16, 32, 64, 128, 256, 512, 1024]     # a language model's tokens per block
UPLOAD_SESSION = "image_upload_session"


def choices() -> tuple[ModelChoice, DataChoice, SampleChoice]:
    """Draw the sidebar widgets and return the choices they make (may raise ValueError)."""
    state.set_defaults(state.sidebar_defaults(*env_defaults(), block_size=env_block_size(),
                                              lm_blocks=LM_CALIBRATION_BLOCKS))
    st.subheader("Model")
    kind = st.radio("Source", list(MODEL_KINDS), format_func=MODEL_KINDS.get, key=state.MODEL_KIND,
                    on_change=state.follow_model_kind,
                    help="Three embedded demos, prepared on first start: a small sentiment classifier, a "
                         "small causal language model and a Vision Transformer on photos of clothes. A local "
                         "folder holds config.json and weights (a causal LM keeps its LM head), or give a .gguf "
                         "file (llama.cpp, Ollama; dequantised on load); a hub id needs network access.")
    if kind not in DEMO_KINDS:
        st.text_input("Folder or hub id", key="model_ref", help="e.g. /models/my-bert or bert-base-uncased")
    if kind == "folder":
        st.checkbox("Layer by layer", key=state.MODEL_STREAM,
                    help="For a model larger than memory: read one layer at a time from the folder's "
                         "safetensors files (scores, kernel hull, export), never the whole model, so there "
                         "is no accuracy, perplexity or timing. A folder whose weights exceed the memory "
                         "available opens this way by itself.")
    model_ref = (state.text("model_ref") or "") if kind not in DEMO_KINDS else ""
    lm = _is_lm(kind, model_ref)
    vision = _is_vision(kind, model_ref)
    st.subheader("Data")
    data_kind = st.radio("Unlabeled sample from", list(DATA_KINDS), format_func=DATA_KINDS.get,
                         key="data_kind",
                         help=("Documents the language model sees while scoring, joined and cut into calibration "
                               "blocks; held-out blocks give the perplexity (no labels needed)." if lm else
                               "Images the model sees while scoring (labels are optional: with one sub-folder "
                               "per class, or a label column, the app also reports accuracy)." if vision else
                               "Texts the model sees while scoring (labels are optional; with a label column "
                               "the app also reports accuracy)."))
    ref = state.text("data_ref") or ""
    if data_kind in ("file", "hub"):
        st.text_input("Path or dataset name", key="data_ref",
                      help="CSV, TSV, JSON, JSONL, Parquet or TXT file; a folder of images (one sub-folder "
                           "per class) for an image model; or a hub dataset such as glue")
        ref = state.text("data_ref") or ""
    elif data_kind == "upload":
        server.check_uploads()           # a shared server may turn them off
        upload = st.file_uploader("File", type=["csv", "tsv", "json", "jsonl", "parquet", "txt"],
                                  key="data_upload", help="Kept on this machine in a private temporary "
                                  "folder, removed when the server stops.")
        ref = str(upload_path(upload.name, upload.getvalue(), upload_dir())) if upload else ""
    elif data_kind == "images":
        server.check_uploads()
        uploads = st.file_uploader("Images", type=UPLOAD_TYPES, accept_multiple_files=True, key="image_upload",
                                   help="A zip of an image folder (one sub-folder per class, named as the "
                                        "model's classes; images without sub-folders are unlabeled), or a few "
                                        "image files for a quick look. Kept on this machine in a private "
                                        "temporary folder of this session, removed when the server stops.")
        ref = str(image_upload_folder([(f.name, f.getvalue()) for f in uploads], upload_dir(),
                                      _upload_session())) if uploads else ""
    if data_kind not in DEMO_KINDS and data_kind != "images":
        with st.expander("Columns and split"):
            st.text_input("Image column" if vision else "Text column", key="text_column",
                          help="Default: the datasets.Image column (a Hugging Face dataset) or image, path, "
                               "file (a table of image paths)" if vision else "Default: text or sentence")
            if not vision:
                st.text_input("Second text column", key="text_pair_column", help="For pair tasks (MRPC, QNLI)")
            st.text_input("Label column", key="label_column",
                          help="A language model needs none" if lm else "Enables accuracy and label methods")
            st.text_input("Split", key="data_split", help="Hub datasets (and a saved DatasetDict): train, "
                                                          "validation, ...")
            st.text_input("Config", key="data_config", help="Hub datasets: e.g. sst2 for glue")
    st.subheader("Sample")
    if lm:
        lm_sample_widgets(_positions(kind, model_ref))
    else:
        classifier_sample_widgets(_positions(kind, model_ref), vision)
    st.number_input("Seed", min_value=0, max_value=2**31 - 1, step=1, key=state.SEED,
                    help="Draws the sample and seeds the random baseline.")
    model = ModelChoice(kind, model_ref, stream=kind == "folder" and bool(st.session_state.get(state.MODEL_STREAM)))
    data = DataChoice(data_kind, ref if data_kind not in DEMO_KINDS else "", text_column=state.text("text_column"),
                      text_pair_column=state.text("text_pair_column"), label_column=state.text("label_column"),
                      split=state.text("data_split"), config_name=state.text("data_config"))
    return model, data, sample_choice(lm)


def _fit_choice(key: str, lengths: list[int]) -> None:
    """Set before the widget is drawn (Streamlit would fall back to the first choice): a length the
    model cannot take becomes the nearest one it can, not a crash in its forward pass."""
    if state.integer(key) not in lengths:
        st.session_state[key] = nearest_choice(state.integer(key), lengths)


def classifier_sample_widgets(positions: int | None, vision: bool = False) -> None:
    """The sample size and, for text, the length sequences are cut to (an image is always its patches
    plus one token: nothing to choose)."""
    what = "images" if vision else "sequences"
    st.number_input(f"Unlabeled {what}", min_value=8, max_value=4096, step=64, key=state.SAMPLE_SIZE,
                    help=f"How many {what} the scorers see (the paper: 2048; 512 to 4096 give the "
                         "same result).")
    if vision:
        return
    lengths = max_len_choices(MAX_LENS, positions)
    _fit_choice(state.MAX_LEN, lengths)
    st.select_slider("Max sequence length (tokens)", lengths, key=state.MAX_LEN,
                     help="Longer texts are truncated to this many tokens (at most the model's positions).")


def lm_sample_widgets(positions: int | None) -> None:
    st.number_input("Calibration blocks", min_value=1, max_value=512, step=8, key=state.LM_BLOCKS,
                    help="Blocks of text the scorers see (the first few also fit the scales). The app "
                         f"default {LM_CALIBRATION_BLOCKS} keeps a first scoring within a few minutes on "
                         "two cores; the command line uses 32.")
    sizes = sorted(set(BLOCK_SIZES) | {state.integer(state.BLOCK_SIZE)})
    lengths = max_len_choices(sizes, positions)
    _fit_choice(state.BLOCK_SIZE, lengths)
    st.select_slider("Block size (tokens)", lengths, key=state.BLOCK_SIZE,
                     help="Documents are joined and cut into blocks of this many tokens (at most the "
                          "model's context); FLOPs are counted at this length.")


def sample_choice(lm: bool) -> SampleChoice:
    """The sample settings for a language model (blocks) or a classifier (sequences)."""
    if lm:
        return SampleChoice(state.integer(state.LM_BLOCKS), state.integer(state.BLOCK_SIZE), state.seed())
    return SampleChoice(state.integer(state.SAMPLE_SIZE), state.integer(state.MAX_LEN), state.seed())


def _session_model(kind: str, ref: str):
    """The session's workspace when it holds the chosen model (nothing is read here)."""
    ws = state.workspace()
    key = f"{kind}:{ref}"          # as sources.model_key, before the folder's "@mtime" and layer-by-layer mark
    if ws is None or not (ws.model_key == key or ws.model_key.startswith((key + "@", key + "#"))):
        return None
    return ws


def _upload_session() -> str:
    """This browser session's own name for its uploaded images' folder (``kcm_app.image_uploads``)."""
    return st.session_state.setdefault(UPLOAD_SESSION, uuid.uuid4().hex)


def _is_vision(kind: str, ref: str) -> bool:
    """Whether the chosen model reads images, as far as is known before loading it (as ``_is_lm``)."""
    if kind in DEMO_KINDS:
        return kind == "demo-vision"
    ws = _session_model(kind, ref)
    return ws is not None and ws.shape.vision


def _is_lm(kind: str, ref: str) -> bool:
    """Whether the chosen model is a causal LM, as far as is known before loading it: the demos say
    so; a folder or hub id is known once loaded (``load`` redraws the sidebar once if it was)."""
    if kind in DEMO_KINDS:
        return kind == "demo-lm"
    ws = _session_model(kind, ref)
    return ws is not None and ws.shape.head == "lm"


def _positions(kind: str, ref: str) -> int | None:
    """The position limit of the chosen model when the session's workspace (the last run's) holds it,
    else None: nothing is read here (on a shared server a path is checked before any read), and
    ``load`` shortens the sample to the model it loads."""
    from kcm_core.models import max_positions
    ws = _session_model(kind, ref)
    return None if ws is None else max_positions(ws.model.config)


def _fit_to_model(model: ModelChoice, sample: SampleChoice, progress) -> SampleChoice:
    """``sample`` for the loaded model: a language model's blocks or a classifier's sequences (the
    sidebar could only guess for a folder or hub id), its length shortened to the model's positions
    (the model is cached, so ``resources.workspace`` loading it again costs nothing)."""
    from kcm_core.models import max_positions
    _, net, _ = resources.load_model(model, progress)
    lm = resources.is_causal_lm(net)
    if lm != _is_lm(model.kind, model.ref):
        sample = sample_choice(lm)
    return sample.fitted(max_positions(net.config))


def load() -> None:
    """Sidebar, then the workspace it names (kept in the session; heavy parts cached for all). A
    failure marks the status box as failed and is kept for the page's main area (``ui.require_workspace``)."""
    from kcm_core.errors import clear_error_types, one_line
    state.set_load_error(None)
    with st.sidebar:
        try:
            config = server.settings()   # a malformed setting stops here, before anything is read
            server.apply_streamlit_options(config)
            if config.shared:
                st.caption(config.describe())
            model, data, sample = choices()
            drawn_vision = _is_vision(model.kind, model.ref)     # what the widgets were drawn for
            model = layerwise_if_needed(model)
            state.set_workspace(None)
            ws, drawn, sample = _load_with_status(model, data, sample)
        except clear_error_types() as err:
            # Said once, in the page's main area with what to do (ui.require_workspace); the status
            # box above has already turned to "failed".
            state.set_load_error(one_line(err))
            state.set_workspace(None)    # never the previous choice's workspace under a failed one
            return
        state.set_workspace(ws)
        if (sample != drawn and _positions(model.kind, model.ref) is not None) or ws.shape.vision != drawn_vision:
            st.rerun()   # once: the sample widgets are drawn again for this model (kind, lengths, images)
        # a shared link (or the default 0.6) may ask for less than this model can reach
        budget = state.budget()
        state.set_budget(state.clamp_budget(budget, ws.floor))
        if state.budget() > budget:
            state.add_notice(f"A budget of {budget:.2f} relative FLOPs is below what this model can reach "
                             f"by pruning FFN neurons alone ({ws.floor:.1%}); showing {state.budget():.2f}.")
        background_status(ws)


def layerwise_if_needed(model: ModelChoice) -> ModelChoice:
    """``model``, opened layer by layer (and said so) when its weight files do not fit in the memory
    available (``resources.layerwise_reason``)."""
    reason = resources.layerwise_reason(model)
    if reason is None:
        return model
    if st.session_state.get(state.LAYERWISE_TOLD) != model.ref:          # said once per folder
        st.session_state[state.LAYERWISE_TOLD] = model.ref
        state.add_notice(f"Opened {model.ref} layer by layer: {reason}. The note on each page says what "
                         "that leaves out.")
    return replace(model, stream=True)


def _load_with_status(model: ModelChoice, data: DataChoice, sample: SampleChoice):
    """(workspace, the sample the sidebar drew, the sample loaded), inside a status box that says
    whether loading succeeded or failed."""
    first_demo = model.kind in DEMO_KINDS and not resources.demo_ready(model.kind)
    which = {"demo-lm": "LM", "demo-vision": "vision"}.get(model.kind, "classifier")
    label = (f"Preparing the {which} demo (first start "
             "only)" if first_demo else "Loading model and data")
    with st.status(label, expanded=first_demo) as box:
        bar = ui.ProgressBar(label, container=box.empty())
        try:
            drawn, sample = sample, _fit_to_model(model, sample, bar)
            ws = resources.workspace(model, data, sample, bar)
        except Exception:
            bar.clear()
            box.update(label="Failed to load the model and data (see the page)", state="error", expanded=False)
            raise
        bar.clear()
        box.update(label=f"Loaded: {ws.info.model_name}", state="complete", expanded=False)
    return ws, drawn, sample


def background_status(ws) -> None:
    """What the background work (``kcm_app.background``) is doing; polls until it is done."""
    work = resources.precompute(ws, state.seed())
    if not work.done:
        st.fragment(_background_progress, run_every=live.POLL_S)(work)
    elif work.stopped:
        st.caption("Background work stopped before " + ", ".join(work.stopped) + "; the pages compute those "
                   "when opened, with their own progress.")
    elif work.errors:
        st.caption("Background work failed for " + ", ".join(work.errors) + "; the pages compute those "
                   "when opened and say what went wrong.")


def _background_progress(work) -> None:
    """Reruns every ``live.POLL_S`` seconds while the work runs; once done, the whole app reruns once (which stops
    this timer and lets every page use the results)."""
    if work.done:
        ui.rerun_page()
    st.progress(min(max(work.fraction, 0.0), 1.0), text=f"Preparing in the background: {work.current} ({work.message})")
    if st.button("Stop", key="stop_background",
                 help="Stop the background work at its next layer or batch (a big model's scoring can take "
                      "long); the pages then compute what they need when opened. It stops for every "
                      "session of this server, which share it."):
        work.stop()
        ui.rerun_page()
