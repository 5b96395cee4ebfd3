"""How long the browser takes to draw the Neuron scores page's two heavy charts, the way the page
drew them before and the way it draws them now, in paired rounds.

    python benchmarks/bench_chart_draw.py [--rounds 10] [--layers 6] [--width 1536]

Scores of the classifier demo's shape (``--layers`` x ``--width`` neurons; synthetic and seeded: a
log-normal R2, a beta D2, R2D2 their product, so the R2 tail is heavy as real R2 is) are drawn in
headless Debian Chromium (software rendering, as the real-browser benchmark uses) with Plotly's own
script, one chart at a time, each timed from ``Plotly.newPlot`` until two animation frames later:

* **violins**: before, one Plotly violin trace per layer (the browser computes each kernel density
  from every score); now, ``figures.score_violins`` on ``charts.score_densities`` (densities computed
  on the server, the browser draws outlines);
* **scatter**: before, every layer's neurons as one WebGL trace (``figures.r2_d2_scatter`` on the whole
  frame); now, the chosen layer's neurons as SVG points (the same function on one layer).

Each round draws both versions of both charts, in alternating order, so load drift hits both; the
ratio before / now is the median per-round ratio with a 95% bootstrap interval over rounds
(``common.ratio_interval``). Writes benchmarks/results/chart_draw.json and .md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine_line, ratio_interval, ratio_text, run_environment, write_results  # noqa: E402
from kcm_app import charts, figures  # noqa: E402
from kcm_app.theme import base_layout  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
DRAW = """async ([id, spec]) => {
    const t = performance.now();
    Plotly.purge(id);
    await Plotly.newPlot(id, spec.data, spec.layout);
    await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
    return performance.now() - t;
}"""


def score_frame(layers: int, width: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"layer": np.repeat(np.arange(layers), width), "neuron": np.tile(np.arange(width), layers),
                          "r2": rng.lognormal(-6, 2, layers * width), "d2": rng.beta(2, 5, layers * width)})
    frame["r2d2"] = frame["r2"] * frame["d2"]
    return frame


def plotly_violins(frame: pd.DataFrame, column: str):
    """The page's violins before: one Plotly violin trace per layer, its density computed in the browser."""
    import plotly.graph_objects as go
    fig = go.Figure()
    for layer in sorted(frame["layer"].unique()):
        fig.add_violin(y=frame.loc[frame["layer"] == layer, column].to_numpy(np.float32), name=f"layer {layer}",
                       points=False, meanline_visible=True, showlegend=False)
    fig.update_layout(**base_layout(title=f"{column} per layer"))
    return fig


def charts_to_draw(frame: pd.DataFrame, column: str = "r2d2") -> dict[str, dict[str, str]]:
    """{chart: {"before": figure JSON, "now": figure JSON}}."""
    return {
        "violins": {"before": plotly_violins(frame, column).to_json(),
                    "now": figures.score_violins(charts.score_densities(frame, column), column).to_json()},
        "scatter": {"before": figures.r2_d2_scatter(frame, column).to_json(),
                    "now": figures.r2_d2_scatter(frame[frame["layer"] == 0].reset_index(drop=True),
                                                 column).to_json()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=1536)
    args = parser.parse_args()
    import plotly
    from playwright.sync_api import sync_playwright
    load_before = os.getloadavg()
    specs = charts_to_draw(score_frame(args.layers, args.width))
    script = (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_text()
    page_html = ("<html><body><div id='chart' style='width:1200px;height:460px'></div>"
                 f"<script>{script}</script></body></html>")
    html = Path("/tmp") / f"kcm-chart-draw-{os.getpid()}.html"
    html.write_text(page_html)
    ms: dict[str, dict[str, list[float]]] = {c: {"before": [], "now": []} for c in specs}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1300, "height": 600})
            page.goto(html.as_uri())
            for chart, versions in specs.items():          # one unrecorded draw each: the script warms up
                for spec in versions.values():
                    page.evaluate(f"async (s) => await ({DRAW})(['chart', JSON.parse(s)])", spec)
            for r in range(args.rounds):
                for chart, versions in specs.items():
                    order = ("before", "now") if r % 2 == 0 else ("now", "before")
                    for version in order:
                        ms[chart][version].append(page.evaluate(
                            f"async (s) => await ({DRAW})(['chart', JSON.parse(s)])", versions[version]))
                print(f"round {r + 1}: " + ", ".join(f"{c} {ms[c]['before'][-1]:.0f} -> {ms[c]['now'][-1]:.0f} ms"
                                                     for c in ms), file=sys.stderr, flush=True)
            browser.close()
    finally:
        html.unlink(missing_ok=True)
    data = {"settings": {"rounds": args.rounds, "layers": args.layers, "width": args.width},
            "payload_kb": {c: {v: len(s) / 1024 for v, s in versions.items()} for c, versions in specs.items()},
            "milliseconds": ms,
            "speedup": {c: ratio_interval(ms[c]["before"], ms[c]["now"], seed=0) for c in ms},
            "environment": run_environment(load_before, threads=2)}
    write_results("chart_draw", data, markdown(data))
    print(markdown(data))


def markdown(data: dict) -> str:
    s = data["settings"]
    lines = ["# Drawing the Neuron scores charts in headless Chromium: before and now", "",
             f"{s['layers']} layers x {s['width']} neurons of synthetic scores, {s['rounds']} paired rounds; "
             "milliseconds from `Plotly.newPlot` to two animation frames later (median [min, max]); "
             "before / now as the median per-round ratio [95% bootstrap interval over rounds].", "",
             "| chart | before | now | before / now | figure JSON (KB) before, now |", "|---|---|---|---|---|"]
    for chart, versions in data["milliseconds"].items():
        cells = [f"{statistics.median(v):.0f} [{min(v):.0f}, {max(v):.0f}]" for v in versions.values()]
        kb = data["payload_kb"][chart]
        lines.append(f"| {chart} | {cells[0]} | {cells[1]} | {ratio_text(data['speedup'][chart])} | "
                     f"{kb['before']:.0f}, {kb['now']:.0f} |")
    lines += ["", "Before: violins as Plotly violin traces (densities computed in the browser), the scatter "
              "with every layer's neurons in WebGL. Now: violins from `charts.score_densities`, the scatter "
              "with one layer's neurons as SVG points (*All layers* still draws the former).", "",
              machine_line(data["environment"]), "", f"Command: `{data['environment']['command']}`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
