"""One look for every chart: a colour per method and per cost block, axis units, Plotly defaults."""
from __future__ import annotations

from kcm_core.methods import METHODS

from .navigation import ASSETS

# One colour per method, the same on every chart (Okabe-Ito and Paul Tol's muted set, readable for
# colour-blind eyes); no two of the comparison's default methods share a hue.
METHOD_COLORS: dict[str, str] = {
    "kcm": "#D55E00",
    "r2": "#E69F00",
    "d2": "#56B4E9",
    "weight-magnitude": "#882255",
    "weight-magnitude-scale": "#44AA99",
    "output-magnitude": "#CC79A7",
    "random": "#999933",
    "mask-tuning": "#0072B2",
    "kcm-labels": "#009E73",
    "wanda-sp": "#8C564B",
    "flap": "#332288",
    "fluct-refit": "#117733",
    "fluct-refit-curve": "#DDCC77",
    "dense": "#000000",
}

# Score kinds shown on the scores page; the components of KCM borrow their method's colour.
SCORE_COLORS: dict[str, str] = {"r2d2": METHOD_COLORS["kcm"], "r2": METHOD_COLORS["r2"],
                                "d2": METHOD_COLORS["d2"]}

BLOCK_COLORS: dict[str, str] = {
    "qkv": "#1F77B4",
    "attn_out": "#6BAED6",
    "attn_matmul": "#9467BD",
    "ffn_up": "#D55E00",
    "ffn_down": "#F4A582",
    "embeddings": "#A0A0A0",
    "head": "#525252",
}

KEPT_COLOR = "#D55E00"
DROPPED_COLOR = "#C8C8C8"
HULL_COLOR = "#0072B2"

FONT = "Inter, Helvetica, Arial, sans-serif"


def method_label(name: str) -> str:
    return "Unpruned" if name == "dense" else METHODS[name].label


def base_layout(title: str | None = None, **overrides) -> dict:
    """Plotly layout defaults shared by every figure: title top left, legend under it, white ground."""
    layout = dict(
        template="plotly_white",
        font=dict(family=FONT, size=13),
        margin=dict(l=60, r=20, t=90, b=50),
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0),
        hoverlabel=dict(font_size=12),
    )
    if title is not None:
        layout["title"] = dict(text=title, x=0.01, xanchor="left", y=0.97, yanchor="top", yref="container",
                               font=dict(size=15))
    layout.update(overrides)
    return layout


def css() -> str:
    """The app's small stylesheet (assets/style.css)."""
    path = ASSETS / "style.css"
    return path.read_text() if path.exists() else ""
