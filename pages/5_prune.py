"""Prune: the budget slider with live readouts, and accuracy vs FLOPs for several methods."""
import streamlit as st

from kcm_app import charts, ui
from kcm_app.theme import method_label
from kcm_app.views import prune

ui.entry_guard(__file__)
st.title("Prune")
ws = ui.require_workspace()
left, right = st.columns([3, 1])
ui.method_select(ws, left)
ui.multiple_select(right)
prune.readouts(ws)
st.divider()
st.subheader("Compare methods")
left, mid, right = st.columns([3, 2, 1])
options = ui.method_options(ws)
methods = left.multiselect("Methods", options, default=prune.default_methods(options),
                           format_func=method_label, key="compare_methods", help="One line per method")
budgets = mid.multiselect("Relative FLOPs", charts.BUDGET_OPTIONS,
                          default=charts.budget_grid(ws.floor, points=3), key="compare_budgets",
                          help="Budgets to evaluate (each one: select, scale, slice, evaluate)")
run = right.button("Compare", key="compare_run", help="Evaluates the pairs not stored yet, with progress")
prune.compare(ws, methods, sorted(b for b in budgets if b >= ws.floor), run)
