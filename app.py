"""KCM Explorer: Kernelized Convex Masking at work, live.

    streamlit run app.py

Opens on the embedded demo (prepared on first start, with a progress bar). ``KCM_APP_MODEL=<folder>``
and ``KCM_APP_DATA=<file>`` start it on another local model and data file. This entry point holds
the page config, the shared sidebar (model, data, sample) and the navigation over ``pages/``.
"""
import streamlit as st

from kcm_app import sidebar, ui
from kcm_app.theme import ASSETS

st.set_page_config(page_title="KCM Explorer", page_icon=str(ASSETS / "logo.svg"), layout="wide")
ui.style()
ui.init_state()
st.logo(str(ASSETS / "logo.svg"), size="large")

ui.mark_entry()
page = st.navigation(ui.pages(), position="sidebar")
sidebar.load()
ui.sync_url()
page.run()
