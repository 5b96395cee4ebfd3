"""Chart data as plain DataFrames: what every figure shows, computed without Streamlit or Plotly."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from kcm_core.arch import ModelShape
from kcm_core.flops import BLOCK_LABELS, BLOCKS, CostReport, cost_report
from kcm_core.plan import KeepPlan

MAC_UNITS = {"MACs": 1.0, "MFLOPs": 2e-6, "MMACs": 1e-6}


# --------------------------------------------------------------------------- cost

def cost_frame(report: CostReport, unit: str = "MMACs") -> pd.DataFrame:
    """Long table (row per layer x block) of one sequence's cost, plus the head outside the count.

    ``unit``: "MMACs" (millions of multiply-accumulates) or "MFLOPs" (= 2 x MMACs).
    """
    scale = MAC_UNITS[unit]
    rows = []
    for layer in report.layers:
        for block in BLOCKS:
            rows.append({"part": f"layer {layer.index}", "block": block, "label": BLOCK_LABELS[block],
                         "value": getattr(layer, block) * scale, "counted": True})
    rows.append({"part": "head", "block": "head", "label": "pooler + classifier (outside the count)",
                 "value": report.head_macs * scale, "counted": False})
    return pd.DataFrame(rows)


def param_frame(report: CostReport, shape: ModelShape) -> pd.DataFrame:
    """Long table of parameters: per layer split into attention and FFN, plus embeddings and head."""
    rows = [{"part": "embeddings", "block": "embeddings", "label": "embeddings, norms, pooler",
             "value": float(report.embedding_params)}]
    for layer, total in zip(report.layers, report.layer_params):
        up = ffn_up_params(shape, layer.neurons)
        down = layer.neurons * shape.hidden            # the down projection's bias is d, not per neuron
        rows += [
            {"part": f"layer {layer.index}", "block": "qkv+attn_out", "label": "attention and norms",
             "value": float(total - up - down)},
            {"part": f"layer {layer.index}", "block": "ffn_up", "label": BLOCK_LABELS["ffn_up"], "value": float(up)},
            {"part": f"layer {layer.index}", "block": "ffn_down", "label": BLOCK_LABELS["ffn_down"],
             "value": float(down)},
        ]
    rows.append({"part": "head", "block": "head", "label": "task head", "value": float(report.head_params)})
    return pd.DataFrame(rows)


def ffn_up_params(shape: ModelShape, neurons: int) -> int:
    """Parameters of one layer's up projection (and gate, in gated MLPs): a d-vector per neuron each,
    plus a bias per neuron where the MLP carries biases (BERT, GPT-2, ViT, LLaMA with ``mlp_bias``;
    not Mistral or Qwen2: ``ModelShape.mlp_bias`` from the adapter table)."""
    projections = 2 if shape.gated else 1
    return projections * neurons * (shape.hidden + int(shape.mlp_bias))


def attention_share_curve(shape: ModelShape, lengths: Iterable[float]) -> pd.DataFrame:
    """Share of the counted MACs in attention matrix products, attention projections and FFN,
    as a function of sequence length: the s^2 term grows, so FFN pruning saves less on long inputs."""
    rows = []
    for s in lengths:
        report = cost_report(shape, float(s))
        total = report.encoder_macs
        matmul = sum(r.attn_matmul for r in report.layers)
        proj = sum(r.qkv + r.attn_out for r in report.layers)
        rows.append({"seq_len": float(s), "attention matrix products": matmul / total,
                     "attention projections": proj / total, "FFN": report.ffn_share})
    return pd.DataFrame(rows)


def savings_table(ffn_share: float, fractions: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 1.0)) -> pd.DataFrame:
    """Removing a fraction x of FFN neurons removes x * ffn_share of the counted FLOPs."""
    return pd.DataFrame({"neurons pruned": list(fractions),
                         "FLOPs saved": [x * ffn_share for x in fractions],
                         "relative FLOPs": [1 - x * ffn_share for x in fractions]})


# --------------------------------------------------------------------------- scores

def score_frame(columns: Mapping[str, Sequence[torch.Tensor]]) -> pd.DataFrame:
    """One row per neuron (layer, neuron) with one column per score kind."""
    first = next(iter(columns.values()))
    layer = np.concatenate([np.full(t.numel(), i) for i, t in enumerate(first)])
    neuron = np.concatenate([np.arange(t.numel()) for t in first])
    data: dict[str, Any] = {"layer": layer, "neuron": neuron}
    for name, per_layer in columns.items():
        data[name] = torch.cat([t.float().flatten() for t in per_layer]).numpy()
    return pd.DataFrame(data)


@dataclass(frozen=True)
class Density:
    """One layer's score distribution, ready to draw as a violin: ``density`` (peak 1) at ``grid``."""
    layer: int
    grid: np.ndarray
    density: np.ndarray
    quartiles: tuple[float, float, float]
    mean: float


def score_densities(frame: pd.DataFrame, column: str, points: int = 160, bins: int = 1024) -> list[Density]:
    """Each layer's distribution of ``column`` as a Gaussian kernel density on ``points`` values from
    its minimum to its maximum (Silverman's bandwidth, as Plotly's violins use). Computed here, not in
    the browser: a histogram of ``bins`` bins smoothed by the kernel, so the cost grows with the number
    of neurons, not with (neurons x the range over the bandwidth) as a browser-side violin's does on
    heavy-tailed scores."""
    out = []
    for layer in sorted(frame["layer"].unique()):
        values = frame.loc[frame["layer"] == layer, column].to_numpy(np.float64)
        values = values[np.isfinite(values)]
        if not len(values):
            continue
        low, high = float(values.min()), float(values.max())
        q1, median, q3 = (float(q) for q in np.percentile(values, [25, 50, 75]))
        spread = min(values.std(), (q3 - q1) / 1.349) or values.std()
        bandwidth = 1.06 * spread * len(values) ** -0.2
        grid = np.linspace(low, high, points)
        if high == low or bandwidth <= 0:
            density = np.ones(points)
        else:
            counts, edges = np.histogram(values, bins=bins, range=(low, high))
            centres = (edges[:-1] + edges[1:]) / 2
            density = (counts * np.exp(-0.5 * ((grid[:, None] - centres) / bandwidth) ** 2)).sum(1)
            density = density / density.max() if density.max() > 0 else np.ones(points)
        out.append(Density(int(layer), grid, density, (q1, median, q3), float(values.mean())))
    return out


def rank_heatmap(frame: pd.DataFrame, column: str, bins: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(layers x bins) matrix of each layer's scores sorted from best to worst, averaged into ``bins``
    rank bins, and the bin centres as a fraction of the layer's width (0 = best)."""
    layers = sorted(frame["layer"].unique())
    out = np.zeros((len(layers), bins))
    for row, layer in enumerate(layers):
        values = np.sort(frame.loc[frame["layer"] == layer, column].to_numpy())[::-1]
        edges = np.linspace(0, len(values), bins + 1).astype(int)
        out[row] = [values[a:max(b, a + 1)].mean() if len(values) else np.nan
                    for a, b in zip(edges[:-1], edges[1:])]
    centres = (np.arange(bins) + 0.5) / bins
    return out, centres


def top_bottom(frame: pd.DataFrame, layer: int, column: str, n: int = 10) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``n`` best and ``n`` worst neurons of one layer by ``column`` (stable: ties by index)."""
    rows = frame[frame["layer"] == layer]
    best = rows.sort_values([column, "neuron"], ascending=[False, True], kind="stable").head(n)
    worst = rows.sort_values([column, "neuron"], ascending=[True, True], kind="stable").head(n)
    return best.reset_index(drop=True), worst.reset_index(drop=True)


def selected_neurons(frame: pd.DataFrame, selection: Any) -> pd.DataFrame:
    """The rows of ``frame`` picked in a Plotly selection (Streamlit's ``PlotlyState``, a dict, or None).

    The scatter is one trace in ``frame`` order, so each selected point's index is its row.
    """
    if not selection:
        return frame.iloc[0:0]
    sel = selection.get("selection", selection) if isinstance(selection, Mapping) else getattr(
        selection, "selection", None)
    if sel is None:
        return frame.iloc[0:0]
    indices = sel.get("point_indices") if isinstance(sel, Mapping) else getattr(sel, "point_indices", None)
    if not indices:
        points = sel.get("points", []) if isinstance(sel, Mapping) else getattr(sel, "points", [])
        indices = [p.get("point_index", p.get("pointIndex")) for p in points]
    indices = sorted({int(i) for i in indices if i is not None and 0 <= int(i) < len(frame)})
    return frame.iloc[indices].reset_index(drop=True)


# --------------------------------------------------------------------------- prune

def kept_frame(plan: KeepPlan) -> pd.DataFrame:
    """Kept and pruned neurons per layer."""
    return pd.DataFrame({"layer": list(range(len(plan.layers))), "kept": plan.kept_counts,
                         "pruned": [w - k for w, k in zip(plan.widths, plan.kept_counts)],
                         "width": plan.widths})


def allocation_frame(plans: Mapping[str, KeepPlan]) -> pd.DataFrame:
    """One row per (method, layer) of each method's plan: kept neurons, the layer's width and the share
    kept (the allocation: how a budget's kept neurons are spread over the layers), methods in order."""
    rows = [{"method": name, "layer": i, "kept": kept, "width": width, "share": kept / width if width else 0.0,
             "allocation": plan.info.allocation}
            for name, plan in plans.items()
            for i, (kept, width) in enumerate(zip(plan.kept_counts, plan.widths))]
    return pd.DataFrame(rows, columns=["method", "layer", "kept", "width", "share", "allocation"])


def comparison_frame(results: Iterable[Any], metric: str = "accuracy") -> pd.DataFrame:
    """One row per (method, budget) from ``engine.BudgetResult`` objects, in first-seen order: relative
    FLOPs, ``metric`` (accuracy, or a language model's perplexity) with its 95% interval in the
    ``accuracy``/``acc_low``/``acc_high`` columns, agreement, and how many seeds were drawn.

    A method evaluated with several seeds (random selection) gets the mean over seeds, and an interval
    that spans every seed's interval (the lowest lower bound to the highest upper bound), so the
    spread between draws shows as well as the test-set noise."""
    rows = []
    for r in results:
        acc, agr = getattr(r, metric), r.agreement       # kcm_core's Rate / LMMetric, or None
        rows.append({"method": r.method, "budget": r.budget, "relative_flops": r.relative_flops,
                     "accuracy": np.nan if acc is None else acc.value,
                     "acc_low": np.nan if acc is None else acc.low,
                     "acc_high": np.nan if acc is None else acc.high,
                     "agreement": np.nan if agr is None else agr.value})
    columns = ["method", "budget", "relative_flops", "accuracy", "acc_low", "acc_high", "agreement", "seeds"]
    if not rows:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame(rows)
    grouped = frame.groupby(["method", "budget"], sort=False).agg(
        relative_flops=("relative_flops", "mean"), accuracy=("accuracy", "mean"),
        acc_low=("acc_low", "min"), acc_high=("acc_high", "max"), agreement=("agreement", "mean"),
        seeds=("accuracy", "size"))
    return grouped.reset_index()[columns]


def paired_frame(results: Iterable[Any], reference: str, labels: Any = None, seed: int = 0) -> pd.DataFrame:
    """Each method minus ``reference`` at the same budget, on the same examples (``engine.BudgetResult``
    objects; random selection: its first seed only).

    A classifier (``labels`` given): the accuracy difference in percentage points with the paired
    bootstrap interval and McNemar's exact p (``kcm_core.evaluate.paired_difference``). A language model:
    the perplexity change in percent with the paired interval over blocks
    (``kcm_core.lm.paired_perplexity``). Two methods' own intervals overlapping says nothing here."""
    from kcm_core.evaluate import paired_difference
    from kcm_core.lm import paired_perplexity
    first: dict[tuple, Any] = {}
    for r in results:
        first.setdefault((r.method, round(r.budget, 6)), r)
    rows = []
    for (name, budget), r in first.items():
        ref = first.get((reference, budget))
        if name == reference or ref is None:
            continue
        if labels is not None and r.predictions is not None and ref.predictions is not None:
            d = paired_difference((r.predictions == labels).numpy(), (ref.predictions == labels).numpy(), seed)
            rows.append({"method": name, "budget": budget, "relative_flops": r.relative_flops,
                         "difference": d.value * 100, "low": d.low * 100, "high": d.high * 100,
                         "p_value": d.p_value, "only_method": d.a_only, "only_reference": d.b_only})
        elif r.lm is not None and ref.lm is not None:
            p = paired_perplexity(r.lm.stats, ref.lm.stats, seed)
            rows.append({"method": name, "budget": budget, "relative_flops": r.relative_flops,
                         "difference": (p.ratio - 1) * 100, "low": (p.low - 1) * 100, "high": (p.high - 1) * 100,
                         "p_value": np.nan, "only_method": np.nan, "only_reference": np.nan})
    columns = ["method", "budget", "relative_flops", "difference", "low", "high", "p_value", "only_method",
               "only_reference"]
    return pd.DataFrame(rows, columns=columns)


BUDGET_OPTIONS = [round(0.05 * i, 2) for i in range(1, 21)]


# A language model whose perplexity exceeds this many times the unpruned one is "collapsed": its numbers
# and text are noise, and the page says so in words (a comparison chart's axis stops there too).
COLLAPSED_RATIO = 100.0


def budget_grid(floor: float, points: int = 5, top: float = 0.9) -> list[float]:
    """Evenly spaced budgets from just above the floor to ``top``, rounded to 0.05 and unique."""
    low = min(top, np.ceil((floor + 0.02) * 20) / 20)
    grid = np.linspace(low, top, points)
    return sorted({round(float(np.round(g * 20) / 20), 2) for g in grid})


LM_GRID_RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "lm_grid.json"
VISION_RESULTS = LM_GRID_RESULTS.with_name("vision.json")


def lm_default_frame(path: Path = LM_GRID_RESULTS) -> tuple[pd.DataFrame, float] | None:
    """The measured LM-demo evidence for the language-model default (``benchmarks/bench_lm_grid.py``):
    perplexity vs relative FLOPs of the methods run under their own recipes, in ``comparison_frame``'s
    columns, and the unpruned perplexity; None when the results file is not there."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    rows = [{"method": r["cell"], "budget": r["budget"], "relative_flops": r["relative_flops"],
             "accuracy": r["perplexity"]["value"], "acc_low": r["perplexity"]["ci95"][0],
             "acc_high": r["perplexity"]["ci95"][1], "agreement": np.nan, "seeds": 1}
            for r in data["rows"] if "/" not in r["cell"]]
    return pd.DataFrame(rows).sort_values(["method", "relative_flops"]), data["unpruned"]["perplexity"]["value"]


def vision_default_frame(path: Path = VISION_RESULTS,
                         methods: tuple[str, ...] = ("fluct-refit", "kcm", "flap", "random")
                         ) -> tuple[pd.DataFrame, float] | None:
    """The measured vision-demo evidence for the image default (``benchmarks/bench_vision.py``): test
    accuracy vs relative FLOPs of ``methods`` (seed means, with the interval of the seed-averaged
    accuracy), in ``comparison_frame``'s columns, and the unpruned accuracy; None without the file."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    rows = [{"method": r["method"], "budget": r["budget"], "relative_flops": r["relative_flops_mean"],
             "accuracy": r["accuracy_mean"], "acc_low": r["accuracy_ci95"][0], "acc_high": r["accuracy_ci95"][1],
             "agreement": r["agreement_mean"], "seeds": len(r["seeds"])}
            for r in data["summary"] if r["method"] in methods]
    if not rows:
        return None
    return pd.DataFrame(rows).sort_values(["method", "relative_flops"]), data["unpruned"]["accuracy"]["value"]
