"""Driving the app from tests, benchmarks and scripts: a real server on localhost, and a lasso in a
real browser. Nothing here is imported by the app itself.

``AppTest.from_file("app.py")`` needs no help: every run goes through the entry point, because a page
that Streamlit runs on its own (the ``pages/`` folder's old mode, which ``AppTest`` falls back to on
every run after the first) runs app.py in its place, in the same run (``kcm_app.ui.entry_guard``).
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


def finish_background(timeout: float = 600, stop: bool = False) -> None:
    """Wait for every background precompute this process started (``kcm_app.background``), so none
    writes into a test's temporary cache folder after the test. ``stop``: ask each to stop at its next
    progress report first (a test's teardown, which needs none of its results)."""
    from .resources import _precompute_registry
    registry, lock = _precompute_registry()
    with lock:
        works = list(registry.values())
    if stop:
        for work in works:
            work.stop()
    for work in works:
        if not work.wait_done(timeout):
            raise TimeoutError(f"background work still running after {timeout} s: {work.current}")


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
