"""Streamlit helpers shared by the entry point and the pages: navigation, the entry guard, URL,
progress, errors. Session values are read and written through ``kcm_app.state``."""
from __future__ import annotations

import contextlib
import runpy
import time
from pathlib import Path
from typing import Iterator

import streamlit as st

from kcm_core.pipeline import PruneConfig
from kcm_core.repair import RepairConfig

from . import state, theme
from .navigation import PAGES
from .engine import APP_SCALE_SAMPLES, Workspace, scale_samples

ENTRY_POINT = Path(__file__).resolve().parents[1] / "app.py"

# --------------------------------------------------------------------------- navigation

def run_page(page) -> None:
    """app.py's last step: run the chosen page, marked as coming through the entry point."""
    state.mark_entry()
    state.set_page(next((script for script, _, _, url in PAGES if url == page.url_path), PAGES[0][0]))
    page.run()


def rerun_page() -> None:
    """A whole-app rerun of the page this session is on, from a fragment. (``st.rerun()`` from a
    fragment's own rerun lands on the default page under ``st.navigation``.)"""
    st.switch_page(state.page() or PAGES[0][0], query_params=state.query_for(state.view()))


def entry_guard() -> bool:
    """True when app.py ran this page: draw it. Otherwise run app.py here and return False.

    Streamlit runs a ``pages/`` folder beside the entry point the old (MPA v1) way until the first
    ``st.navigation`` call of a process: the page script alone, without app.py's sidebar. That is
    what a deep link (``/prune``) gets as the very first request to a fresh server, and what
    ``AppTest`` does on every run after the first (it forgets the navigation before each run).
    app.py marks each run it hands to a page (``run_page``). An unmarked page runs app.py itself,
    in this same run: its ``st.navigation`` (public API) ends the old mode and picks this page by its
    URL path, then draws the sidebar and runs this page again, marked. Staying in the same run (no
    ``st.switch_page``) keeps the request's widget events: a button click survives the detour.
    """
    if state.take_entry_mark():
        return True
    runpy.run_path(str(ENTRY_POINT))
    return False


# --------------------------------------------------------------------------- state and URL

def init_state() -> None:
    """Defaults first, then whatever a shared link carries (once per session)."""
    params = st.query_params.to_dict()
    state.initialise(state.initial_values(params), state.link_problems(params), state.parse_query(params))


def sync_url() -> None:
    """Write the view (budget, method, multiple) into the URL so that a copied link reproduces it."""
    wanted = state.query_for(state.view())
    if {k: st.query_params.get(k) for k in wanted} != wanted:
        st.query_params.update(wanted)


def prune_config(**overrides) -> PruneConfig:
    """The session's method and budget with the app's settings (small scaling sample: sequences for
    a classifier, blocks for a language model)."""
    ws = state.workspace()
    samples = scale_samples(ws) if ws is not None else APP_SCALE_SAMPLES
    values = dict(method=state.method(), budget=state.budget(), multiple=state.multiple(),
                  scale_samples=samples, seed=state.seed(), repair=RepairConfig(state.repair()))
    values.update(overrides)
    return PruneConfig(**values)


# --------------------------------------------------------------------------- page furniture

def style() -> None:
    st.markdown(f"<style>{theme.css()}</style>", unsafe_allow_html=True)


def require_workspace() -> Workspace:
    """The loaded model and data, or an explanation of what to do first (and stop the page)."""
    ws = state.workspace()
    if ws is None:
        error = state.load_error()
        if error:
            st.error(f"The model and data did not load: {error}")
            st.info("What to do: correct the model or data in the sidebar (a folder with config.json "
                    "and weights; a CSV, TSV, JSON, JSONL, Parquet or TXT file with a text column), or "
                    "choose the embedded demo. This page fills in once they load.")
        else:
            st.info("No model is loaded yet. Choose a model and data in the sidebar (the embedded demo "
                    "is the default); this page fills in once they load.")
        st.stop()
    notices = state.notices()            # kept until dismissed: the next rerun (the live readouts,
    for notice in notices:               # the background work) would otherwise wipe them within a minute
        st.warning(notice)
    if notices and st.button("Dismiss", key="dismiss_notices", help="Hide the notices above"):
        state.take_notices()
        st.rerun()
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
    """Errors from the core (bad input, missing, damaged or refused files, a full disk:
    ``kcm_core.errors.clear_error_types``) become ``st.error`` with the message alone, never a stack
    trace with the server's paths; with ``runtime``, so do torch's ``RuntimeError``s (e.g. an input
    longer than the model takes). Anything else is a bug and stays visible as one."""
    from kcm_core.errors import clear_error_types, one_line
    caught = clear_error_types() + ((RuntimeError,) if runtime else ())
    try:
        yield
    except caught as err:
        st.error(one_line(err))
        if stop:
            st.stop()


def follow_background(ws: Workspace, steps: tuple[str, ...], bar: ProgressBar) -> None:
    """Wait for the background work's ``steps`` (``kcm_app.background``), drawing its progress on ``bar``:
    the page then reads their results instead of computing them a second time."""
    from . import resources
    work = resources.precompute(ws, state.seed())
    for step in steps:
        work.wait_for(step, bar)


LAYERWISE_NOTE = (
    "This model is opened layer by layer (it is larger than the memory available, or 'Layer by layer' "
    "is ticked): scores, the kernel hull and the export read one layer at a time from its files, so a "
    "first scoring takes longer (each pass reads every layer from disk again). Whatever runs the whole "
    "model is not available here: {missing}. Export the pruned model and run `python -m kcm_core "
    "evaluate` on its folder where it fits in memory.")


def layerwise_note(ws: Workspace, missing: str) -> bool:
    """On a model opened layer by layer: say what is slower and that ``missing`` is not available here
    (True); else nothing (False)."""
    if not ws.streamed:
        return False
    st.info(LAYERWISE_NOTE.format(missing=missing))
    return True


def threads_note() -> str:
    import torch
    return (f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"{'GPU' if torch.cuda.is_available() else 'CPU'}.")


def caption_env(seq_len: float, batch: int, what: str = "") -> str:
    """``what``: what the batch holds ("images"), when not token sequences."""
    return f"Measured on this machine: batch {batch}{' ' + what if what else ''} x {seq_len:g} tokens, {threads_note()}"
