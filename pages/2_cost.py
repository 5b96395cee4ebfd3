"""Cost: per-block MACs and parameters, the formula, the FFN share, measured latency per block."""
from kcm_app import ui
from kcm_app.views import cost

if ui.entry_guard():           # False: run on its own, this page had app.py run it (sidebar and all)
    cost.page()
