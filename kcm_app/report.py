"""The app's report of one pruned model: ``kcm_core.report``'s record (the same schema as the CLI and
``save_pruned``), built from what the Prune page has stored; figures as one HTML file."""
from __future__ import annotations

from typing import Mapping

import plotly.graph_objects as go

from kcm_core.evaluate import Rate
from kcm_core.flops import count_params, relative_flops
from kcm_core.lm import LMEval
from kcm_core.pipeline import PruneConfig
from kcm_core.report import Evaluation, Metric, PruneReport, build_report as core_report, render_markdown
from kcm_core.streamed.passes import StreamResult

from .engine import BudgetResult, SpeedResult, Workspace


def build_report(ws: Workspace, config: PruneConfig, result: BudgetResult,
                 dense_accuracy: Rate | None, speed: SpeedResult | None,
                 dense_lm: LMEval | None = None, dense_hits=None) -> PruneReport:
    """Everything needed to understand (and redo) one pruned model; ``dense_accuracy`` is the unpruned
    model's accuracy on the same evaluation examples; for a causal language model
    ``dense_lm`` is the unpruned model's evaluation on the same held-out blocks (perplexity before and
    after, agreement and KL after, the paired perplexity ratio). With ``dense_hits`` (the unpruned model's
    0/1 correctness per evaluation example) a classifier's accuracy after minus before is compared paired
    over the same examples, as the CLI's report does."""
    evaluation = None
    if result.lm is not None and dense_lm is not None and result.paired is not None:
        evaluation = Evaluation.of_lm(ws.info.eval_source, dense_lm, result.lm, result.paired)
    elif result.accuracy is not None or result.agreement is not None:
        after = {name: Metric.of(m) for name, m in
                 (("accuracy", result.accuracy), ("agreement", result.agreement)) if m is not None}
        before = {"accuracy": Metric.of(dense_accuracy)} if dense_accuracy is not None else {}
        evaluation = Evaluation(ws.info.eval_source, ws.info.eval_examples, before, after,
                                _paired_accuracy(ws, result, dense_hits))
    speed_record = None if speed is None else {
        "dense_s": speed.dense_seconds, "pruned_s": speed.pruned_seconds, "timed_on": speed.timed_on,
        "measured_speedup": speed.measured_speedup, "estimated_speedup": 1 / result.relative_flops}
    return core_report(
        model=ws.model, source=ws.info.model_name, path=ws.info.model_path,
        config=config, data=data_record(ws), plan=result.plan, seq_len=ws.seq_len,
        achieved_flops=result.relative_flops, params_before=count_params(ws.model).total,
        params_after=result.params_after, details=result.details, evaluation=evaluation,
        seconds=result.seconds, speed=speed_record)


def _paired_accuracy(ws: Workspace, result: BudgetResult, dense_hits) -> dict:
    """``{"accuracy_difference": ...}`` (after minus before, paired bootstrap and McNemar) when both
    models' per-example outcomes on the labeled evaluation examples are known, else empty."""
    from kcm_core.evaluate import labels_of, paired_difference
    labels = labels_of(ws.eval_batches) if ws.eval_batches else None
    if dense_hits is None or result.predictions is None or labels is None:
        return {}
    after_hits = result.predictions.cpu() == labels
    return {"accuracy_difference": paired_difference(after_hits, dense_hits, ws.info.seed).to_dict()}


def layerwise_report(ws: Workspace, config: PruneConfig, result: StreamResult) -> PruneReport:
    """The report of a model pruned layer by layer (``kcm_core.streamed.passes.prune_streamed``): the same
    schema, without an evaluation (the whole model was never in memory)."""
    return core_report(
        model=ws.model, source=ws.info.model_name, path=ws.info.model_path,
        config=config, data=data_record(ws), plan=result.plan, seq_len=result.seq_len,
        achieved_flops=relative_flops(ws.shape, result.seq_len, result.plan.kept_counts),
        params_before=result.params_before, params_after=result.params_after, details=result.details,
        evaluation=None, seconds=result.seconds)


def data_record(ws: Workspace) -> dict:
    """The report's ``data``: where the scoring sample came from and how it was drawn."""
    return {"source": ws.info.data_source or ws.info.data, "samples": ws.info.sample,
            "max_len": ws.info.max_len, "seed": ws.info.seed,
            **({"unit": "blocks"} if ws.is_lm else {"unit": "images"} if ws.shape.vision else {})}


def report_markdown(report: PruneReport, heading: str = "#") -> str:
    return render_markdown(report, heading)


def report_json(report: PruneReport) -> str:
    return report.to_json()


def figures_html(figures: Mapping[str, go.Figure], title: str) -> str:
    """One self-contained HTML page with every figure (plotly.js embedded once, works offline)."""
    parts = [f"<html><head><meta charset='utf-8'><title>{title}</title></head><body>",
             f"<h1 style='font-family:sans-serif'>{title}</h1>"]
    for i, (name, fig) in enumerate(figures.items()):
        parts.append(f"<h2 style='font-family:sans-serif'>{name}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    parts.append("</body></html>")
    return "\n".join(parts)
