"""Screenshots of every page of the real app on the embedded demo, for the README.

    python scripts/screenshots.py [--out assets/screenshots] [--port 8599] [--layerwise]

Starts ``streamlit run app.py`` on 127.0.0.1 (the demo must be prepared: ``python -m kcm_core demo
prepare``), drives headless Debian Chromium with Playwright (``executable_path`` = ``which chromium``)
through the six pages with one typical interaction each (latency measured, a lasso on the scatter,
UMAP, the method comparison), and writes ``1-model.png`` ... ``6-export.png``. Minutes on two cores:
the first visit of a page computes what it shows.

``--layerwise`` instead opens the LM demo's model folder layer by layer (``KCM_APP_STREAM=1``, the path
for models larger than memory; the LM demo must be prepared: ``python -m kcm_core demo prepare lm``)
on its calibration reviews, and writes ``7-layerwise-prune.png`` and ``8-layerwise-export.png`` (the
Prune page's readouts, then an export to a temporary folder).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kcm_app.testing import environment_without_app_choices, lasso, serve  # noqa: E402
VIEWPORT = {"width": 1440, "height": 2000}
WAIT_MS = 600_000          # a page's first visit on the demo computes scores (tens of seconds)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def settle(page) -> None:
    """Wait until the app's script run has finished, then let the charts draw."""
    page.wait_for_timeout(1500)
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=WAIT_MS)
    page.wait_for_timeout(2000)


def measure_latency(page) -> None:
    page.get_by_role("button", name="Measure latency").click()


def lasso_the_upper_right(page) -> None:
    chart = page.locator("[class*='st-key-scores_scatter_']")
    chart.scroll_into_view_if_needed()
    lasso(page, chart.locator(".nsewdrag").first, [(0.55, 0.05), (0.98, 0.05), (0.98, 0.5), (0.55, 0.5)])


def show_umap(page) -> None:
    page.get_by_test_id("stRadio").filter(has_text="Projection").get_by_text("UMAP").click()


def compare_methods(page) -> None:
    page.get_by_role("button", name="Compare").click()


# (file, page URL, the interaction shown)
STEPS = (("1-model.png", "?budget=0.60&method=kcm", None),            # the first page lives at /
         ("2-cost.png", "cost", measure_latency),
         ("3-scores.png", "scores", lasso_the_upper_right),
         ("4-hull.png", "hull", show_umap),
         ("5-prune.png", "prune?budget=0.60&method=kcm", compare_methods),
         ("6-export.png", "export", None))


def export_to_temporary_folder(page) -> None:
    import tempfile
    folder = Path(tempfile.mkdtemp(prefix="kcm-layerwise-shot-")) / "pruned"
    field = page.get_by_role("textbox", name="Output folder")
    field.fill(str(folder))
    field.press("Enter")
    settle(page)
    page.get_by_role("button", name="Prune and save").click()
    page.get_by_text("Written layer by layer").wait_for(timeout=WAIT_MS)


LAYERWISE_STEPS = (("7-layerwise-prune.png", "prune?budget=0.80&method=kcm", None),
                   ("8-layerwise-export.png", "export?budget=0.80&method=kcm", export_to_temporary_folder))


def shoot(url: str, out: Path, steps=STEPS) -> None:
    from playwright.sync_api import expect, sync_playwright
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("Debian chromium is not installed (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport=VIEWPORT)
        for name, path, interaction in steps:
            log(f"  {path}")
            page.goto(f"{url}/{path}", wait_until="domcontentloaded")
            expect(page.get_by_test_id("stSidebar")).to_be_visible(timeout=WAIT_MS)
            settle(page)
            if interaction is not None:
                interaction(page)
                settle(page)
            page.mouse.move(VIEWPORT["width"] - 5, VIEWPORT["height"] - 5)   # no tooltip in the picture
            page.wait_for_timeout(500)
            page.screenshot(path=str(out / name))
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "screenshots")
    parser.add_argument("--port", type=int, default=8599)
    parser.add_argument("--layerwise", action="store_true",
                        help="the LM demo's folder opened layer by layer: Prune and Export only")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.layerwise:
        from kcm_core.demos import lm as demo_lm
        summary = demo_lm.stored_summary()
        if summary is None:
            raise SystemExit("the LM demo is not prepared: python -m kcm_core demo prepare lm")
        env = {**environment_without_app_choices(), "KCM_APP_MODEL": str(summary["model_dir"]),
               "KCM_APP_STREAM": "1", "KCM_APP_DATA": str(demo_lm.lm_demo_dir() / "calibration.jsonl")}
        with serve(env, port=args.port) as url:
            shoot(url, args.out, LAYERWISE_STEPS)
        log(f"wrote {', '.join(name for name, _, _ in LAYERWISE_STEPS)} to {args.out}")
        return
    from kcm_core.demos.classifier import demo_ready
    if not demo_ready():
        raise SystemExit("the demo is not prepared: python -m kcm_core demo prepare")
    with serve(environment_without_app_choices(), port=args.port) as url:
        shoot(url, args.out)
    log(f"wrote {', '.join(sorted(p.name for p in args.out.glob('*.png')))} to {args.out}")


if __name__ == "__main__":
    main()
