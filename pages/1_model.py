"""Model and data: architecture, where the data came from, the unpruned model's accuracy."""
from kcm_app import ui
from kcm_app.views import model

if ui.entry_guard():           # False: run on its own, this page had app.py run it (sidebar and all)
    model.page()
