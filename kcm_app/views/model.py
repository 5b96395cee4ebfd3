"""Page 1 body: architecture, data provenance, the unpruned model's accuracy (a causal language
model: its held-out perplexity)."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from kcm_core.flops import count_params

from .. import engine, resources, ui
from ..sources import DATA_KINDS
from ..engine import Workspace


def architecture(ws: Workspace) -> pd.DataFrame:
    s = ws.shape
    params = count_params(ws.model)
    ffn = "MLP" if ws.is_lm else "FFN"
    widths = sorted(set(s.ffn_width))
    width = (f"{widths[0]} in each of {s.layers} layers" if len(widths) == 1
             else ", ".join(map(str, s.ffn_width)))
    rows = [("model class", type(ws.model).__name__), ("family / model type", f"{s.family} / {s.model_type}"),
            ("layers", s.layers), ("attention heads per layer", s.heads),
            ("key/value heads per layer", s.kv_heads), ("hidden size d", s.hidden),
            (f"{ffn} width per layer" + (" (gated: gate, up, down)" if s.gated else ""), width),
            (f"{ffn} neurons in all", sum(s.ffn_width)), ("parameters", f"{params.total:,}"),
            ("  of which in the layers", f"{sum(params.layers):,}"),
            ("  embeddings and other backbone", f"{params.embeddings:,}"), ("  task head", f"{params.head:,}")]
    return pd.DataFrame(rows, columns=["property", "value"]).astype(str).set_index("property")


def provenance(ws: Workspace) -> pd.DataFrame:
    i = ws.info
    if ws.is_lm:
        rows = [("source chosen", i.data), ("data read from", i.data_source or i.data),
                ("calibration blocks for scoring", i.sample), ("block size (tokens; FLOPs counted at it)", i.max_len),
                ("seed", i.seed), ("labels", "none (a language model needs none)"),
                ("evaluation data", i.eval_source)]
        return pd.DataFrame(rows, columns=["property", "value"]).astype(str).set_index("property")
    rows = [("source chosen", i.data), ("data read from", i.data_source or i.data),
            ("unlabeled sequences for scoring", i.sample),
            ("mean real tokens per sequence (FLOPs are counted at this length)", f"{ws.seq_len:g}"),
            ("max sequence length", i.max_len), ("seed", i.seed),
            ("labels", "yes" if i.labels else "no"),
            ("evaluation data", f"{i.eval_examples} examples: {i.eval_source}")]
    return pd.DataFrame(rows, columns=["property", "value"]).astype(str).set_index("property")


def page() -> None:
    """The whole page: title, the loaded workspace (or why there is none), the button, the body."""
    st.title("Model and data")
    ws = ui.require_workspace()
    score_now = st.button("Score all neurons with KCM now", key="score_now",
                          help="Runs R2 (kernel hull on the weights) and D2 (activations on the sample) "
                               "once; every page reuses the result.")
    body(ws, score_now)


def body(ws: Workspace, score_now: bool) -> None:
    left, right = st.columns(2)
    with left:
        st.subheader("Architecture")
        st.table(architecture(ws))
    with right:
        st.subheader("Data")
        st.table(provenance(ws))
        if ws.info.data == DATA_KINDS["demo"]:
            from kcm_core import demo
            st.caption(demo.DATA_SOURCE)
            with st.expander("Terms of use"):
                st.write(demo.DATA_TERMS)
        elif ws.info.data == DATA_KINDS["demo-lm"]:
            from kcm_core import demo_lm
            st.caption(f"{demo_lm.TEXT_SOURCE}. Model: {demo_lm.MODEL_SOURCE}; the weights are real but "
                       "carry 4-bit quantisation noise.")
            with st.expander("Terms of use"):
                st.write(demo_lm.TEXT_TERMS)
    st.subheader("Unpruned model")
    if ws.is_lm:
        with ui.progress("Evaluating the unpruned model") as bar, ui.core_errors():
            ppl = engine.reference_lm(ws, resources.store("results"), bar).perplexity
        st.metric("Perplexity (unpruned)", f"{ppl.value:,.2f}",
                  help=f"95% bootstrap interval {ppl.low:,.2f} to {ppl.high:,.2f} over {ppl.n} blocks")
        st.caption(f"95% interval {ppl.low:,.2f} to {ppl.high:,.2f} over {ppl.n} blocks "
                   f"({ws.info.eval_source}).")
    elif ws.eval_batches is None:
        st.info("The data has no labels, so accuracy cannot be measured. Name a label column in the "
                "sidebar; every label-free method still works.")
    else:
        with ui.progress("Evaluating the unpruned model") as bar, ui.core_errors():
            dense = engine.reference(ws, resources.store("results"), bar)
        acc = dense.accuracy
        st.metric("Accuracy (unpruned)", f"{acc.value:.1%}",
                  help=f"95% bootstrap interval {acc.low:.1%} to {acc.high:.1%} over {acc.n} examples")
        st.caption(f"95% interval {acc.low:.1%} to {acc.high:.1%} on {acc.n} examples "
                   f"({ws.info.eval_source}).")
    if score_now:
        with ui.progress("Scoring with KCM") as bar, ui.core_errors():
            scores = engine.method_scores(ws, ui.prune_config(method="kcm"), resources.store("results"), bar)
        iterations = scores.details.to_dict().get("r2_iterations")      # a list, as before; None if absent
        st.success(f"KCM scores ready (R2 iterations per layer: {iterations}).")
