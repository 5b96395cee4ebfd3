"""The pages and what a first visitor sees while the model loads, without torch: app.py draws this
before it imports the rest of ``kcm_app``, which reaches ``kcm_core`` and torch (about 2 s on a new
server). Streamlit is imported inside the functions, so the plain modules (``state``, ``theme``) can
read the constants here without it."""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
WORKSPACE = "workspace"          # the session-state key of the loaded Workspace (kcm_app.state)

# (script, title, icon, url path): the pages registered with st.navigation by app.py
PAGES = (
    ("pages/1_model.py", "Model and data", ":material/memory:", "model"),
    ("pages/2_cost.py", "Cost", ":material/functions:", "cost"),
    ("pages/3_scores.py", "Neuron scores", ":material/scatter_plot:", "scores"),
    ("pages/4_hull.py", "Kernel hull", ":material/hexagon:", "hull"),
    ("pages/5_prune.py", "Prune", ":material/content_cut:", "prune"),
    ("pages/6_export.py", "Export", ":material/download:", "export"),
)

INTRO = """**KCM Explorer** removes feed-forward (FFN) neurons from a transformer and shows what that
saves and what it costs in accuracy (for a language model: perplexity). Kernelized Convex Masking (KCM; Nova, Dai and Schuurmans, ICML 2023)
ranks each FFN neuron by R2, how hard its output weights are to rebuild from the other neurons' (a kernel
convex hull, weights only), times D2, how strongly it fires on unlabeled data. It keeps the best-ranked
neurons under a FLOPs budget, rescales them so each layer's output stays close to the unpruned one, and
slices the layers smaller: no labels, no gradients, no retraining. **Where to start:** open **Prune** and
move the budget slider; **Neuron scores** shows the ranking, **Kernel hull** shows R2 on one layer,
**Cost** explains why removing x% of neurons saves less than x% of FLOPs."""


def pages() -> list:
    import streamlit as st
    return [st.Page(script, title=title, icon=icon, url_path=url, default=(i == 0))
            for i, (script, title, icon, url) in enumerate(PAGES)]


def loading_view(page):
    """Before the sidebar loads the model (seconds on a new server: imports and weights), a placeholder
    in the main area with the page's title, and on the landing page its introduction, so a first
    visitor reads what the app does instead of a blank page. Returns the placeholder, emptied by
    app.py before the page draws itself; nothing is drawn once the session holds a workspace."""
    import streamlit as st
    holder = st.empty()
    if st.runtime.exists() and st.session_state.get(WORKSPACE) is None:    # not in bare `python app.py`
        with holder.container():
            st.title(page.title)
            if page.url_path in ("", PAGES[0][3]):
                st.markdown(INTRO)
            st.caption("Loading the model and data (progress in the sidebar)...")
    return holder
