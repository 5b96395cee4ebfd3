"""Model and data: architecture, where the data came from, the unpruned model's accuracy."""
import streamlit as st

from kcm_app import ui
from kcm_app.views import model

ui.entry_guard(__file__)
st.title("Model and data")
ws = ui.require_workspace()
score_now = st.button("Score all neurons with KCM now", key="score_now",
                      help="Runs R2 (kernel hull on the weights) and D2 (activations on the sample) once; "
                           "every page reuses the result.")
model.page(ws, score_now)
