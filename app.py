"""KCM Explorer: Kernelized Convex Masking at work, live.

    streamlit run app.py

Opens on the embedded demo (prepared on first start, with a progress bar). ``KCM_APP_MODEL=<folder>``
and ``KCM_APP_DATA=<file>`` start it on another local model and data file. This entry point holds
the page config, the shared sidebar (model, data, sample) and the navigation over ``pages/``.
"""
import os

# Before torch loads: OpenMP threads that spin while they wait stall for up to a second per forward
# pass when the cores are shared (other sessions computing, other processes); passive waiting does not.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import streamlit as st  # noqa: E402

from kcm_app import sidebar, ui  # noqa: E402
from kcm_app.theme import ASSETS  # noqa: E402

st.set_page_config(page_title="KCM Explorer", page_icon=str(ASSETS / "logo.svg"), layout="wide")
ui.style()
ui.init_state()
st.logo(str(ASSETS / "logo.svg"), size="large")

page = st.navigation(ui.pages(), position="sidebar")
waiting = ui.loading_view(page)    # the page's title (and the landing page's introduction) while loading
sidebar.load()
waiting.empty()
ui.sync_url()
ui.run_page(page)          # marked as coming through here (see ui.entry_guard)
