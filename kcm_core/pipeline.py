"""The methods, and the verbs chained: score -> select (-> refine) -> scale -> slice.

``compute_scores`` depends on the method and data only, not the budget, so callers (the app, the
benchmarks) compute it once and call ``make_plan`` for every budget.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from torch import nn

from . import scores as S
from .activations import NeuronStats, collect_stats
from .arch import ModelShape, model_shape
from .flops import check_budget
from .hull import HullConfig
from .plan import KeepPlan
from .realise import slice_model
from .runtime import Batch, Progress, check_finite, tell
from .scaling import ScaleConfig, fit_scales
from .select import refine_with_gradients, select


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    uses_data: bool
    uses_labels: bool
    scaled: bool
    description: str


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("kcm", "KCM (R2D2)", True, False, True,
           "R2 (kernel hull on weights) x D2 (activations), global top-k, then scaling"),
    Method("r2", "R2 only", False, False, True, "kernel-hull score on weights alone, then scaling"),
    Method("d2", "D2 only", True, False, True, "activation score alone, then scaling"),
    Method("weight-magnitude", "Weight magnitude", False, False, False,
           "||W1[:, i]|| * ||W2[i, :]||, no data, no scaling"),
    Method("weight-magnitude-scale", "Weight magnitude + scale", True, False, True,
           "weight magnitude, then scaling on unlabeled data"),
    Method("output-magnitude", "Output magnitude", True, False, False,
           "mean |activation| * ||W2[i, :]|| on unlabeled data, no scaling"),
    Method("random", "Random", False, False, False, "uniform random scores from the seed"),
    Method("mask-tuning", "Mask-Tuning (labels)", True, True, True,
           "Kwon et al.: Fisher importance from labeled data, global top-k, then scaling"),
    Method("kcm-labels", "KCM + labels", True, True, True,
           "KCM, then greedy swaps by the gradient of a few labeled batches, then scaling"),
)}


def method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


@dataclass(frozen=True)
class PruneConfig:
    """Everything that decides a plan. Validated here, once.

    seq_len: the sequence length the FLOPs budget is counted at; None means the average real length
        of the unlabeled sample (the paper uses each task's average length).
    scale_samples: how many of the unlabeled sequences the scaling step uses.
    label_samples: how many labeled sequences the label-using methods use (None: all given).
    """

    method: str = "kcm"
    budget: float = 0.6
    seq_len: float | None = None
    seed: int = 0
    hull: HullConfig = HullConfig()
    d2: S.D2Config = S.D2Config()
    scale: ScaleConfig = ScaleConfig()
    scale_samples: int = 512
    label_samples: int | None = 512
    multiple: int = 1
    min_per_layer: int = 0
    uniform: bool = False

    def __post_init__(self):
        method(self.method)
        if not isinstance(self.budget, (int, float)) or not (0 < self.budget <= 1):
            raise ValueError(f"flops budget must be in (0, 1] (fraction of FLOPs to keep), got {self.budget}")
        if self.seq_len is not None and not self.seq_len > 0:
            raise ValueError(f"seq_len must be > 0, got {self.seq_len}")
        if not (isinstance(self.scale_samples, int) and self.scale_samples >= 1):
            raise ValueError(f"scale_samples must be a positive integer, got {self.scale_samples!r}")
        if self.label_samples is not None and not self.label_samples >= 1:
            raise ValueError(f"label_samples must be a positive integer, got {self.label_samples!r}")

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict
        return asdict(self)


@dataclass(frozen=True)
class MethodScores:
    """A method's per-neuron scores, independent of the budget, plus how they were obtained."""

    method: str
    scores: list[torch.Tensor]
    grad_scores: list[torch.Tensor] | None = None     # kcm-labels only
    details: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def mean_length(batches: Sequence[Batch]) -> float:
    """Average number of real tokens per sequence: the attention mask's ones, or every position of
    ``input_ids`` when a batch has no mask (as ``token_mask`` counts them); 0.0 for images."""
    tokens = sequences = 0
    for batch in batches:
        mask = batch.get("attention_mask")
        if mask is None:
            mask = batch.get("input_ids")
            if mask is None:
                return 0.0
            mask = torch.ones_like(mask)
        tokens += int(mask.sum())
        sequences += int(mask.shape[0])
    return tokens / sequences if sequences else 0.0


def resolve_seq_len(shape: ModelShape, batches: Sequence[Batch], seq_len: float | None) -> float:
    if seq_len is not None:
        return float(seq_len)
    if shape.vision:
        return float(shape.image_tokens)
    length = mean_length(batches)
    if length <= 0:
        raise ValueError("the unlabeled sample has no real tokens; cannot infer a sequence length")
    return length


def _take(batches: Sequence[Batch], sequences: int | None) -> list[Batch]:
    if sequences is None:
        return list(batches)
    out, n = [], 0
    for batch in batches:
        if n >= sequences:
            break
        out.append(batch)
        n += int(next(iter(batch.values())).shape[0])
    return out


def compute_scores(model: nn.Module, config: PruneConfig, unlabeled: Sequence[Batch] = (),
                   labeled: Sequence[Batch] | None = None,
                   progress: Progress | None = None) -> MethodScores:
    """Score every FFN neuron with ``config.method``. The model is not modified."""
    spec = method(config.method)
    check_finite(model)
    if spec.uses_data and not unlabeled:
        raise ValueError(f"method {spec.name!r} needs unlabeled data, and none was given")
    if spec.uses_labels and not labeled:
        raise ValueError(f"method {spec.name!r} needs labeled data; give a label column, or "
                         "choose a label-free method such as 'kcm'")
    seconds: dict[str, float] = {}
    details: dict[str, Any] = {}
    stats: NeuronStats | None = None

    def timed(stage: str, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start
        return out

    def get_stats() -> NeuronStats:
        nonlocal stats
        if stats is None:
            stats = timed("d2", collect_stats, model, unlabeled, progress, len(unlabeled))
            details["tokens"] = stats.tokens
            details["sequences"] = stats.sequences
        return stats

    def get_r2() -> list[torch.Tensor]:
        r2_scores, fits = timed("r2", S.r2, model, config.hull, progress)
        details["r2_iterations"] = [f.iterations for f in fits]
        details["r2_converged"] = all(f.converged for f in fits)
        details["r2_sigma"] = [f.sigma for f in fits]
        return r2_scores

    name = spec.name
    grads = None
    if name in ("kcm", "kcm-labels"):
        r2_scores = get_r2()
        scores = S.r2d2(r2_scores, S.d2(get_stats(), config.d2))
        if name == "kcm-labels":
            grads = timed("gradients", S.mask_gradients, model, _take(labeled, config.label_samples),
                          squared=True, progress=progress)
    elif name == "r2":
        scores = get_r2()
    elif name == "d2":
        scores = S.d2(get_stats(), config.d2)
    elif name in ("weight-magnitude", "weight-magnitude-scale"):
        scores = timed("weights", S.weight_magnitude, model)
    elif name == "output-magnitude":
        scores = S.output_magnitude(model, get_stats())
    elif name == "random":
        scores = S.random_scores(model_shape(model.config).ffn_width, config.seed)
    elif name == "mask-tuning":
        scores = timed("gradients", S.mask_gradients, model, _take(labeled, config.label_samples),
                       squared=True, progress=progress)
    else:  # pragma: no cover - METHODS and this switch are kept in step by tests
        raise ValueError(f"method {name!r} has no scorer")
    return MethodScores(name, scores, grads, details, seconds)


def make_plan(model: nn.Module, method_scores: MethodScores, config: PruneConfig,
              seq_len: float) -> KeepPlan:
    """Select (and for kcm-labels refine) under ``config.budget``; no scaling yet."""
    shape = model_shape(model.config)
    plan = select(method_scores.scores, shape, config.budget, seq_len, multiple=config.multiple,
                  min_per_layer=config.min_per_layer, uniform=config.uniform, method=config.method)
    if method_scores.grad_scores is not None:
        plan = refine_with_gradients(plan, method_scores.scores, method_scores.grad_scores,
                                     within_layer=config.uniform or config.multiple > 1)
    return plan


@dataclass
class PruneResult:
    plan: KeepPlan
    model: nn.Module            # physically sliced
    seq_len: float
    seconds: dict[str, float]
    details: dict[str, Any]


def prune(model: nn.Module, config: PruneConfig, unlabeled: Sequence[Batch] = (),
          labeled: Sequence[Batch] | None = None, progress: Progress | None = None,
          method_scores: MethodScores | None = None) -> PruneResult:
    """Score, select, scale and slice. Returns a new model; ``model`` is left as it was."""
    unlabeled = list(unlabeled)
    shape = model_shape(model.config)
    seq_len = resolve_seq_len(shape, unlabeled, config.seq_len)
    check_budget(shape, seq_len, config.budget)      # before any scoring work
    if method_scores is None:
        method_scores = compute_scores(model, config, unlabeled, labeled, progress)
    seconds = dict(method_scores.seconds)
    start = time.perf_counter()
    plan = make_plan(model, method_scores, config, seq_len)
    seconds["selection"] = time.perf_counter() - start
    if method(config.method).scaled:
        start = time.perf_counter()
        plan = fit_scales(model, plan, _take(unlabeled, config.scale_samples), config.scale, progress)
        seconds["scaling"] = time.perf_counter() - start
    start = time.perf_counter()
    tell(progress, "slicing", 0.0)
    pruned = slice_model(model, plan)
    seconds["slicing"] = time.perf_counter() - start
    plan = replace(plan, info={**plan.info, "seq_len": seq_len})
    return PruneResult(plan, pruned, seq_len, seconds, dict(method_scores.details))
