"""Neuron scores: R2, D2, R2D2 and the baselines, per neuron and per layer."""
from kcm_app import ui
from kcm_app.views import scores

if ui.entry_guard():           # False: run on its own, this page had app.py run it (sidebar and all)
    scores.page()
