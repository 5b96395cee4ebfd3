"""The shared sidebar: model, data, sample settings; loading them (with progress) into the session."""
from __future__ import annotations

import streamlit as st

from . import resources, state, ui
from .sources import (DATA_KINDS, MODEL_KINDS, DataChoice, ModelChoice, SampleChoice, env_defaults,
                      upload_path)

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
        upload = st.file_uploader("File", type=["csv", "tsv", "json", "jsonl", "parquet", "txt"],
                                  key="data_upload", help="Kept on this machine in a temporary folder.")
        ref = str(upload_path(upload.name, upload.getvalue(), resources.UPLOADS)) if upload else ""
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
    st.select_slider("Max sequence length (tokens)", MAX_LENS, key=state.MAX_LEN,
                     help="Longer texts are truncated to this many tokens.")
    st.number_input("Seed", min_value=0, max_value=2**31 - 1, step=1, key=state.SEED,
                    help="Draws the sample and seeds the random baseline.")
    model = ModelChoice(kind, (state.text("model_ref") or "") if kind != "demo" else "")
    data = DataChoice(data_kind, ref if data_kind != "demo" else "", text_column=state.text("text_column"),
                      text_pair_column=state.text("text_pair_column"), label_column=state.text("label_column"),
                      split=state.text("data_split"), config_name=state.text("data_config"))
    sample = SampleChoice(state.integer(state.SAMPLE_SIZE), state.integer(state.MAX_LEN), state.seed())
    return model, data, sample


def load() -> None:
    """Sidebar, then the workspace it names (kept in the session; heavy parts cached for all)."""
    with st.sidebar:
        with ui.core_errors(stop=False):
            model, data, sample = choices()
            state.set_workspace(None)
            first_demo = model.kind == "demo" and not resources.demo_ready()
            label = ("Preparing the embedded demo (first start only)" if first_demo
                     else "Loading model and data")
            with st.status(label, expanded=first_demo) as box:
                bar = ui.ProgressBar(label, container=box.empty())
                ws = resources.workspace(model, data, sample, bar)
                bar.clear()
                box.update(label=f"Loaded: {ws.info.model_name}", state="complete",
                           expanded=False)
            state.set_workspace(ws)
            # a shared link (or the default 0.6) may ask for less than this model can reach
            state.set_budget(state.clamp_budget(state.budget(), ws.floor))
