"""The shared sidebar: model, data, sample settings; loading them (with progress) into the session."""
from __future__ import annotations

import streamlit as st

from . import resources, server, state, ui
from .sources import (DATA_KINDS, MODEL_KINDS, DataChoice, ModelChoice, SampleChoice, env_defaults,
                      max_len_choices, nearest_choice, upload_dir, upload_path)

MAX_LENS = [32, 64, 128, 256, 512]


def choices() -> tuple[ModelChoice, DataChoice, SampleChoice]:
    """Draw the sidebar widgets and return the choices they make (may raise ValueError)."""
    state.set_defaults(state.sidebar_defaults(*env_defaults()))
    st.subheader("Model")
    kind = st.radio("Source", list(MODEL_KINDS), format_func=MODEL_KINDS.get, key="model_kind",
                    help="The embedded demo is a small sentiment classifier prepared on first start. "
                         "A local folder holds config.json and weights; a hub id needs network access.")
    if kind != "demo":
        st.text_input("Folder or hub id", key="model_ref", help="e.g. /models/my-bert or bert-base-uncased")
    st.subheader("Data")
    data_kind = st.radio("Unlabeled sample from", list(DATA_KINDS), format_func=DATA_KINDS.get,
                         key="data_kind", help="Texts the model sees while scoring (labels are optional; "
                         "with a label column the app also reports accuracy).")
    ref = state.text("data_ref") or ""
    if data_kind in ("file", "hub"):
        st.text_input("Path or dataset name", key="data_ref",
                      help="CSV, TSV, JSON, JSONL, Parquet or TXT file; or a hub dataset such as glue")
        ref = state.text("data_ref") or ""
    elif data_kind == "upload":
        server.check_uploads()           # a shared server may turn them off
        upload = st.file_uploader("File", type=["csv", "tsv", "json", "jsonl", "parquet", "txt"],
                                  key="data_upload", help="Kept on this machine in a private temporary "
                                  "folder, removed when the server stops.")
        ref = str(upload_path(upload.name, upload.getvalue(), upload_dir())) if upload else ""
    if data_kind != "demo":
        with st.expander("Columns and split"):
            st.text_input("Text column", key="text_column", help="Default: text or sentence")
            st.text_input("Second text column", key="text_pair_column", help="For pair tasks (MRPC, QNLI)")
            st.text_input("Label column", key="label_column", help="Enables accuracy and label methods")
            st.text_input("Split", key="data_split", help="Hub datasets: train, validation, ...")
            st.text_input("Config", key="data_config", help="Hub datasets: e.g. sst2 for glue")
    st.subheader("Sample")
    st.number_input("Unlabeled sequences", min_value=8, max_value=4096, step=64, key=state.SAMPLE_SIZE,
                    help="How many sequences the scorers see (the paper: 2048; 512 to 4096 give the same "
                         "result).")
    model_ref = (state.text("model_ref") or "") if kind != "demo" else ""
    lengths = max_len_choices(MAX_LENS, _positions(kind, model_ref))
    if state.integer(state.MAX_LEN) not in lengths:
        # Set before the widget is drawn (Streamlit would fall back to the first choice, 32):
        # the default 128 becomes 64 on a model with 64 positions, not a crash in its forward pass.
        st.session_state[state.MAX_LEN] = nearest_choice(state.integer(state.MAX_LEN), lengths)
    st.select_slider("Max sequence length (tokens)", lengths, key=state.MAX_LEN,
                     help="Longer texts are truncated to this many tokens (at most the model's positions).")
    st.number_input("Seed", min_value=0, max_value=2**31 - 1, step=1, key=state.SEED,
                    help="Draws the sample and seeds the random baseline.")
    model = ModelChoice(kind, model_ref)
    data = DataChoice(data_kind, ref if data_kind != "demo" else "", text_column=state.text("text_column"),
                      text_pair_column=state.text("text_pair_column"), label_column=state.text("label_column"),
                      split=state.text("data_split"), config_name=state.text("data_config"))
    sample = SampleChoice(state.integer(state.SAMPLE_SIZE), state.integer(state.MAX_LEN), state.seed())
    return model, data, sample


def _positions(kind: str, ref: str) -> int | None:
    """The position limit of the chosen model when the session's workspace (the last run's) holds it,
    else None: nothing is read here (on a shared server a path is checked before any read), and
    ``load`` shortens the sample to the model it loads."""
    from kcm_core.models import max_positions
    ws = state.workspace()
    key = f"{kind}:{ref}"                  # as sources.model_key, before the folder's "@mtime"
    if ws is None or not (ws.model_key == key or ws.model_key.startswith(key + "@")):
        return None
    return max_positions(ws.model.config)


def _fit_to_model(model: ModelChoice, sample: SampleChoice, progress) -> SampleChoice:
    """``sample`` with its max length shortened to the model's positions (the model is cached, so
    ``resources.workspace`` loading it again costs nothing)."""
    from kcm_core.models import max_positions
    _, net, _ = resources.load_model(model, progress)
    return sample.fitted(max_positions(net.config))


def load() -> None:
    """Sidebar, then the workspace it names (kept in the session; heavy parts cached for all)."""
    with st.sidebar:
        with ui.core_errors(stop=False):
            config = server.settings()   # a malformed setting stops here, before anything is read
            server.apply_streamlit_options(config)
            if config.shared:
                st.caption(config.describe())
            model, data, sample = choices()
            state.set_workspace(None)
            first_demo = model.kind == "demo" and not resources.demo_ready()
            label = ("Preparing the embedded demo (first start only)" if first_demo
                     else "Loading model and data")
            with st.status(label, expanded=first_demo) as box:
                bar = ui.ProgressBar(label, container=box.empty())
                drawn, sample = sample, _fit_to_model(model, sample, bar)
                ws = resources.workspace(model, data, sample, bar)
                bar.clear()
                box.update(label=f"Loaded: {ws.info.model_name}", state="complete",
                           expanded=False)
            state.set_workspace(ws)
            if sample != drawn and _positions(model.kind, model.ref) is not None:
                st.rerun()   # once: the slider is drawn again with this model's lengths only
            # a shared link (or the default 0.6) may ask for less than this model can reach
            state.set_budget(state.clamp_budget(state.budget(), ws.floor))
