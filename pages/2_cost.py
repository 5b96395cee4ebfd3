"""Cost: per-block MACs and parameters, the formula, the FFN share, measured latency per block."""
import streamlit as st

from kcm_app import ui
from kcm_app.views import cost

ui.entry_guard(__file__)
st.title("Cost")
ws = ui.require_workspace()
left, mid, right = st.columns([3, 1, 1])
seq_len = left.select_slider("Sequence length s (tokens)", [8, 16, 25, 32, 64, 128, 256, 512, 1024, 2048],
                             value=min([8, 16, 25, 32, 64, 128, 256, 512], key=lambda v: abs(v - ws.seq_len)),
                             key="cost_seq_len",
                             help="Attention's s^2 term grows with length, so the FFN's share shrinks")
unit = mid.radio("Unit", ["MMACs", "MFLOPs"], key="cost_unit", horizontal=True,
                 help="Millions of multiply-accumulates; FLOPs = 2 x MACs")
measure = right.button("Measure latency", key="cost_measure",
                       help="Times every block of this model on this machine (a private copy)")
cost.page(ws, float(seq_len), unit, measure)
