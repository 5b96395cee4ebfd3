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

from kcm_app import navigation  # noqa: E402  (Streamlit only: drawn before torch is imported)

st.set_page_config(page_title="KCM Explorer", page_icon=str(navigation.ASSETS / "logo.svg"), layout="wide")
st.logo(str(navigation.ASSETS / "logo.svg"), size="large")
page = st.navigation(navigation.pages(), position="sidebar")
waiting = navigation.loading_view(page)   # the page's title (the landing page: its introduction) meanwhile

from kcm_app import sidebar, ui  # noqa: E402  (kcm_core and torch: seconds on a new server)

ui.style()
ui.init_state()
sidebar.load()
waiting.empty()
ui.sync_url()
ui.run_page(page)          # marked as coming through here (see ui.entry_guard)
