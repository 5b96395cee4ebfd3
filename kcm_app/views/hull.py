"""Page 4 body: one layer's neurons projected to 2-D with R2's picks and the kept set; the 2-D
teaching view beside it."""
from __future__ import annotations

import numpy as np
import streamlit as st
import torch

from kcm_core.hull import AUTO_EXACT_MAX_WIDTH, HullConfig, kernel_hull
from kcm_core.methods import METHODS

from .. import engine, figures, projection, resources, state, toy, ui
from ..engine import Workspace

PICK_SHARE = 0.05       # the top 5% of a layer by R2 are drawn as the hull picks


def layer_fit(ws: Workspace, layer: int, sigma: float, alpha: float):
    """The kernel hull of ``layer``: R2's own fit when the options are the scoring defaults (stored,
    and kept on disk), else fitted for this layer alone."""
    config = HullConfig(sigma=sigma, sigma_mode="median", alpha=alpha)
    base = ui.prune_config(method="kcm")
    if config == base.hull:
        return engine.r2_fits(ws, base, resources.store("results"))[1][layer]
    return resources.store("results").get_or_compute(
        ("hull-layer", ws.model_key, layer, config),
        lambda: kernel_hull(torch.from_numpy(engine.layer_points(ws, layer)), config))


def kept_mask(ws: Workspace, layer: int) -> tuple[np.ndarray | None, str]:
    """The current method's kept neurons in ``layer`` at the current budget (scores computed once)."""
    config = ui.prune_config()
    store = resources.store("results")
    label = METHODS[config.method].label
    with ui.progress(f"Scoring with {label}") as bar, ui.core_errors():
        scores = engine.method_scores(ws, config, store, bar)
        plan = engine.readout(ws, scores, config, store).plan
    kept = plan.layers[layer]
    return kept.keep_mask().numpy(), (f"Orange: kept by {label} at {config.budget:.2f} relative "
                                      f"FLOPs ({kept.kept} of {kept.width} in this layer).")


def projection_coords(ws: Workspace, layer: int, kind: str, seed: int, placeholder, draw) -> np.ndarray:
    """PCA at once; UMAP when stored (memory or disk), else after it is computed (PCA is drawn in its
    place meanwhile)."""
    store = resources.store("results")
    pca = engine.layer_pca(ws, layer, store)
    if kind == "PCA":
        return pca
    if engine.umap_key(ws, layer, seed) not in store:
        draw(pca, "PCA (UMAP is computing...)")
    with placeholder, st.spinner("UMAP (read from disk, or computed: the first run also compiles it)..."):
        return engine.layer_umap(ws, layer, seed, store)


def page() -> None:
    """The whole page: title, the loaded workspace (or why there is none), the controls, the body."""
    st.title("Kernel hull")
    st.caption("One layer's neurons as points (their output weights), with the ones R2 ranks highest: the "
               "kernel convex hull that KCM's weight-only score is built on.")
    ws = ui.require_workspace()
    body(ws, *controls(ws))


def controls(ws: Workspace) -> tuple[int, float, float, str, float]:
    """Layer, kernel sigma (x median distance), alpha, projection kind, and the toy cloud's sigma."""
    cols = st.columns(5)
    layer = cols[0].number_input("Layer", 0, ws.shape.layers - 1, 0, key="hull_layer",
                                 help="Which layer's down-projection rows to draw (one point per neuron)")
    sigma = cols[1].select_slider("sigma (x median distance)", [0.1, 0.25, 0.5, 1.0, 2.0, 4.0], 1.0,
                                  key="hull_sigma", help="Kernel bandwidth relative to the median pairwise "
                                                         "distance")
    alpha = cols[2].select_slider("alpha", [0.001, 0.005, 0.01, 0.05, 0.1], 0.01, key="hull_alpha",
                                  help="Stop when the relative change of C falls below alpha")
    umap_ready = engine.umap_key(ws, 0, state.seed()) in resources.store("results")
    kind = cols[3].radio("Projection", ["PCA", "UMAP"], index=1 if umap_ready else 0, key="hull_projection",
                         horizontal=True,
                         help="PCA is instant; UMAP shows neighbourhoods better and takes seconds")
    toy_sigma = cols[4].select_slider("Toy sigma (plane units)", [0.05, 0.1, 0.2, 0.4, 0.8, 1.6], 0.4,
                                      key="toy_sigma", help="Bandwidth for the 2-D teaching cloud on the right")
    return int(layer), float(sigma), float(alpha), kind, float(toy_sigma)


def body(ws: Workspace, layer: int, sigma: float, alpha: float, kind: str, toy_sigma: float) -> None:
    left, right = st.columns([3, 2])
    with left:
        with st.spinner(f"Fitting the kernel hull of layer {layer}..."), ui.core_errors():
            fit = layer_fit(ws, layer, sigma, alpha)
        r2 = fit.scores.numpy()
        picks = np.argsort(-r2, kind="stable")[: max(1, int(len(r2) * PICK_SHARE))]
        kept, note = kept_mask(ws, layer)
        chart = st.empty()

        def draw(coords: np.ndarray, name: str) -> None:
            chart.plotly_chart(figures.projection(coords, r2, kept, picks,
                                                  f"Layer {layer}: down-projection rows, {name}"),
                               key=f"hull_proj_{name[:4]}")
        coords = projection_coords(ws, layer, kind, state.seed(), st.empty(), draw)
        moved = np.zeros(len(coords), dtype=bool)
        if kind == "PCA":
            coords, moved = projection.clip_to_quantiles(coords)
        draw(coords, kind)
        edge = (f" {int(moved.sum())} outlying neurons lie beyond the 1st to 99th percentile and are drawn "
                "on the edge." if moved.any() else "")
        fitted = (f"the closed form (one step from the uniform start: the default for layers wider than "
                  f"{AUTO_EXACT_MAX_WIDTH} neurons)" if fit.stop_rule == "closed_form" else
                  f"{fit.iterations} iterations ({'converged' if fit.converged else 'not converged'}) at "
                  f"alpha = {alpha:g}")
        st.caption(f"{note} Rings: the top {PICK_SHARE:.0%} by R2. Kernel sigma = {sigma:g} x median "
                   f"distance = {fit.sigma:.4g}; {fitted}.{edge}")
        st.caption(f"The hull is fitted in the full {ws.shape.hidden}-dimensional weight space; this 2-D "
                   "picture only places the points, so a ringed point may sit inside the drawn cloud.")
    with right:
        points = toy.toy_points()
        frame = toy.toy_r2(points, toy_sigma)
        st.plotly_chart(figures.toy_figure(frame, toy.hull_vertices(points), toy_sigma), key="hull_toy")
        st.caption(f"{toy.hit_rate(frame):.0%} of the hull's vertices are among R2's top "
                   f"{int(frame['vertex'].sum())}. A small sigma treats every point as its own island; "
                   "a larger one makes R2 pick the points the others cannot represent: the hull.")
