"""One report of a pruning run, for the CLI, the app and every export: a typed record, its versioned
JSON form and one Markdown rendering.

``PruneReport.to_dict()`` is what ``report.json`` holds (``schema`` names its version);
``render_markdown`` is what ``report.md`` and the app's "Report (Markdown)" show. Metrics sit under
``evaluation.before`` / ``evaluation.after`` by name (``accuracy``, ``agreement``; language models add
``perplexity``, ``kl``), each a ``Metric`` with its 95% interval.

``evaluation.paired`` compares after with before on the same examples, which separate intervals
cannot do (two overlapping intervals can still hide a real difference):

- ``accuracy_difference`` (classifiers with labels): ``value`` = accuracy after minus before,
  ``ci95`` its seeded paired bootstrap interval over examples, ``n`` examples, ``a_only`` / ``b_only``
  the examples only the pruned / only the unpruned model gets right, ``mcnemar_p`` McNemar's exact
  two-sided p on those discordant examples (1.0 when there are none).
- ``perplexity_ratio`` (language models): ``ratio`` = perplexity after / before, ``ci95`` one seeded
  bootstrap over blocks applied to both, ``n`` blocks, ``p_value`` the bootstrap p of "ratio = 1".
"""
from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from .methods import default_method

SCHEMA = "kcm-explorer/report/1"
FLOPS_UNIT = "encoder MACs at seq_len, relative to the unpruned model (FLOPs = 2 x MACs)"
DECODER_FLOPS_UNIT = "decoder layers' MACs at seq_len, relative to the unpruned model (FLOPs = 2 x MACs)"


# --------------------------------------------------------------------------- environment

def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@dataclass(frozen=True)
class Environment:
    """What produced a number: library versions, threads, device and CPU."""

    python: str
    torch: str
    transformers: str
    threads: int
    device: str
    cpu: str
    logical_cpus: int | None
    platform: str

    @classmethod
    def here(cls) -> "Environment":
        import transformers

        from .runtime import default_device
        return cls(python=platform.python_version(), torch=torch.__version__,
                   transformers=transformers.__version__, threads=torch.get_num_threads(),
                   device=default_device().type, cpu=cpu_name(), logical_cpus=os.cpu_count(),
                   platform=platform.platform())

    def line(self) -> str:
        return (f"torch {self.torch}, transformers {self.transformers}, {self.threads} threads, "
                f"{self.device} ({self.cpu}), Python {self.python}")


# --------------------------------------------------------------------------- the record

@dataclass(frozen=True)
class Metric:
    """A number measured on ``n`` examples (or blocks) with its 95% interval."""

    value: float
    ci95: tuple[float, float]
    n: int

    @classmethod
    def of(cls, estimate) -> "Metric":
        """From a measured value with its interval: ``evaluate.Rate`` or ``lm.LMMetric`` (``value``,
        ``low``, ``high``, ``n``)."""
        return cls(float(estimate.value), (float(estimate.low), float(estimate.high)), int(estimate.n))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Metric":
        lo, hi = data["ci95"]
        return cls(float(data["value"]), (float(lo), float(hi)), int(data["n"]))


@dataclass(frozen=True)
class Evaluation:
    """Metrics of the unpruned (``before``) and pruned (``after``) model on the same examples."""

    data: str
    examples: int                       # examples, or token blocks for language models
    before: dict[str, Metric] = field(default_factory=dict)
    after: dict[str, Metric] = field(default_factory=dict)
    # after against before on the same examples (paired): e.g. "perplexity_ratio" with its interval
    paired: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of_classifier(cls, data: str, examples: int, before, after, seed: int = 0) -> "Evaluation":
        """From two ``kcm_core.evaluate.ClassifierEval`` (the pruned one with the unpruned predictions
        as its agreement reference); metrics that were not measured are left out. With labels, the
        accuracy after minus before is compared paired over the same examples (``paired_difference``:
        seeded bootstrap interval and McNemar's exact p) under ``paired["accuracy_difference"]``."""
        from .evaluate import paired_difference

        def metrics(result) -> dict[str, Metric]:
            rates = {"accuracy": result.accuracy, "agreement": result.agreement}
            return {name: Metric.of(r) for name, r in rates.items() if r is not None}
        paired = {}
        if before.hits is not None and after.hits is not None:
            paired["accuracy_difference"] = paired_difference(after.hits, before.hits, seed).to_dict()
        return cls(data, int(examples), metrics(before), metrics(after), paired)

    @classmethod
    def of_lm(cls, data: str, before, after, paired) -> "Evaluation":
        """From two ``kcm_core.lm.LMEval`` on the same blocks (the pruned one against the unpruned
        reference) and their ``PairedPerplexity``."""
        def metrics(result) -> dict[str, Metric]:
            found = {"perplexity": result.perplexity, "agreement": result.agreement, "kl": result.kl}
            return {name: Metric.of(m) for name, m in found.items() if m is not None}
        return cls(data, after.perplexity.n, metrics(before), metrics(after),
                   {"perplexity_ratio": paired.to_dict()})


@dataclass(frozen=True)
class PruneReport:
    """Everything needed to understand (and redo) one pruned model."""

    model: dict[str, Any]            # source, path, class, model_type
    method: dict[str, str]           # name, label, description
    options: dict[str, Any]          # the PruneConfig
    data: dict[str, Any]             # source, samples, max_len, seed
    seq_len: float
    relative_flops: dict[str, Any]   # target, achieved, unit
    neurons: dict[str, Any]          # kept_per_layer, width_per_layer, kept, total
    params: dict[str, int | None]    # before, after
    scaling: dict[str, Any]          # scaled_layers, scaling_stopped_at
    details: dict[str, Any]          # how the scores were obtained (R2 iterations, tokens)
    environment: Environment
    evaluation: Evaluation | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    speed: dict[str, Any] | None = None
    export: dict[str, Any] | None = None
    # the repair step and the allocation (kcm_core.repair, kcm_core.select): kind, target, allocation,
    # intercept, failed layers, and each layer's relative output error before and after the repair
    repair: dict[str, Any] | None = None
    schema: str = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PruneReport":
        if data.get("schema") != SCHEMA:
            raise ValueError(f"report schema {data.get('schema')!r} is not {SCHEMA!r}; "
                             "prune the model again with this version")
        values = dict(data)
        values["environment"] = Environment(**values["environment"])
        if values.get("evaluation") is not None:
            ev = values["evaluation"]
            values["evaluation"] = Evaluation(
                ev["data"], int(ev["examples"]),
                {k: Metric.from_dict(v) for k, v in ev.get("before", {}).items()},
                {k: Metric.from_dict(v) for k, v in ev.get("after", {}).items()},
                dict(ev.get("paired") or {}))
        return cls(**values)


def moved_note(model, plan) -> str | None:
    """Why the pruned model's class is not ``model``'s (a Mistral or Qwen2 plan that adds biases is
    realised as LLaMA: ``kcm_core.bias_carrier``), in one sentence; None when it is the same."""
    from .bias_carrier import can_carry, carrier_note, moved_config
    if not (plan.has_bias_shift and can_carry(model.config)):
        return None
    return carrier_note(moved_config(model.config, type(model).__name__))


def build_report(*, model, source: str, path: str | None, config, data: Mapping[str, Any],
                 plan, seq_len: float, achieved_flops: float, params_before: int | None,
                 params_after: int | None, details, evaluation: Evaluation | None = None,
                 seconds: Mapping[str, float] | None = None,
                 speed: Mapping[str, Any] | None = None) -> PruneReport:
    """The report of one run, from the objects every caller already holds (CLI and app alike).

    model: the unpruned model; config: the ``PruneConfig`` (its method row, ``config.spec``, is
    described); plan: the ``KeepPlan`` (with scales); details: the ``ScoreDetails`` of its scores.
    """
    from .arch import model_shape
    shape = model_shape(model.config)
    spec = config.spec
    return PruneReport(
        model={"source": source, "path": path, "class": type(model).__name__,
               "model_type": shape.model_type,
               "class_note": moved_note(model, plan)},
        method={"name": spec.name, "label": spec.label, "description": spec.description,
                "default": spec.name == default_method(shape.head == "lm", shape.vision)},
        options=config.to_dict(), data=dict(data), seq_len=float(seq_len),
        relative_flops={"target": config.budget, "achieved": float(achieved_flops), "unit": DECODER_FLOPS_UNIT if shape.decoder else FLOPS_UNIT},
        neurons={"kept_per_layer": plan.kept_counts, "width_per_layer": plan.widths,
                 "kept": plan.total_kept, "total": sum(plan.widths)},
        params={"before": params_before, "after": params_after},
        scaling={"scaled_layers": plan.info.scaled_layers,
                 "scaling_stopped_at": plan.info.scaling_stopped_at},
        details=details.to_dict(), environment=Environment.here(), evaluation=evaluation,
        seconds=dict(seconds or {}), speed=dict(speed) if speed else None,
        repair={"kind": plan.info.repair, "target": plan.info.repair_target,
                "allocation": plan.info.allocation, "intercept": plan.info.repair_intercept,
                "failed_layers": plan.info.repair_failed_layers, "layer_errors": plan.info.repair_errors})


# --------------------------------------------------------------------------- Markdown

_METRIC_NAMES = {"accuracy": "Accuracy", "agreement": "Agreement with the unpruned model",
                 "perplexity": "Perplexity", "kl": "KL divergence from the unpruned model"}


def _metric(name: str, m: Mapping[str, Any]) -> str:
    lo, hi = m["ci95"]
    if name in ("accuracy", "agreement"):
        return f"{m['value']:.1%} (95% CI {lo:.1%} to {hi:.1%}, n = {m['n']})"
    return f"{m['value']:.4g} (95% CI {lo:.4g} to {hi:.4g}, n = {m['n']})"


def _scaling_line(scaling: Mapping[str, Any]) -> str:
    if scaling.get("scaled_layers") is None:
        return "none (this method does not scale)"
    stopped = scaling.get("scaling_stopped_at")
    return f"{scaling['scaled_layers']} layers scaled" + (
        f"; stopped at layer {stopped} (a solve failed or a scale left the bound)" if stopped is not None else "")


def _paired_lines(paired: Mapping[str, Any]) -> list[str]:
    """After against before on the same examples: the difference (or ratio) with its paired interval,
    and the test of "no change" (McNemar's exact p for accuracy, the bootstrap p for perplexity)."""
    from .lm import bootstrap_p_text
    lines = []
    diff = paired.get("accuracy_difference")
    if diff:
        lo, hi = diff["ci95"]
        lines.append(f"- Accuracy after minus before (paired over the same {diff['n']} examples): "
                     f"{100 * diff['value']:+.1f} points (95% CI {100 * lo:+.1f} to {100 * hi:+.1f}); "
                     f"McNemar exact p = {diff['mcnemar_p']:.3g} ({diff['b_only']} examples only the "
                     f"unpruned model gets right, {diff['a_only']} only the pruned one)")
    ratio = paired.get("perplexity_ratio")
    if ratio:
        lo, hi = ratio["ci95"]
        p = f"; bootstrap p {bootstrap_p_text(ratio['p_value'])}" if ratio.get("p_value") is not None else ""
        lines.append(f"- Perplexity after / before (paired over the same {ratio['n']} blocks): "
                     f"{ratio['ratio']:.3f} (95% CI {lo:.3f} to {hi:.3f}{p})")
    return lines


def render_markdown(report: PruneReport | Mapping[str, Any], heading: str = "#") -> str:
    """The report for people: method by its label, FLOPs, neurons, metrics before and after."""
    r = report.to_dict() if isinstance(report, PruneReport) else dict(report)
    flops, neurons, params, env = r["relative_flops"], r["neurons"], r["params"], r["environment"]
    lines = [f"{heading} Pruned {r['model']['source']} with {r['method']['label']}", "",
             f"- Method: {r['method']['label']} ({r['method']['description']})",
             *([f"- Class: {r['model']['class_note']}"] if r["model"].get("class_note") else []),
             f"- Relative FLOPs: target {flops['target']:.2f}, achieved {flops['achieved']:.4f} "
             f"({flops['unit']}; s = {r['seq_len']:g})",
             f"- FFN neurons kept: {neurons['kept']:,} of {neurons['total']:,}; per layer "
             f"{neurons['kept_per_layer']}"]
    if params.get("before") is not None and params.get("after") is not None:
        lines.append(f"- Parameters: {params['before']:,} before, {params['after']:,} after "
                     f"({params['after'] / params['before'] - 1:+.1%})")
    elif params.get("after") is not None:
        lines.append(f"- Parameters after pruning: {params['after']:,}")
    ev = r.get("evaluation")
    if ev:
        for when in ("before", "after"):
            for name, m in ev[when].items():
                lines.append(f"- {_METRIC_NAMES.get(name, name)} {when}: {_metric(name, m)}")
        lines += _paired_lines(ev.get("paired") or {})
        unit = "blocks" if "perplexity" in ev["after"] else "examples"
        lines.append(f"- Evaluated on: {ev['data']} ({ev['examples']} {unit})")
    else:
        lines.append("- Evaluation: none (no labeled evaluation data)")
    speed = r.get("speed")
    if speed:
        lines.append(f"- Speed: {speed['dense_s'] * 1e3:.1f} ms -> {speed['pruned_s'] * 1e3:.1f} ms per "
                     f"forward pass ({speed['timed_on']}; measured {speed['measured_speedup']:.2f}x, "
                     f"estimated {speed['estimated_speedup']:.2f}x)")
    data = r["data"]
    sample = (f"{data.get('samples')} calibration blocks of {data.get('max_len')} tokens" if data.get("unit") == "blocks"
              else f"{data.get('samples')} unlabeled images" if data.get("unit") == "images"
              else f"{data.get('samples')} unlabeled sequences, max length {data.get('max_len')}")
    lines += [f"- Data: {data.get('source')} ({sample}, seed {data.get('seed')})",
              f"- Scaling: {_scaling_line(r['scaling'])}",
              f"- Environment: torch {env['torch']}, transformers {env['transformers']}, "
              f"{env['threads']} threads, {env['device']}, Python {env['python']}", "",
              "The full plan (kept neuron indices and scales per layer) is in `kcm_plan.json`.", ""]
    return "\n".join(lines)
