"""Prune: the budget slider with live readouts, and accuracy vs FLOPs for several methods."""
from kcm_app import ui
from kcm_app.views import prune

if ui.entry_guard():           # False: run on its own, this page had app.py run it (sidebar and all)
    prune.page()
