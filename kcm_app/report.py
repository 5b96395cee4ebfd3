"""The export report: plan, numbers and environment as JSON and Markdown, figures as one HTML file."""
from __future__ import annotations

import json
from typing import Any, Mapping

import plotly.graph_objects as go

from kcm_core.pipeline import METHODS, PruneConfig

from .engine import BudgetResult, SpeedResult, Workspace
from .latency import environment


def build_report(ws: Workspace, config: PruneConfig, result: BudgetResult,
                 dense_accuracy: Mapping | None, speed: SpeedResult) -> dict[str, Any]:
    """Everything needed to understand (and redo) one pruned model."""
    plan = result.plan
    return {
        "model": {"id": ws.info.get("model_name", ws.model_key.split("@")[0]), "class": type(ws.model).__name__,
                  "model_type": ws.shape.model_type},
        "data": {k: ws.info[k] for k in ("data", "data_source", "sample", "max_len", "seed",
                                          "eval_examples", "eval_source")},
        "method": {"name": config.method, "label": METHODS[config.method].label,
                   "description": METHODS[config.method].description},
        "options": config.to_dict(),
        "seq_len": ws.seq_len,
        "relative_flops": {"target": config.budget, "achieved": result.relative_flops,
                           "unit": "encoder MACs at seq_len, relative to the unpruned model (FLOPs = 2 x MACs)"},
        "neurons": {"kept_per_layer": plan.kept_counts, "width_per_layer": plan.widths,
                    "kept": plan.total_kept, "total": sum(plan.widths)},
        "params": {"after": result.params_after},
        "evaluation": {"before": dict(dense_accuracy) if dense_accuracy else None,
                       "after": result.accuracy, "agreement": result.agreement},
        "speed": {"dense_s": speed.dense_seconds, "pruned_s": speed.pruned_seconds,
                  "timed_on": speed.timed_on,
                  "measured_speedup": speed.measured_speedup,
                  "estimated_speedup": 1 / result.relative_flops},
        "scaling": {k: plan.info.get(k) for k in ("scaled_layers", "scaling_stopped_at")},
        "plan": plan.to_dict(),
        "environment": environment(),
    }


def _pct(rate: Mapping | None) -> str:
    if not rate:
        return "n/a"
    lo, hi = rate["ci95"]
    return f"{rate['value']:.1%} (95% CI {lo:.1%} to {hi:.1%}, n = {rate['n']})"


def _scaling(info: Mapping) -> str:
    if info.get("scaled_layers") is None:
        return "none (this method does not scale)"
    stopped = info.get("scaling_stopped_at")
    return f"{info['scaled_layers']} layers scaled" + (
        f"; stopped at layer {stopped} (a solve failed or a scale left the bound)" if stopped is not None else "")


def report_markdown(report: Mapping[str, Any], heading: str = "#") -> str:
    r = report
    ev = r["evaluation"]
    env = r["environment"]
    lines = [
        f"{heading} Pruned {r['model']['id']} with {r['method']['label']}", "",
        f"- Method: {r['method']['label']} ({r['method']['description']})",
        f"- Relative FLOPs: target {r['relative_flops']['target']:.2f}, achieved "
        f"{r['relative_flops']['achieved']:.4f} ({r['relative_flops']['unit']}; s = {r['seq_len']:g})",
        f"- FFN neurons kept: {r['neurons']['kept']:,} of {r['neurons']['total']:,}; per layer "
        f"{r['neurons']['kept_per_layer']}",
        f"- Parameters after pruning: {r['params']['after']:,}",
        f"- Accuracy before: {_pct(ev['before'])}", f"- Accuracy after: {_pct(ev['after'])}",
        f"- Agreement with the unpruned model: {_pct(ev['agreement'])}",
        f"- Speed: {r['speed']['dense_s'] * 1e3:.1f} ms -> {r['speed']['pruned_s'] * 1e3:.1f} ms per forward pass "
        f"({r['speed']['timed_on']}; "
        f"measured {r['speed']['measured_speedup']:.2f}x, estimated {r['speed']['estimated_speedup']:.2f}x)",
        f"- Data: {r['data']['data']} ({r['data']['sample']} unlabeled sequences, max length "
        f"{r['data']['max_len']}, seed {r['data']['seed']}); evaluation: {r['data']['eval_source']}",
        f"- Scaling: {_scaling(r['scaling'])}",
        f"- Environment: torch {env['torch']}, transformers {env['transformers']}, {env['threads']} threads, "
        f"{env['device']}, Python {env['python']}", "",
        "The full plan (kept neuron indices and scales per layer) is in `report.json` and `kcm_plan.json`.",
    ]
    return "\n".join(lines) + "\n"


def report_json(report: Mapping[str, Any]) -> str:
    return json.dumps(report, indent=2, default=str)


def figures_html(figures: Mapping[str, go.Figure], title: str) -> str:
    """One self-contained HTML page with every figure (plotly.js embedded once, works offline)."""
    parts = [f"<html><head><meta charset='utf-8'><title>{title}</title></head><body>",
             f"<h1 style='font-family:sans-serif'>{title}</h1>"]
    for i, (name, fig) in enumerate(figures.items()):
        parts.append(f"<h2 style='font-family:sans-serif'>{name}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    parts.append("</body></html>")
    return "\n".join(parts)
