"""Kernel hull: one layer's neurons in 2-D with R2's picks and the kept set; a 2-D teaching view."""
from kcm_app import ui
from kcm_app.views import hull

if ui.entry_guard():           # False: run on its own, this page had app.py run it (sidebar and all)
    hull.page()
