"""Page 4 body: one layer's neurons projected to 2-D with R2's picks and the kept set; the 2-D
teaching view beside it."""
from __future__ import annotations

import numpy as np
import streamlit as st
import torch

from kcm_core.hull import HullConfig, kernel_hull
from kcm_core.methods import METHODS

from .. import engine, figures, projection, resources, state, toy, ui
from ..engine import Workspace

PICK_SHARE = 0.05       # the top 5% of a layer by R2 are drawn as the hull picks


def layer_fit(ws: Workspace, layer: int, sigma: float, alpha: float):
    config = HullConfig(sigma=sigma, sigma_mode="median", alpha=alpha)
    return resources.store("results").get_or_compute(
        ("hull-layer", ws.model_key, layer, config),
        lambda: kernel_hull(torch.from_numpy(projection.layer_points(ws.model, layer)), config))


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
    """PCA at once; UMAP after it is computed (PCA is drawn in its place meanwhile)."""
    points = projection.layer_points(ws.model, layer)
    store = resources.store("results")
    pca = store.get_or_compute(("pca", ws.model_key, layer), lambda: projection.pca_2d(points))
    key = ("umap", ws.model_key, layer, seed)
    if kind == "PCA" or key in store:
        return pca if kind == "PCA" else store.get(key)
    draw(pca, "PCA (UMAP is computing...)")
    with placeholder, st.spinner("UMAP is computing (the first run also compiles it)..."):
        return store.get_or_compute(key, lambda: projection.umap_2d(points, seed=seed))


def page() -> None:
    """The whole page: title, the loaded workspace (or why there is none), the controls, the body."""
    st.title("Kernel hull")
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
    kind = cols[3].radio("Projection", ["PCA", "UMAP"], key="hull_projection", horizontal=True,
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
        draw(coords, kind)
        st.caption(f"{note} Rings: the top {PICK_SHARE:.0%} by R2. Kernel sigma = {sigma:g} x median "
                   f"distance = {fit.sigma:.4g}; {fit.iterations} iterations "
                   f"({'converged' if fit.converged else 'not converged'}) at alpha = {alpha:g}.")
    with right:
        points = toy.toy_points()
        frame = toy.toy_r2(points, toy_sigma)
        st.plotly_chart(figures.toy_figure(frame, toy.hull_vertices(points), toy_sigma), key="hull_toy")
        st.caption(f"{toy.hit_rate(frame):.0%} of the hull's vertices are among R2's top "
                   f"{int(frame['vertex'].sum())}. A small sigma treats every point as its own island; "
                   "a larger one makes R2 pick the points the others cannot represent: the hull.")
