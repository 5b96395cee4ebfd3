"""Page 1 body: architecture, data provenance, the unpruned model's accuracy (a causal language
model: its held-out perplexity)."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from kcm_core.flops import cost_report, count_params

from .. import background, charts, disk_cache, engine, figures, resources, server, ui
from ..navigation import INTRO
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
    if ws.shape.vision:
        rows = [("source chosen", i.data), ("data read from", i.data_source or i.data),
                ("unlabeled images for scoring", i.sample),
                ("tokens per image (patches + 1; FLOPs are counted at this length)", f"{ws.seq_len:g}"),
                ("seed", i.seed), ("labels", "yes" if i.labels else "no"),
                ("evaluation data", f"{i.eval_examples} images: {i.eval_source}")]
        return pd.DataFrame(rows, columns=["property", "value"]).astype(str).set_index("property")
    rows = [("source chosen", i.data), ("data read from", i.data_source or i.data),
            ("unlabeled sequences for scoring", i.sample),
            ("mean real tokens per sequence (FLOPs are counted at this length)", f"{ws.seq_len:g}"),
            ("max sequence length", i.max_len), ("seed", i.seed),
            ("labels", "yes" if i.labels else "no"),
            ("evaluation data", f"{i.eval_examples} examples: {i.eval_source}")]
    return pd.DataFrame(rows, columns=["property", "value"]).astype(str).set_index("property")


def sample_warning(ws: Workspace) -> str | None:
    """Said when the data gave fewer sequences (blocks) for scoring than the sidebar asked for."""
    i = ws.info
    if not i.asked or i.sample >= i.asked:
        return None
    unit = ("calibration block" if ws.is_lm else "image" if ws.shape.vision else "sequence") + (
        "s" if i.sample != 1 else "")
    return (f"The data holds only {i.sample} {unit} for scoring, fewer than the {i.asked} asked: the scores "
            "rest on that few. Give more data for scores you can trust.")


def loaded_line(ws: Workspace) -> str:
    """What the model and data are, in one sentence."""
    i = ws.info
    if i.data == DATA_KINDS["demo"]:
        data = ("sentences from Pang and Lee's movie-review polarity data (positive or negative), "
                f"{i.sample} of them for scoring and {i.eval_examples} held out for accuracy")
    elif i.data == DATA_KINDS["demo-lm"]:
        data = f"review text cut into {i.sample} calibration blocks and {i.eval_examples} held-out blocks"
    else:
        unit = "blocks" if ws.is_lm else "images" if ws.shape.vision else "sequences"
        data = f"{i.data} ({i.sample} {unit} for scoring)"
    kind = ("a causal language model" if ws.is_lm else "an image classifier" if ws.shape.vision
            else "a text classifier")
    return (f"Loaded: {i.model_name}, {kind} ({type(ws.model).__name__}, {ws.shape.layers} layers of "
            f"{ws.shape.ffn_width[0]} FFN neurons), on {data}.")


def page() -> None:
    """The whole page: title, what the app does, the loaded workspace (or why there is none), the
    button, the body."""
    st.title("Model and data")
    st.markdown(INTRO)
    ws = ui.require_workspace()
    st.caption("This page shows the loaded model's architecture, where its data came from and how the "
               "unpruned model does.")
    st.markdown(loaded_line(ws))
    if ws.is_lm:
        lm_default_note()
    elif ws.shape.vision:
        vision_default_note()
    thin = sample_warning(ws)
    if thin:
        st.warning(thin)
    score_now = st.button("Score all neurons with KCM now", key="score_now",
                          help="Runs R2 (kernel hull on the weights) and D2 (activations on the sample) "
                               "once; every page reuses the result.")
    body(ws, score_now)


def lm_default_note() -> None:
    """Two sentences on what the language-model default adds to the paper, and the measurement."""
    _default_note(
        "**For a language model the default is not the paper's KCM.** On the LM demo the paper's KCM "
        "loses to FLAP at every budget (R2's scale depends on how long its fit ran, so pooled scores gut "
        "a few layers); the default, *fluctuation + refit, curve allocation*, ranks neurons by FLAP's "
        "standardised score, gives each layer as many as the least-squares refit of its rows needs "
        "(each layer's refit error on the calibration text, averaged with FLAP's counts), then refits "
        "every kept down-projection row to what the unpruned layer would output on the pruned model's "
        "inputs (label-free least squares). The paper's KCM stays one choice away.",
        charts.lm_default_frame(), figures.comparison_lm, "model_lm_default",
        "Measured on the LM demo: held-out perplexity by relative FLOPs "
        "(`benchmarks/results/lm_grid.json`, written by `benchmarks/bench_lm_grid.py`).")


def vision_default_note() -> None:
    """Two sentences on what the image-classifier default adds to the paper, and the measurement."""
    _default_note(
        "**For an image classifier the default is not the paper's KCM.** On the vision demo the "
        "paper's KCM (one scale per kept neuron) loses most of its accuracy below 0.7 of the FLOPs; the "
        "default, *fluctuation + refit*, ranks neurons by FLAP's standardised score and then refits every "
        "kept row of `fc2` to what the unpruned layer would output on the pruned model's inputs "
        "(label-free least squares). The paper's KCM stays one choice away.",
        charts.vision_default_frame(), figures.comparison, "model_vision_default",
        "Measured on the vision demo: test accuracy on 500 held-out images by relative FLOPs "
        "(`benchmarks/results/vision.json`, written by `benchmarks/bench_vision.py`; paired "
        "differences in `benchmarks/results/vision_default.md`).")


def _default_note(message: str, found, figure, key: str, caption: str) -> None:
    """``message``, then the measured chart (``figure`` of ``found``'s frame) when its results file is there."""
    st.info(message)
    if found is not None:
        frame, dense = found
        st.plotly_chart(figure(frame, dense, None), key=key)
        st.caption(caption)


def body(ws: Workspace, score_now: bool) -> None:
    left, right = st.columns(2)
    with left:
        st.subheader("Architecture")
        st.table(architecture(ws))
        report = cost_report(ws.shape, ws.seq_len, params=count_params(ws.model))
        st.plotly_chart(figures.param_summary(charts.param_frame(report, ws.shape)), key="model_params")
    with right:
        st.subheader("Data")
        st.table(provenance(ws))
        if ws.info.data == DATA_KINDS["demo"]:
            from kcm_core.demos import classifier as demo
            st.caption(demo.DATA_SOURCE)
            with st.expander("Terms of use"):
                st.write(demo.DATA_TERMS)
        elif ws.info.data == DATA_KINDS["demo-lm"]:
            from kcm_core.demos import lm as demo_lm
            st.caption(f"{demo_lm.TEXT_SOURCE}. Model: {demo_lm.MODEL_SOURCE}; the weights are real but "
                       "carry 4-bit quantisation noise.")
            with st.expander("Terms of use"):
                st.write(demo_lm.TEXT_TERMS)
        elif ws.info.data == DATA_KINDS["demo-vision"]:
            from kcm_core.demos import vision as demo_vision
            st.caption(f"{demo_vision.DATA_SOURCE}. Model: {demo_vision.MODEL_SOURCE}.")
            with st.expander("Terms of use"):
                st.write(demo_vision.DATA_TERMS)
        if ws.shape.vision and ws.eval_batches:
            from .images import sample_images
            st.caption(f"Test images as the model reads them ({ws.shape.image_tokens - 1} patches + 1 class "
                       "token each), with their labels:")
            sample_images(ws)
    st.subheader("Unpruned model")
    if ui.layerwise_note(ws, "the unpruned model's " + ("perplexity" if ws.is_lm else "accuracy")):
        pass
    elif ws.is_lm:
        with ui.progress("Evaluating the unpruned model") as bar, ui.core_errors():
            ui.follow_background(ws, (background.UNPRUNED,), bar)
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
            ui.follow_background(ws, (background.UNPRUNED,), bar)
            dense = engine.reference(ws, resources.store("results"), bar)
        acc = dense.accuracy
        if acc is None:
            st.info(f"The data has no labels, so accuracy cannot be measured; the Prune page shows how often "
                    f"the pruned model agrees with this one on {ws.info.eval_examples} held-out examples. Name "
                    "a label column in the sidebar for accuracy and the label-using methods.")
        else:
            st.metric("Accuracy (unpruned)", f"{acc.value:.1%}",
                      help=f"95% bootstrap interval {acc.low:.1%} to {acc.high:.1%} over {acc.n} examples")
            st.caption(f"95% interval {acc.low:.1%} to {acc.high:.1%} on {acc.n} examples "
                       f"({ws.info.eval_source}).")
    if score_now:
        with ui.progress("Scoring with KCM") as bar, ui.core_errors():
            scores = engine.method_scores(ws, ui.prune_config(method="kcm"), resources.store("results"), bar)
        iterations = scores.details.to_dict().get("r2_iterations")      # a list, as before; None if absent
        st.success(f"KCM scores ready (R2 iterations per layer: {iterations}).")
    cache_controls()


def cache_controls() -> None:
    """The disk cache of slow results (``kcm_app.disk_cache``): where, how big, and a button to clear it."""
    st.subheader("Disk cache")
    files, size = disk_cache.usage()
    st.caption(f"Kernel hull fits, activation statistics, Fisher gradients, UMAP projections and a "
               f"classifier's evaluations (unpruned and every evaluated budget) are kept in "
               f"{disk_cache.root().parent} ({files} files, {size / 2**20:.1f} MiB), keyed by the weights' "
               "hash, the data and the options, so a restarted app shows them at once. Results already "
               "in this server's memory stay until it restarts.")
    if server.settings().shared:         # one click would empty it for every participant
        st.caption("On this shared server only its operator clears the cache (by deleting that folder).")
        return
    if st.button("Clear the disk cache", key="clear_disk_cache",
                 help="Removes every stored file; the next start computes them again"):
        st.success(f"Removed {disk_cache.clear_all()} cached files.")
