"""Plotly figures from the chart data of ``kcm_app.charts``; one colour per method/block, units on axes."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from kcm_core.flops import BLOCK_LABELS

from .charts import COLLAPSED_RATIO, Density
from .theme import (BLOCK_COLORS, DROPPED_COLOR, HULL_COLOR, KEPT_COLOR, METHOD_COLORS, SCORE_COLORS,
                    base_layout, method_label)

BLOCK_NAMES = {**BLOCK_LABELS, "head": "task head", "embeddings": "embeddings, norms, pooler",
               "qkv+attn_out": "attention and norms", "attention": "attention, norms, activation"}


def stacked_blocks(frame: pd.DataFrame, value: str, y_title: str, title: str) -> go.Figure:
    """A stacked bar per part (layer, embeddings, head) from a long (part, block, value) table."""
    fig = go.Figure()
    parts = list(dict.fromkeys(frame["part"]))
    for block in dict.fromkeys(frame["block"]):
        rows = frame[frame["block"] == block].set_index("part")
        fig.add_bar(name=BLOCK_NAMES.get(block, block), x=parts,
                    y=[rows[value].get(p, 0.0) for p in parts],
                    marker_color=BLOCK_COLORS.get(block.split("+")[0], "#888888"),
                    hovertemplate="%{x}<br>" + BLOCK_NAMES.get(block, block) + ": %{y:,.3g}<extra></extra>")
    fig.update_layout(**base_layout(barmode="stack", title=title, yaxis_title=y_title,
                                    xaxis_title="part of the model"))
    return fig


def param_summary(frame: pd.DataFrame) -> go.Figure:
    """One horizontal bar of the whole model's parameters by kind of block (a ``charts.param_frame``),
    each with its share: how much of the model the FFN rows that KCM prunes are."""
    totals = frame.groupby("block", sort=False)["value"].sum()
    fig = go.Figure()
    for block, value in totals.items():
        share = value / totals.sum()
        fig.add_bar(name=BLOCK_NAMES.get(block, block), y=["parameters"], x=[value], orientation="h",
                    marker_color=BLOCK_COLORS.get(block.split("+")[0], "#888888"),
                    text=[f"{share:.0%}"] if share >= 0.04 else None, textposition="inside",
                    hovertemplate=BLOCK_NAMES.get(block, block) + f": %{{x:,.0f}} ({share:.1%})<extra></extra>")
    fig.update_layout(**base_layout(barmode="stack", height=240, title="Where the parameters are (KCM prunes "
                                    "the FFN rows and columns)", xaxis_title="parameters"))
    fig.update_yaxes(showticklabels=False)
    return fig


def share_curve(frame: pd.DataFrame, current: float, unit: str = "sequence") -> go.Figure:
    """Share of counted MACs per kind of block vs sequence length (``unit``: "block" for a language
    model's token blocks, "image" for a ViT's tokens per image), the current length marked."""
    fig = go.Figure()
    colors = {"attention matrix products": BLOCK_COLORS["attn_matmul"],
              "attention projections": BLOCK_COLORS["qkv"], "FFN": BLOCK_COLORS["ffn_up"]}
    for column, color in colors.items():
        fig.add_scatter(x=frame["seq_len"], y=frame[column] * 100, name=column, mode="lines",
                        line=dict(color=color, width=3),
                        hovertemplate="s = %{x:.0f} tokens<br>%{y:.1f}%<extra>" + column + "</extra>")
    # a trace, not add_vline: shapes on a log axis take log10 coordinates
    fig.add_scatter(x=[current, current], y=[0, 100], mode="lines", name=f"s = {current:g}",
                    line=dict(color="#555555", dash="dot", width=1.5), hoverinfo="skip")
    image = unit == "image"             # a ViT: s is patches + 1, set by the image and patch size
    fig.update_layout(**base_layout(title="Where the MACs go as images get more patches" if image
                                    else f"Where the MACs go as {unit}s get longer",
                                    xaxis_title="tokens per image s (patches + 1)" if image
                                    else f"{unit} length s (tokens)", xaxis_type="log",
                                    yaxis_title="share of counted MACs (%)", yaxis_range=[0, 100]))
    return fig


def score_violins(densities: Sequence[Density], column: str, color: str | None = None,
                  label: str | None = None) -> go.Figure:
    """Per-layer distributions of one score as violins drawn from ``charts.score_densities`` (outline
    polygons and a median tick; hover gives the quartiles and the mean). The browser draws lines only:
    a Plotly violin trace would recompute each kernel density from every neuron's score there."""
    fig = go.Figure()
    color = color or SCORE_COLORS.get(column, METHOD_COLORS.get(column, "#555555"))
    label = label or column
    for d in densities:
        half = 0.42 * d.density
        fig.add_scatter(x=np.r_[d.layer - half, d.layer + half[::-1]].astype(np.float32),
                        y=np.r_[d.grid, d.grid[::-1]].astype(np.float32), mode="lines", fill="toself",
                        line=dict(color=color, width=1), fillcolor=color, opacity=0.55, showlegend=False,
                        hoverinfo="skip")
        q1, median, q3 = d.quartiles
        fig.add_scatter(x=[d.layer - 0.3, d.layer + 0.3], y=[median, median], mode="lines",
                        line=dict(color="#222222", width=2), showlegend=False,
                        hovertemplate=f"layer {d.layer}<br>median {median:.4g}<br>quartiles {q1:.4g} to "
                                      f"{q3:.4g}<br>mean {d.mean:.4g}<extra></extra>")
    fig.update_layout(**base_layout(title=f"{label} per layer", xaxis_title="layer",
                                    yaxis_title=f"{label} score (unitless)",
                                    xaxis=dict(tickmode="array", tickvals=[d.layer for d in densities])))
    return fig


SVG_MAX_POINTS = 2000    # more points than this are drawn with WebGL (SVG markers slow down past a few thousand)


def points_trace(n: int) -> type:
    """``go.Scatter`` (SVG) for up to ``SVG_MAX_POINTS`` points, else ``go.Scattergl``: WebGL draws many
    points fast but costs a context that is slow to start in a browser without a GPU."""
    return go.Scatter if n <= SVG_MAX_POINTS else go.Scattergl


def r2_d2_scatter(frame: pd.DataFrame, column: str = "r2d2", label: str | None = None) -> go.Figure:
    """R2 vs D2, one point per neuron of ``frame``; hover names layer, neuron and R2D2.

    Several layers: coloured by layer. One layer: coloured by ``column``'s score, so the picture shows
    how that score ranks the layer's neurons. Up to ``SVG_MAX_POINTS`` points are SVG markers, more are
    WebGL (which costs a WebGL context, slow to start in a browser without a GPU). Columns go to the
    browser as float32 arrays (Plotly sends NumPy arrays as typed arrays, half the size of JSON text).
    """
    layers = frame["layer"].unique()
    one_layer = len(layers) == 1
    label = label or column
    trace = points_trace(len(frame))
    colour = frame[column if one_layer else "layer"].to_numpy(np.float32)
    fig = go.Figure(trace(
        x=frame["d2"].to_numpy(np.float32), y=frame["r2"].to_numpy(np.float32), mode="markers",
        marker=dict(size=6 if one_layer else 5, color=colour, colorscale="Viridis", opacity=0.7,
                    colorbar=dict(title=label if one_layer else "layer")),
        customdata=np.c_[frame["layer"], frame["neuron"], frame["r2d2"]].astype(np.float32),
        hovertemplate="layer %{customdata[0]}, neuron %{customdata[1]}<br>R2 %{y:.4g}, D2 %{x:.3f}"
                      "<br>R2D2 %{customdata[2]:.4g}<extra></extra>"))
    title = (f"Layer {layers[0]}: R2 (weights) vs D2 (activations), colour = {label}" if one_layer
             else f"R2 (weights) vs D2 (activations), one point per neuron of {len(layers)} layers")
    fig.update_layout(**base_layout(title=title, xaxis_title="D2: normalised mean activation (0 to 1)",
                                    yaxis_title="R2: kernel-hull self-weight diag(C)",
                                    dragmode="lasso", height=460))
    return fig


def rank_heatmap(matrix: np.ndarray, centres: np.ndarray, column: str, label: str | None = None) -> go.Figure:
    fig = go.Figure(go.Heatmap(
        z=matrix, x=centres * 100, y=[f"layer {i}" for i in range(matrix.shape[0])],
        colorscale="Viridis", colorbar=dict(title=label or column),
        hovertemplate="%{y}, rank %{x:.0f}%<br>" + (label or column) + " %{z:.4g}<extra></extra>"))
    fig.update_layout(**base_layout(title=f"{label or column} by layer and rank (best on the left)",
                                    xaxis_title="rank within the layer (% of its neurons, 0 = best)",
                                    yaxis_title="layer", height=320))
    return fig


def projection(coords: np.ndarray, r2: np.ndarray, kept: np.ndarray | None, picks: np.ndarray,
               title: str) -> go.Figure:
    """One point per neuron: grey if pruned at the current budget, orange if kept; R2's picks ringed."""
    fig = go.Figure()
    trace = points_trace(len(coords))
    coords = np.asarray(coords, dtype=np.float32)
    kept = np.ones(len(coords), dtype=bool) if kept is None else kept
    idx = np.arange(len(coords))
    for mask, name, color in ((~kept, "pruned at this budget", DROPPED_COLOR),
                              (kept, "kept at this budget", KEPT_COLOR)):
        fig.add_trace(trace(x=coords[mask, 0], y=coords[mask, 1], mode="markers", name=name,
                            marker=dict(color=color, size=6, opacity=0.75),
                            customdata=np.c_[idx[mask], r2[mask]].astype(np.float32),
                            hovertemplate="neuron %{customdata[0]}<br>R2 %{customdata[1]:.4g}<extra></extra>"))
    fig.add_trace(trace(x=coords[picks, 0], y=coords[picks, 1], mode="markers", name="top R2 (hull picks)",
                        marker=dict(symbol="circle-open", color=HULL_COLOR, size=12, line=dict(width=2)),
                        hoverinfo="skip"))
    fig.update_layout(**base_layout(title=title, xaxis_title="component 1 (arbitrary units)",
                                    yaxis_title="component 2 (arbitrary units)", height=480))
    return fig


def toy_figure(frame: pd.DataFrame, vertices: Sequence[int], sigma: float) -> go.Figure:
    """The teaching cloud: size by R2, R2's picks filled, the true hull drawn."""
    fig = go.Figure()
    ring = list(vertices) + list(vertices[:1])
    fig.add_scatter(x=frame["x"].iloc[ring], y=frame["y"].iloc[ring], mode="lines", name="convex hull",
                    line=dict(color=HULL_COLOR, dash="dot"))
    size = 6 + 24 * (frame["r2"] - frame["r2"].min()) / max(frame["r2"].max() - frame["r2"].min(), 1e-12)
    fig.add_scatter(x=frame["x"], y=frame["y"], mode="markers", name="points (size = R2)",
                    marker=dict(size=size, color=np.where(frame["picked"], KEPT_COLOR, DROPPED_COLOR),
                                line=dict(color="#333333", width=0.5)),
                    customdata=frame["r2"],
                    hovertemplate="R2 %{customdata:.4g}<extra></extra>")
    fig.update_layout(**base_layout(title=f"R2's picks at sigma = {sigma:g} (orange)",
                                    xaxis_title="x (plane units)", yaxis_title="y (plane units)",
                                    height=420, yaxis_scaleanchor="x"))
    return fig


def kept_per_layer(frame: pd.DataFrame, method: str) -> go.Figure:
    fig = go.Figure()
    fig.add_bar(x=frame["layer"], y=frame["kept"], name="kept", marker_color=METHOD_COLORS[method])
    fig.add_bar(x=frame["layer"], y=frame["pruned"], name="pruned", marker_color=DROPPED_COLOR)
    fig.update_layout(**base_layout(barmode="stack", title="FFN neurons kept per layer",
                                    xaxis_title="layer", yaxis_title="neurons", height=320,
                                    xaxis_dtick=1))
    return fig


def allocation(frame: pd.DataFrame, budget: float) -> go.Figure:
    """Kept neurons per layer, one bar per method side by side (``charts.allocation_frame``), the
    layers' widths as a dotted line: where each method spends the same budget."""
    fig = go.Figure()
    widths = frame.drop_duplicates("layer").sort_values("layer")
    fig.add_scatter(x=widths["layer"], y=widths["width"], name="layer width", mode="lines",
                    line=dict(color="#888888", dash="dot", shape="hvh"), hoverinfo="skip")
    for name in dict.fromkeys(frame["method"]):
        rows = frame[frame["method"] == name]
        label = f"{method_label(name)} ({rows['allocation'].iloc[0]})"
        fig.add_bar(x=rows["layer"], y=rows["kept"], name=label, marker_color=METHOD_COLORS[name],
                    customdata=np.c_[rows["width"], rows["share"] * 100],
                    hovertemplate=label + "<br>layer %{x}: %{y:,} of %{customdata[0]:,} kept "
                                          "(%{customdata[1]:.0f}%)<extra></extra>")
    fig.update_layout(**base_layout(barmode="group", title=f"FFN neurons kept per layer at {budget:.2f} relative FLOPs",
                                    xaxis_title="layer", yaxis_title="neurons kept", height=360,
                                    xaxis_dtick=1 if frame["layer"].nunique() <= 32 else None))
    return fig


def comparison(frame: pd.DataFrame, dense_accuracy: float | None, current: float | None) -> go.Figure:
    """Accuracy (with 95% intervals) vs relative FLOPs, one line per method."""
    fig = go.Figure()
    for name in dict.fromkeys(frame["method"]):
        rows = frame[frame["method"] == name].sort_values("relative_flops")
        seeds = int(rows["seeds"].max()) if "seeds" in rows else 1
        label = method_label(name) + (f" (mean of {seeds} seeds)" if seeds > 1 else "")
        fig.add_scatter(
            x=rows["relative_flops"] * 100, y=rows["accuracy"] * 100, name=label,
            mode="lines+markers", line=dict(color=METHOD_COLORS[name], width=2.5),
            error_y=dict(type="data", symmetric=False, array=(rows["acc_high"] - rows["accuracy"]) * 100,
                         arrayminus=(rows["accuracy"] - rows["acc_low"]) * 100, thickness=1),
            hovertemplate=label + "<br>%{x:.1f}% FLOPs: %{y:.1f}%<extra></extra>")
    if dense_accuracy is not None:
        fig.add_hline(y=dense_accuracy * 100, line_color=METHOD_COLORS["dense"], line_dash="dash",
                      annotation_text="unpruned")
    if current is not None:
        fig.add_vline(x=current * 100, line_dash="dot", line_color="#888888", annotation_text="current budget")
    fig.update_layout(**base_layout(title="Accuracy vs relative FLOPs (95% bootstrap intervals)",
                                    xaxis_title="relative FLOPs (% of the unpruned encoder's MACs)",
                                    yaxis_title="test accuracy (%)", height=430))
    return fig


def paired_differences(frame: pd.DataFrame, reference: str, lm: bool = False) -> go.Figure:
    """Each method minus ``reference`` at each budget with its paired 95% interval
    (``charts.paired_frame``); zero is drawn: an interval that excludes it is a difference."""
    fig = go.Figure()
    unit = "%" if lm else " pp"
    for name in dict.fromkeys(frame["method"]):
        rows = frame[frame["method"] == name].sort_values("relative_flops")
        label = method_label(name)
        fig.add_scatter(
            x=rows["relative_flops"] * 100, y=rows["difference"], name=label, mode="lines+markers",
            line=dict(color=METHOD_COLORS[name], width=2.5),
            error_y=dict(type="data", symmetric=False, array=rows["high"] - rows["difference"],
                         arrayminus=rows["difference"] - rows["low"], thickness=1),
            hovertemplate=label + "<br>%{x:.1f}% FLOPs: %{y:+.1f}" + unit + "<extra></extra>")
    fig.add_hline(y=0, line_color=METHOD_COLORS[reference], line_dash="dash",
                  annotation_text=method_label(reference))
    what = "perplexity change (%)" if lm else "accuracy difference (pp)"
    fig.update_layout(**base_layout(title=f"Difference from {method_label(reference)} (paired 95% intervals)",
                                    xaxis_title="relative FLOPs (%)", yaxis_title=f"{what}, method minus reference",
                                    height=430))
    return fig


def comparison_lm(frame: pd.DataFrame, dense_perplexity: float | None, current: float | None) -> go.Figure:
    """Perplexity (log axis, with 95% intervals) vs relative FLOPs, one line per method
    (``charts.comparison_frame(..., metric="perplexity")``)."""
    fig = go.Figure()
    for name in dict.fromkeys(frame["method"]):
        rows = frame[frame["method"] == name].sort_values("relative_flops")
        seeds = int(rows["seeds"].max()) if "seeds" in rows else 1
        label = method_label(name) + (f" (mean of {seeds} seeds)" if seeds > 1 else "")
        fig.add_scatter(
            x=rows["relative_flops"] * 100, y=rows["accuracy"], name=label,
            mode="lines+markers", line=dict(color=METHOD_COLORS[name], width=2.5),
            error_y=dict(type="data", symmetric=False, array=rows["acc_high"] - rows["accuracy"],
                         arrayminus=rows["accuracy"] - rows["acc_low"], thickness=1),
            hovertemplate=label + "<br>%{x:.1f}% FLOPs: perplexity %{y:,.2f}<extra></extra>")
    if dense_perplexity is not None:
        fig.add_hline(y=dense_perplexity, line_color=METHOD_COLORS["dense"], line_dash="dash",
                      annotation_text="unpruned")
    if current is not None:
        fig.add_vline(x=current * 100, line_dash="dot", line_color="#888888", annotation_text="current budget")
    fig.update_layout(**base_layout(title="Perplexity vs relative FLOPs (95% bootstrap intervals over blocks)",
                                    xaxis_title="relative FLOPs (% of the unpruned decoder layers' MACs)",
                                    yaxis_title="held-out perplexity (log scale)", height=430))
    fig.update_yaxes(type="log")
    if dense_perplexity is not None and len(frame) and frame["accuracy"].max() > COLLAPSED_RATIO * dense_perplexity:
        # the axis stops at "collapsed" (100 x unpruned): points above it are drawn at its edge, said so
        top = COLLAPSED_RATIO * dense_perplexity
        fig.update_yaxes(range=[np.log10(min(frame["acc_low"].min(), dense_perplexity) * 0.9), np.log10(top)])
        fig.add_hline(y=top, line_color="#AA3377", line_dash="dot",
                      annotation_text=f"collapsed (over {COLLAPSED_RATIO:.0f} x unpruned): cut off")
    return fig
