"""Kernel hull: one layer's neurons in 2-D with R2's picks and the kept set; a 2-D teaching view."""
import streamlit as st

from kcm_app import ui
from kcm_app.views import hull

ui.entry_guard(__file__)
st.title("Kernel hull")
ws = ui.require_workspace()
cols = st.columns(5)
layer = cols[0].number_input("Layer", 0, ws.shape.layers - 1, 0, key="hull_layer",
                             help="Which layer's down-projection rows to draw (one point per neuron)")
sigma = cols[1].select_slider("sigma (x median distance)", [0.1, 0.25, 0.5, 1.0, 2.0, 4.0], 1.0,
                              key="hull_sigma", help="Kernel bandwidth relative to the median pairwise distance")
alpha = cols[2].select_slider("alpha", [0.001, 0.005, 0.01, 0.05, 0.1], 0.01, key="hull_alpha",
                              help="Stop when the relative change of C falls below alpha")
kind = cols[3].radio("Projection", ["PCA", "UMAP"], key="hull_projection", horizontal=True,
                     help="PCA is instant; UMAP shows neighbourhoods better and takes seconds")
toy_sigma = cols[4].select_slider("Toy sigma (plane units)", [0.05, 0.1, 0.2, 0.4, 0.8, 1.6], 0.4,
                                  key="toy_sigma", help="Bandwidth for the 2-D teaching cloud on the right")
hull.page(ws, int(layer), float(sigma), float(alpha), kind, float(toy_sigma))
