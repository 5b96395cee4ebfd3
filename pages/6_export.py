"""Export: slice the model for real and save or download it, with a report and the figures."""
from kcm_app import ui
from kcm_app.views import export

if ui.entry_guard():           # False: run on its own, this page had app.py run it (sidebar and all)
    export.page()
