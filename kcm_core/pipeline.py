"""The verbs chained, once for every caller: score -> select (-> refine) -> repair -> slice, for the
methods of ``kcm_core.methods``.

``prune`` is the one chain: the CLI calls it bare, the app with the results it keeps between runs
(``Store``: the teacher's outputs, the activation statistics; its scores are passed in) and without the
slicing, which it times apart. Each step is also a verb of its own: ``compute_scores`` depends on the
method and data only, not the budget, so callers (the app, the benchmarks) compute it once and call
``make_plan`` (select, no repair) for every budget; ``repair_plan`` fits the repair to a plan.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import scores as S
from .activations import NeuronStats, collect_stats
from .arch import ModelShape, model_shape
from .data import mean_length
from .distributed import SINGLE, Group
from .flops import check_budget
from .plan import KeepPlan
from .compensation import check_compensable, compensate
from .realise import slice_model
from .config import PruneConfig
from .curves import error_curves
from .methods import MethodScores, ScoreDetails, score_with
from .repair import fit_repair
from .runtime import Batch, Progress, check_finite, take_sequences, tell
from .scaling import fit_scales
from .select import refine_with_gradients, select


def resolve_seq_len(shape: ModelShape, batches: Sequence[Batch], seq_len: float | None) -> float:
    if seq_len is not None:
        return float(seq_len)
    if shape.vision:            # the images as the processor made them, else the config's image_size
        pixels = next((b["pixel_values"] for b in batches if "pixel_values" in b), None)
        return float(shape.image_tokens if pixels is None else shape.tokens_for_image(*pixels.shape[-2:]))
    length = mean_length(batches)
    if length <= 0:
        raise ValueError("the unlabeled sample has no real tokens; cannot infer a sequence length")
    return length


class LocalSources:
    """Score components computed lazily in this process, each at most once, with its wall time
    (under a distributed ``group``: this rank's share of the work, summed or gathered over ranks)."""

    def __init__(self, model: nn.Module, config: PruneConfig, unlabeled: Sequence[Batch],
                 labeled: Sequence[Batch] | None, progress: Progress | None,
                 group: Group = SINGLE, shared: dict[str, Any] | None = None) -> None:
        self.model, self.config = model, config
        self._unlabeled, self._labeled, self._progress = unlabeled, labeled, progress
        self._group = group
        self._cache: dict[str, Any] = {} if shared is None else shared
        self.seconds: dict[str, float] = {}

    def _once(self, name: str, stage: str, compute):
        if name not in self._cache:
            start = time.perf_counter()
            self._cache[name] = compute()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
        return self._cache[name]

    def r2(self):
        return self._once("r2", "r2", lambda: S.r2(self.model, self.config.hull, self._progress,
                                                    self._group))

    def stats(self) -> NeuronStats:
        return self._once("stats", "d2", lambda: collect_stats(
            self.model, self._unlabeled, self._progress, len(self._unlabeled), self._group))

    def grads(self) -> list[torch.Tensor]:
        return self._once("grads", "gradients", lambda: S.mask_gradients(
            self.model, take_sequences(self._labeled, self.config.label_samples), squared=True,
            progress=self._progress, group=self._group))

    def curves(self, scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The refit-error curves of ``scores``' order (``kcm_core.curves``); they depend on the method's
        scores, so they are never kept in the ``shared`` components."""
        if not self._unlabeled:
            raise ValueError("the curve allocation fits on unlabeled data, and none was given")
        start = time.perf_counter()
        curves = error_curves(self.model, scores, self._unlabeled, self.config.repair.damp, self._progress,
                              self._group)
        self.seconds["curves"] = self.seconds.get("curves", 0.0) + time.perf_counter() - start
        return curves


def compute_scores(model: nn.Module, config: PruneConfig, unlabeled: Sequence[Batch] = (),
                   labeled: Sequence[Batch] | None = None,
                   progress: Progress | None = None, group: Group = SINGLE,
                   shared: dict[str, Any] | None = None) -> MethodScores:
    """Score every FFN neuron with ``config.method`` (its row in ``kcm_core.methods``).
    The model is not modified. ``group``: see ``kcm_core.distributed`` (every rank gets all scores).

    ``shared``: score components (``"r2"``, ``"stats"``, ``"grads"``) to reuse across several methods,
    filled in as they are computed; the caller keeps one only while the model, the data, the hull
    options and ``label_samples`` stay the same (R2 depends on the weights and hull options alone).
    Reused components take no time in ``seconds``."""
    spec = config.spec
    check_finite(model)
    if config.resolved_repair.kind in ("bias", "scales+bias"):
        check_compensable(model)                  # before any scoring work
    if "stats" in spec.needs and not unlabeled:
        raise ValueError(f"method {spec.name!r} needs unlabeled data, and none was given")
    if spec.uses_labels and not labeled:
        raise ValueError(f"method {spec.name!r} needs labeled data; give a label column, or "
                         "choose a label-free method such as 'kcm'")
    sources = LocalSources(model, config, list(unlabeled), labeled, progress, group, shared)
    start = time.perf_counter()
    result = score_with(spec, sources)
    seconds = {**sources.seconds, "scoring": time.perf_counter() - start}
    return replace(result, seconds=seconds)


def make_plan(model: nn.Module, method_scores: MethodScores, config: PruneConfig,
              seq_len: float) -> KeepPlan:
    """Select (and for kcm-labels refine) under ``config.budget``; no repair yet. ``model`` is read for
    its config alone (the empty skeleton of a streamed model serves)."""
    shape = model_shape(model.config)
    plan = select(method_scores.scores, shape, config.budget, seq_len, multiple=config.multiple,
                  min_per_layer=config.min_per_layer, uniform=config.uniform, method=config.method,
                  allocation=config.resolved_allocation, curves=method_scores.curves)
    if config.spec.refine:
        plan = refine_with_gradients(plan, method_scores.scores, method_scores.grad_scores,
                                     within_layer=config.uniform or config.multiple > 1)
    return plan


def repair_plan(model: nn.Module, plan: KeepPlan, config: PruneConfig, batches: Sequence[Batch],
                means: Sequence[torch.Tensor] | None = None, progress: Progress | None = None,
                targets: list[torch.Tensor] | None = None, group: Group = SINGLE) -> KeepPlan:
    """``plan`` with ``config``'s repair (``kcm_core.repair``) fitted on ``batches`` (the repair sample).

    ``means``: the unpruned model's mean neuron inputs (FLAP's bias needs them; collected here when not
    given). ``targets``: the teacher's outputs on ``batches`` (``teacher_targets``), to reuse them."""
    repair = config.resolved_repair
    step = repair.step
    if step == "none":
        return replace(plan, info=plan.info.updated(**repair.plan_info()))
    if not batches:
        raise ValueError(f"method {config.method!r} with the {repair.kind} repair fits on unlabeled data, "
                         "and none was given")
    if step == "compensate":
        if means is None:
            means = collect_stats(model, batches, progress, len(batches), group).mean
        plan = compensate(model, plan, means)
    elif step == "scales":
        plan = fit_scales(model, plan, batches, config.scale, progress, targets=targets, group=group)
    else:
        plan = fit_repair(model, plan, batches, repair, ridge=config.scale.ridge, bound=config.scale.bound,
                          progress=progress, targets=targets, group=group)
    return replace(plan, info=plan.info.updated(**repair.plan_info()))


@dataclass(frozen=True)
class Store:
    """What a caller keeps between runs of ``prune`` and hands it instead of computing it again; each
    hook is optional (``NO_STORE``: everything computed in place, on the caller's model). The app passes
    hooks into its store shared by every browser session (``kcm_app.engine.evaluations.pipeline_store``),
    under its own keys, so a second budget computes neither again.

    teacher: the unpruned model's FFN outputs on the repair sample (``config.repair_sample``), asked only
        by a repair fitted against the teacher (``RepairConfig.needs_teacher``); without it the fit
        computes them (under a distributed group: each rank on its share).
    means: the unpruned model's mean neuron inputs on the whole scoring sample, asked only by FLAP's bias
        (the ``compensate`` step) when the scores carry none; without it they are collected here.
    """

    teacher: Callable[[], list[torch.Tensor]] | None = None
    means: Callable[[], Sequence[torch.Tensor]] | None = None


NO_STORE = Store()


@dataclass
class PruneResult:
    plan: KeepPlan
    model: nn.Module | None     # physically sliced; None when ``prune`` was asked not to realise the plan
    seq_len: float
    seconds: dict[str, float]
    details: ScoreDetails


def prune(model: nn.Module, config: PruneConfig, unlabeled: Sequence[Batch] = (),
          labeled: Sequence[Batch] | None = None, progress: Progress | None = None,
          method_scores: MethodScores | None = None, group: Group = SINGLE,
          store: Store = NO_STORE, realise: bool = True) -> PruneResult:
    """Score, select, repair and slice: the pipeline, chained here once for every caller. Returns a new
    model; ``model`` is left as it was.

    ``method_scores``: ``config``'s scores of ``model`` on this data, computed already (not scored
    again). ``store``: what the caller keeps between runs (``Store``). ``realise=False`` stops at the
    repaired plan (``PruneResult.model`` is None). Under a distributed ``group``
    (``kcm_core.distributed``) every rank passes the same data and gets the same plan; scoring and
    the repair fit are split between ranks, selection and slicing are not."""
    unlabeled = list(unlabeled)
    shape = model_shape(model.config)
    seq_len = resolve_seq_len(shape, unlabeled, config.seq_len)
    check_budget(shape, seq_len, config.budget)      # before any scoring work
    if method_scores is None:
        method_scores = compute_scores(model, config, unlabeled, labeled, progress, group)
    seconds = dict(method_scores.seconds or {})
    start = time.perf_counter()
    plan = make_plan(model, method_scores, config, seq_len)
    seconds["selection"] = time.perf_counter() - start
    start = time.perf_counter()
    repair = config.resolved_repair
    means = method_scores.means
    if means is None and repair.step == "compensate":
        # FLAP's bias reads the mean input of every neuron over the whole scoring sample, as the methods
        # whose scores carry it (their activation statistics) do, not over the smaller repair sample
        means = (store.means() if store.means is not None
                 else collect_stats(model, unlabeled, progress, len(unlabeled), group).mean)
    targets = store.teacher() if repair.needs_teacher and store.teacher is not None else None
    plan = repair_plan(model, plan, config, config.repair_sample(unlabeled), means, progress,
                       targets=targets, group=group)
    if repair.kind != "none":
        seconds["scaling"] = time.perf_counter() - start
    pruned = None
    if realise:
        start = time.perf_counter()
        tell(progress, "slicing", 0.0)
        pruned = slice_model(model, plan)
        seconds["slicing"] = time.perf_counter() - start
    plan = replace(plan, info=plan.info.updated(seq_len=seq_len))
    return PruneResult(plan, pruned, seq_len, seconds, method_scores.details)
