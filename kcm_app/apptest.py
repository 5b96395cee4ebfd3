"""Driving the app with ``streamlit.testing.v1.AppTest`` the way the server runs it (tests, benchmarks).

Streamlit treats a ``pages/`` folder beside the entry point the old (MPA v1) way until the first
``st.navigation`` call of a process; the server then keeps the new way, so every rerun goes through
``app.py`` (sidebar included) and on to the page. ``AppTest`` resets that flag before *every* run, so
from the second run on it executes the current page script alone: no sidebar, and the sidebar's
widget state is dropped. ``entry_point_runs`` undoes the reset for the runs inside it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def entry_point_runs() -> Iterator[None]:
    """Within the block, every ``AppTest.run`` goes through the entry point, as on the server."""
    import streamlit.testing.v1.app_test as app_test
    from streamlit.runtime.pages_manager import PagesManager

    class EntryPointPages(PagesManager):
        def __init__(self, *args, **kwargs):
            PagesManager.uses_pages_directory = False      # what the server has after st.navigation
            super().__init__(*args, **kwargs)

    original = app_test.PagesManager
    app_test.PagesManager = EntryPointPages
    try:
        yield
    finally:
        app_test.PagesManager = original
        PagesManager.uses_pages_directory = None
