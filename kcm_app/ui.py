"""Streamlit helpers shared by the entry point and the pages: state, URL, progress, errors, guards."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator

import streamlit as st

from kcm_core.pipeline import METHODS, PruneConfig

from . import state, theme
from .engine import APP_SCALE_SAMPLES, Workspace

WS = "workspace"
ENTRY = "_entry_ran"

# (script, title, icon, url path): the pages registered with st.navigation by app.py
PAGES = (
    ("pages/1_model.py", "Model and data", ":material/memory:", "model"),
    ("pages/2_cost.py", "Cost", ":material/functions:", "cost"),
    ("pages/3_scores.py", "Neuron scores", ":material/scatter_plot:", "scores"),
    ("pages/4_hull.py", "Kernel hull", ":material/hexagon:", "hull"),
    ("pages/5_prune.py", "Prune", ":material/content_cut:", "prune"),
    ("pages/6_export.py", "Export", ":material/download:", "export"),
)


# --------------------------------------------------------------------------- navigation

def pages() -> list:
    return [st.Page(script, title=title, icon=icon, url_path=url, default=(i == 0))
            for i, (script, title, icon, url) in enumerate(PAGES)]


def mark_entry() -> None:
    st.session_state[ENTRY] = True


def entry_guard(script: str) -> None:
    """Send a page that runs without the entry point back through it.

    Until the first ``st.navigation`` call of a server process, Streamlit treats a ``pages/`` folder
    the old way: a deep link (``/prune``) as the very first request runs that script alone, without
    app.py's sidebar. Registering the navigation (which ends the old mode) and switching to the same
    page reruns it through app.py, with the link's query parameters.
    """
    if st.session_state.get(ENTRY):
        return
    nav = pages()
    st.navigation(nav, position="hidden")
    name = Path(script).name
    target = next(p for p, spec in zip(nav, PAGES) if Path(spec[0]).name == name)
    st.switch_page(target, query_params=st.query_params.to_dict())


# --------------------------------------------------------------------------- state and URL

def init_state() -> None:
    """Defaults first, then whatever a shared link carries (once per session)."""
    if st.session_state.get("_initialised"):
        return
    values = {**vars(state.DEFAULTS), **state.parse_query(st.query_params.to_dict())}
    for key, value in values.items():
        st.session_state.setdefault(key, value)
    st.session_state["_initialised"] = True


def sync_url() -> None:
    """Write the view (budget, method) into the URL so that a copied link reproduces it."""
    wanted = state.query_for({k: st.session_state[k] for k in state.URL_KEYS})
    if {k: st.query_params.get(k) for k in wanted} != wanted:
        st.query_params.update(wanted)


def copy_widget(widget_key: str, key: str) -> None:
    """on_change callback: a widget's value becomes the persistent session value."""
    st.session_state[key] = st.session_state[widget_key]


def prune_config(**overrides) -> PruneConfig:
    """The session's method and budget with the app's settings (small scaling sample)."""
    values = dict(method=st.session_state.get("method", state.DEFAULTS.method),
                  budget=float(st.session_state.get("budget", state.DEFAULTS.budget)),
                  multiple=int(st.session_state.get("multiple", state.DEFAULTS.multiple)),
                  scale_samples=APP_SCALE_SAMPLES, seed=int(st.session_state.get("seed", 0)))
    values.update(overrides)
    return PruneConfig(**values)


def method_options(ws: Workspace) -> list[str]:
    """Every method; the label-using ones only when the data has labels."""
    return [m for m, spec in METHODS.items() if ws.has_labels or not spec.uses_labels]


def method_select(ws: Workspace, container) -> str:
    """The method selector (its value is kept across pages and written to the URL)."""
    options = method_options(ws)
    if st.session_state["method"] not in options:
        st.session_state["method"] = state.DEFAULTS.method
    st.session_state["w_method"] = st.session_state["method"]
    return container.selectbox(
        "Method", options, format_func=theme.method_label, key="w_method", on_change=copy_widget,
        args=("w_method", "method"),
        help="How neurons are ranked (one colour per method on every chart); label-using methods "
             "appear when the data has labels")


def multiple_select(container) -> int:
    st.session_state["w_multiple"] = st.session_state["multiple"]
    return container.selectbox(
        "Round widths to a multiple of", state.MULTIPLES, key="w_multiple", on_change=copy_widget,
        args=("w_multiple", "multiple"),
        help="Multiples of 8, 16 or 64 run faster on most hardware; the budget still holds")


# --------------------------------------------------------------------------- page furniture

def style() -> None:
    st.markdown(f"<style>{theme.css()}</style>", unsafe_allow_html=True)


def workspace() -> Workspace | None:
    return st.session_state.get(WS)


def require_workspace() -> Workspace:
    """The loaded model and data, or an explanation of what to do first (and stop the page)."""
    ws = workspace()
    if ws is None:
        st.info("No model is loaded yet. Choose a model and data in the sidebar (the embedded demo is "
                "the default); this page fills in once they load.")
        st.stop()
    return ws


class ProgressBar:
    """A ``kcm_core`` progress callback drawing an ``st.progress`` bar (created on first use)."""

    def __init__(self, label: str, container=None, min_interval: float = 0.1) -> None:
        self.label = label
        self.container = container if container is not None else st.empty()
        self.bar = None
        self.min_interval = min_interval
        self._last = 0.0

    def __call__(self, message: str, fraction: float) -> None:
        now = time.perf_counter()
        if self.bar is not None and now - self._last < self.min_interval and fraction < 1:
            return
        self._last = now
        text = f"{self.label}: {message}"
        if self.bar is None:
            self.bar = self.container.progress(fraction, text=text)
        else:
            self.bar.progress(fraction, text=text)

    def clear(self) -> None:
        self.container.empty()


@contextlib.contextmanager
def progress(label: str) -> Iterator[ProgressBar]:
    """A progress bar for the block, removed when it ends."""
    bar = ProgressBar(label)
    try:
        yield bar
    finally:
        bar.clear()


@contextlib.contextmanager
def core_errors(stop: bool = True, runtime: bool = False) -> Iterator[None]:
    """Errors from the core (bad input, missing files) become ``st.error`` with the message;
    with ``runtime``, so do torch's ``RuntimeError``s (e.g. an input longer than the model takes)."""
    caught = (ValueError, OSError) + ((RuntimeError,) if runtime else ())
    try:
        yield
    except caught as err:
        st.error(str(err) or type(err).__name__)
        if stop:
            st.stop()


def threads_note() -> str:
    import torch
    return (f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"{'GPU' if torch.cuda.is_available() else 'CPU'}.")


def caption_env(seq_len: float, batch: int) -> str:
    return f"Measured on this machine: batch {batch} x {seq_len:g} tokens, {threads_note()}"
