"""Page 3 body: R2, D2, R2D2 and the baselines per neuron, and two methods' allocations (kept neurons
per layer) side by side at the session's budget."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from kcm_core import scores as S
from kcm_core.methods import METHODS

from .. import background, charts, engine, figures, resources, state, theme, ui
from ..engine import Workspace
from .prune import default_methods, method_options

SCORES = {"r2d2": "R2D2 (KCM)", "r2": "R2 (kernel hull, weights)", "d2": "D2 (activations)",
          "weight_magnitude": "Weight magnitude", "output_magnitude": "Output magnitude",
          "fisher": "Fisher (labels)"}


def score_table(ws: Workspace, bar) -> pd.DataFrame:
    """Every score kind per neuron, from the shared components (computed once for all sessions)."""
    store = resources.store("results")
    config = ui.prune_config(method="kcm")
    r2, _ = engine.r2_fits(ws, config, store, bar)
    stats = engine.neuron_stats(ws, store, bar)
    d2 = S.d2(stats, config.d2, gated=ws.shape.gated)
    columns = {"r2d2": S.r2d2(r2, d2), "r2": r2, "d2": d2}
    if ws.streamed:          # the baselines read the weights: each would be one more pass over every layer
        return charts.score_frame(columns)
    columns.update(weight_magnitude=S.weight_magnitude(ws.model), output_magnitude=S.output_magnitude(ws.model, stats))
    if ws.labeled is not None:
        columns["fisher"] = engine.gradient_scores(ws, ui.prune_config(method="mask-tuning"), store, bar)
    return charts.score_frame(columns)


def page() -> None:
    """The whole page: title, the loaded workspace (or why there is none), the controls, the body."""
    st.title("Neuron scores")
    st.caption("Every FFN neuron's score under KCM (R2 x D2), its two parts and the baselines: which neurons "
               "each method would keep first.")
    ws = ui.require_workspace()
    body(ws, *controls(ws))


def controls(ws: Workspace) -> tuple[str, int, int, bool]:
    """The score shown, the layer for the scatter and the tables, how many rows at each end, and
    whether the scatter shows every layer."""
    left, mid, right, end = st.columns([2, 1, 1, 1], vertical_alignment="bottom")
    column = left.selectbox("Score", list(SCORES), format_func=SCORES.get, key="scores_column",
                            help="R2D2 = R2 x normalised D2 is KCM's score; the others are its parts and "
                                 "baselines")
    layer = mid.number_input("Layer", 0, ws.shape.layers - 1, 0, key="scores_layer",
                             help="Layer for the R2 vs D2 scatter and the top/bottom tables")
    top_n = right.number_input("Rows", 3, 50, 10, key="scores_top_n", help="Neurons listed at each end")
    every = end.checkbox("All layers", key="scores_all_layers",
                         help="Show every layer's neurons in the scatter, coloured by layer (many points: "
                              "slower to draw)")
    return column, int(layer), int(top_n), bool(every)


def body(ws: Workspace, column: str, layer: int, top_n: int, every_layer: bool) -> None:
    with ui.progress("Scoring neurons") as bar, ui.core_errors():
        ui.follow_background(ws, (background.SCORES, background.GRADIENTS), bar)
        frame = score_table(ws, bar)
    if ws.streamed:
        st.caption("Opened layer by layer: KCM's score and its two parts are shown (two passes over the "
                   "layers, kept on disk); the baselines are left out here, since each reads every layer "
                   "again. The Prune page scores any label-free method in one pass of its own.")
    if column not in frame:
        st.warning(f"{SCORES[column]} " + ("is left out for a model opened layer by layer" if ws.streamed
                                           else "needs labels") + "; showing R2D2 instead.")
        column = "r2d2"
    st.plotly_chart(figures.score_violins(charts.score_densities(frame, column), column, label=SCORES[column]),
                    key="scores_violin")
    st.subheader("R2 vs D2")
    shown = frame if every_layer else frame[frame["layer"] == layer].reset_index(drop=True)
    st.caption(("Each point is one FFN neuron of every layer, coloured by layer." if every_layer else
                f"Each point is one FFN neuron of layer {layer}, coloured by {SCORES[column]}; tick All "
                "layers for every neuron.") + " Drag a box or lasso to list the neurons you pick.")
    # a selection belongs to the picture it was made on: another layer is another widget
    event = st.plotly_chart(figures.r2_d2_scatter(shown, column, SCORES[column]),
                            key=f"{state.scatter_key()}_{'all' if every_layer else layer}", on_select="rerun",
                            selection_mode=("points", "box", "lasso"))
    picked = charts.selected_neurons(shown, event)
    if len(picked):
        left, right = st.columns([4, 1])
        left.markdown(f"**{len(picked)} neurons selected**")
        right.button("Clear selection", key="scores_clear_selection", on_click=state.clear_scatter_selection)
        st.dataframe(readable(picked), hide_index=True, height=220)
    matrix, centres = charts.rank_heatmap(frame, column)
    st.plotly_chart(figures.rank_heatmap(matrix, centres, column, label=SCORES[column]), key="scores_heatmap")
    allocation(ws)
    best, worst = charts.top_bottom(frame, layer, column, top_n)
    listed = ["neuron"] + list(dict.fromkeys([column, "r2", "d2"]))
    left, right = st.columns(2)
    left.markdown(f"**Top {top_n} of layer {layer}** by {SCORES[column]}")
    left.dataframe(readable(best[listed]), hide_index=True, width="stretch")
    right.markdown(f"**Bottom {top_n} of layer {layer}** by {SCORES[column]}")
    right.dataframe(readable(worst[listed]), hide_index=True, width="stretch")


def readable(frame: pd.DataFrame) -> pd.DataFrame:
    """Score columns under their labels ("R2D2 (KCM)"), not their internal names."""
    return frame.rename(columns={**SCORES, "layer": "Layer", "neuron": "Neuron"})


def allocation_defaults(ws: Workspace, options: list[str]) -> tuple[str, str]:
    """The paper's KCM and the model's default method (a language model: fluctuation + refit, curve
    allocation); where the default is KCM itself (a classifier), the comparison's next default method
    (weight magnitude)."""
    first = "kcm" if "kcm" in options else options[0]
    default = ws.default_method
    if default == first or default not in options:
        default = next((m for m in default_methods(options, ws.is_lm, ws.shape.vision) + options if m != first), first)
    return first, default


def allocation(ws: Workspace) -> None:
    """Two methods' kept neurons per layer at the session's budget, side by side. Their scores come from
    the store the rest of the app uses (KCM's components are the ones scored above) and their plans from
    the Prune page's instant readout (a selection: no model is run)."""
    st.subheader("Allocation: kept neurons per layer")
    options = method_options(ws)
    if ws.streamed:          # as above: a method that reads the weights would be one more pass over every layer
        options = [m for m in options if not METHODS[m].reads_weights]
    first, second = allocation_defaults(ws, options)
    left, right = st.columns(2)
    a = left.selectbox("Method", options, index=options.index(first), format_func=theme.method_label,
                       key="alloc_method_a", help="The first method's bars")
    b = right.selectbox("Against", options, index=options.index(second), format_func=theme.method_label,
                        key="alloc_method_b", help="The second method's bars")
    budget = state.clamp_budget(state.budget(), ws.floor)
    store = resources.store("results")
    plans = {}
    with ui.progress("Scoring for the allocation") as bar, ui.core_errors():
        for name in dict.fromkeys((a, b)):
            config = ui.prune_config(method=name, budget=budget)
            plans[name] = engine.readout(ws, engine.method_scores(ws, config, store, bar), config, store).plan
    st.plotly_chart(figures.allocation(charts.allocation_frame(plans), budget), key="scores_allocation")
    st.caption(f"Allocation is how a budget's kept neurons are spread over the layers: at {budget:.2f} relative "
               "FLOPs (the Prune page's slider) every method keeps the same total, but a pooled ranking (the "
               "paper's KCM) compares raw scores across all layers and can empty the layers whose scores run "
               "low, while a standardised one (per-layer z-scores) compares each neuron with its own layer "
               "and cuts every layer more evenly.")
