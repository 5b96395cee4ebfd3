"""Neuron scores: R2, D2, R2D2 and the baselines, per neuron and per layer."""
import streamlit as st

from kcm_app import ui
from kcm_app.views import scores

ui.entry_guard(__file__)
st.title("Neuron scores")
ws = ui.require_workspace()
left, mid, right = st.columns([2, 1, 1])
column = left.selectbox("Score", list(scores.SCORES), format_func=scores.SCORES.get, key="scores_column",
                        help="R2D2 = R2 x normalised D2 is KCM's score; the others are its parts and baselines")
layer = mid.number_input("Layer", 0, ws.shape.layers - 1, 0, key="scores_layer",
                         help="Layer for the top/bottom tables")
top_n = right.number_input("Rows", 3, 50, 10, key="scores_top_n", help="Neurons listed at each end")
scores.page(ws, column, int(layer), int(top_n))
