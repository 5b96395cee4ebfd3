"""The real app in a real browser: ``streamlit run app.py`` on 127.0.0.1 with the tiny model, driven
by Playwright in headless Debian Chromium. Moves the budget slider and checks the readouts change.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from app_tiny import write_tiny

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
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


@pytest.fixture
def server(tmp_path):
    model_dir, csv = write_tiny(tmp_path / "tiny")
    port = free_port()
    env = {**os.environ, "KCM_APP_MODEL": str(model_dir), "KCM_APP_DATA": str(csv)}
    log = open(tmp_path / "streamlit.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1",
         "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
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
        log.close()


def metric_value(page, label: str) -> str:
    box = page.get_by_test_id("stMetric").filter(has_text=label).first
    return box.get_by_test_id("stMetricValue").inner_text(timeout=60_000)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium is not installed")
def test_slider_moves_readouts_in_a_real_browser(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{server}/prune?budget=0.8&method=kcm", wait_until="domcontentloaded")
            expect(page.get_by_test_id("stMetric").filter(has_text="Accuracy").first).to_be_visible(
                timeout=90_000)
            before = metric_value(page, "Relative FLOPs")
            params_before = metric_value(page, "Parameters")
            thumb = page.get_by_role("slider", name="Relative FLOPs to keep")
            assert thumb.input_value() == "0.8"
            thumb.focus()
            for _ in range(10):
                page.keyboard.press("ArrowRight")
            expect(page.get_by_test_id("stMetric").filter(has_text="Relative FLOPs").first
                   .get_by_test_id("stMetricValue")).not_to_have_text(before, timeout=60_000)
            assert metric_value(page, "Parameters") != params_before
            page.wait_for_function("() => window.location.search.includes('budget=0.90')", timeout=30_000)
            shot = tmp_path / "prune.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()
