"""Driving the app from tests, benchmarks and scripts: ``AppTest`` the way the server runs it, a real
server on localhost, and a lasso in a real browser. Nothing here is imported by the app itself.

``entry_point_runs``: Streamlit treats a ``pages/`` folder beside the entry point the old (MPA v1) way until the first
``st.navigation`` call of a process; the server then keeps the new way, so every rerun goes through
``app.py`` (sidebar included) and on to the page. ``AppTest`` resets that flag before *every* run, so
from the second run on it executes the current page script alone: no sidebar, and the sidebar's
widget state is dropped. ``entry_point_runs`` undoes the reset for the runs inside it.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO, Iterator, Mapping

ROOT = Path(__file__).resolve().parents[1]


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"streamlit did not answer at {url} within {timeout} s")


@contextlib.contextmanager
def serve(env: Mapping[str, str], log: IO | None = None, port: int | None = None) -> Iterator[str]:
    """``streamlit run app.py`` on 127.0.0.1 with ``env``; yields its URL once it answers, then stops it."""
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1",
         "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=dict(env), stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def environment_without_app_choices() -> dict[str, str]:
    """This process's environment minus the ``KCM_APP_*`` start-up choices (so the app opens the demo)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("KCM_APP_")}


def lasso(page, area, fractions: list[tuple[float, float]]) -> None:
    """Drag a closed lasso (Playwright mouse) through points given as fractions of ``area``'s box
    (x to the right, y down)."""
    box = area.bounding_box()
    points = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in fractions]
    page.mouse.move(*points[0])
    page.mouse.down()
    for x, y in points[1:] + points[:1]:
        page.mouse.move(x, y, steps=8)
    page.mouse.up()
