"""The method table: every way of scoring neurons, as one row each.

A ``Method`` names the *components* its score is made of (``r2``: the kernel hull of the weights;
``stats``: activation statistics on unlabeled data; ``grads``: Fisher importance from labeled data;
nothing: the weights alone) and a ``score`` function that combines them. Components are fetched from a
``ScoreSources`` object: ``kcm_core.pipeline`` computes them lazily in-process, and the app serves them
from a store shared by every browser session, so the kernel hull is computed once for KCM, R2 and the
Scores page. Adding a method is one row here; nothing else switches on method names.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Protocol

import torch
from torch import nn

from . import scores as S
from .activations import NeuronStats
from .arch import ffn_blocks
from .hull import HullFit

LayerScores = list[torch.Tensor]
COMPONENTS = ("r2", "stats", "grads")


class ScoreSources(Protocol):
    """What a method's score is made of; each component is computed at most once per source."""

    model: nn.Module
    config: Any             # the run's kcm_core.config.PruneConfig (its d2 options and seed are read)

    def r2(self) -> tuple[LayerScores, list[HullFit]]: ...

    def stats(self) -> NeuronStats: ...

    def grads(self) -> LayerScores: ...

    def curves(self, scores: LayerScores) -> LayerScores: ...


@dataclass(frozen=True)
class Method:
    """One way of scoring neurons.

    needs: the components the score is built from (a subset of ``COMPONENTS``).
    scaled: whether the selection is followed by the label-free scaling step (which needs unlabeled data).
    refine: whether the selection is refined by greedy gradient swaps (needs ``grads``).
    compensate: whether the dropped neurons' mean output is folded into the down-projection's bias
        (FLAP; needs ``stats``).
    repair: the method's own repair step (``kcm_core.repair``) when it is neither the scaling step
        (``scaled``) nor FLAP's bias (``compensate``), e.g. "refit"; any method's repair can be changed
        with ``PruneConfig.repair``.
    allocation: how its scores spread the budget over layers: "pooled" (the raw scores ranked over all
        layers), "standardised" (per-layer z-scores) or "curve" (from each layer's refit-error curve,
        ``kcm_core.curves``); ``PruneConfig.allocation`` overrides it.
    seeded: whether the score depends on ``PruneConfig.seed``.
    per_layer: whether a layer's score depends on that layer alone (its weights and activation
        statistics); the streamed mode (``kcm_core.streamed``) scores such methods one layer at a time,
        the others from the layer widths of the empty model.
    reads_weights: whether ``score`` reads the model's weights itself, beyond its components (the
        magnitudes, Wanda-sp, FLAP); a caller that serves only the components layer by layer (the
        app on a model larger than memory) scores such a method with ``kcm_core.streamed.score_streamed``.
    """

    name: str
    label: str
    description: str
    needs: frozenset[str]
    score: Callable[[ScoreSources], LayerScores]
    scaled: bool = False
    refine: bool = False
    compensate: bool = False
    seeded: bool = False
    per_layer: bool = True
    reads_weights: bool = False
    repair: str | None = None            # its own repair when not implied by scaled/compensate
    allocation: str = "pooled"           # how its scores spread the budget over layers (kcm_core.select)

    def __post_init__(self):
        unknown = set(self.needs) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"method {self.name!r} needs unknown components {sorted(unknown)}")
        if self.refine and "grads" not in self.needs:
            raise ValueError(f"method {self.name!r} refines by gradients but does not need them")
        if self.compensate and "stats" not in self.needs:
            raise ValueError(f"method {self.name!r} compensates biases but needs no activation statistics")

    @property
    def own_repair(self) -> str:
        """The repair step this method comes with (``kcm_core.repair``): scales, bias or none."""
        if self.repair is not None:
            return self.repair
        return "scales" if self.scaled else "bias" if self.compensate else "none"

    @property
    def uses_labels(self) -> bool:
        return "grads" in self.needs

    @property
    def uses_data(self) -> bool:
        """Whether unlabeled data is needed at all (for the scores or for its repair step)."""
        return bool(self.needs) or self.own_repair != "none"


def _gated(src: ScoreSources) -> bool:
    return any(b.gate is not None for b in ffn_blocks(src.model))


def _d2(src: ScoreSources) -> LayerScores:
    return S.d2(src.stats(), src.config.d2, gated=_gated(src))


def _kcm(src: ScoreSources) -> LayerScores:
    return S.r2d2(src.r2()[0], _d2(src))


def _weights(src: ScoreSources) -> LayerScores:
    return S.weight_magnitude(src.model)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("kcm", "KCM (R2D2)",
           "R2 (kernel hull on weights) x D2 (activations), global top-k, then scaling",
           frozenset({"r2", "stats"}), _kcm, scaled=True),
    Method("r2", "R2 only", "kernel-hull score on weights alone, then scaling",
           frozenset({"r2"}), lambda src: src.r2()[0], scaled=True),
    Method("d2", "D2 only", "activation score alone, then scaling",
           frozenset({"stats"}), _d2, scaled=True),
    Method("weight-magnitude", "Weight magnitude", "||W1[:, i]|| * ||W2[i, :]||, no data, no scaling",
           frozenset(), _weights, reads_weights=True),
    Method("weight-magnitude-scale", "Weight magnitude + scale",
           "weight magnitude, then scaling on unlabeled data", frozenset(), _weights, scaled=True,
           reads_weights=True),
    Method("output-magnitude", "Output magnitude",
           "mean |activation| * ||W2[i, :]|| on unlabeled data, no scaling",
           frozenset({"stats"}), lambda src: S.output_magnitude(src.model, src.stats()), reads_weights=True),
    Method("wanda-sp", "Wanda-sp", "structured Wanda: ||W2[i, :]|| * ||x_i|| over the calibration "
           "tokens, no scaling (FLAP's baseline)", frozenset({"stats"}),
           lambda src: S.wanda_sp(src.model, src.stats()), reads_weights=True),
    Method("flap", "FLAP", "fluctuation Var(x_i) * ||W2[i, :]||^2, standardised per layer, then the "
           "dropped neurons' mean output folded into the down-projection bias",
           frozenset({"stats"}), lambda src: S.flap(src.model, src.stats()), compensate=True,
           reads_weights=True),
    Method("fluct-refit", "Fluctuation + refit",
           "FLAP's fluctuation score, standardised per layer, then every kept down-projection row refitted "
           "by least squares to the unpruned layer's output on the pruned model's own inputs (the "
           "image-classifier default)", frozenset({"stats"}), lambda src: S.flap(src.model, src.stats()),
           reads_weights=True, repair="refit", allocation="standardised"),
    Method("fluct-refit-curve", "Fluctuation + refit, curve allocation",
           "fluct-refit with each layer's kept count halfway between the standardised allocation and the "
           "counts that minimise the layers' refit error (their error curves on the calibration tokens; "
           "the language-model default)",
           frozenset({"stats"}), lambda src: S.flap(src.model, src.stats()),
           reads_weights=True, repair="refit", allocation="curve"),
    Method("random", "Random", "uniform random scores from the seed", frozenset(),
           lambda src: S.random_scores([b.width for b in ffn_blocks(src.model)], src.config.seed),
           seeded=True, per_layer=False),      # one generator runs through all layers
    Method("mask-tuning", "Mask-Tuning (labels)",
           "Kwon et al.: Fisher importance from labeled data, global top-k, then scaling",
           frozenset({"grads"}), lambda src: src.grads(), scaled=True),
    Method("kcm-labels", "KCM + labels",
           "KCM, then greedy swaps by the gradient of a few labeled batches, then scaling",
           frozenset({"r2", "stats", "grads"}), _kcm, scaled=True, refine=True),
)}


# The default method of the CLI and the app for a text classifier (and of a bare PruneConfig): the
# paper's KCM. A causal language model's default is DEFAULT_LM_METHOD: on the LM demo the paper's KCM
# loses to FLAP at every budget, FLAP's score with the refit repair beats FLAP (benchmarks/results/lm_grid.md),
# and allocating by the layers' refit-error curves beats the standardised allocation at every budget
# (benchmarks/results/lm_allocation_error.md). An image classifier's is DEFAULT_VISION_METHOD: on the vision
# demo the paper's KCM keeps 30% accuracy at 0.6 of the FLOPs and fluctuation + refit 86%
# (benchmarks/results/vision.md); on the text classifiers KCM stays ahead of it on one task
# (benchmarks/results/classifier_default.md). fluct-refit-curve is ahead of every other label-free row at
# 0.6 on MPNet, level elsewhere but behind KCM on hedge, and faster on the demo (docs/repair.md); it is
# the candidate to replace KCM as the text default.
DEFAULT_METHOD = "kcm"
DEFAULT_LM_METHOD = "fluct-refit-curve"
DEFAULT_VISION_METHOD = "fluct-refit"


def default_method(causal_lm: bool, vision: bool = False) -> str:
    """The default method for a causal language model, an image classifier, or a text classifier."""
    if causal_lm:
        return DEFAULT_LM_METHOD
    return DEFAULT_VISION_METHOD if vision else DEFAULT_METHOD


def method(name: str) -> Method:
    """The row for ``name``; an unknown name raises ``ValueError`` listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


@dataclass(frozen=True)
class ScoreDetails:
    """How a method's scores were obtained (what the report and the app show beside them)."""

    r2_iterations: tuple[int, ...] | None = None
    r2_converged: bool | None = None
    r2_sigma: tuple[float, ...] | None = None
    r2_stop_rules: tuple[str, ...] | None = None   # the R2 stop rule per layer ("auto" resolved)
    tokens: int | None = None            # non-padding tokens the activation statistics saw
    sequences: int | None = None

    @classmethod
    def of(cls, fits: list[HullFit] | None = None, stats: NeuronStats | None = None) -> "ScoreDetails":
        values: dict[str, Any] = {}
        if fits is not None:
            values.update(r2_iterations=tuple(f.iterations for f in fits),
                          r2_converged=all(f.converged for f in fits),
                          r2_sigma=tuple(float(f.sigma) for f in fits),
                          r2_stop_rules=tuple(f.stop_rule for f in fits) if all(f.stop_rule for f in fits) else None)
        if stats is not None:
            values.update(tokens=stats.tokens, sequences=stats.sequences)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The recorded fields only (JSON-ready)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class MethodScores:
    """A method's per-neuron scores, independent of the budget, plus how they were obtained."""

    method: str
    scores: LayerScores
    grad_scores: LayerScores | None = None      # methods that refine by gradients
    means: LayerScores | None = None            # mean neuron inputs (methods that collect statistics)
    details: ScoreDetails = ScoreDetails()
    seconds: dict[str, float] | None = None     # wall time per component computed for this call
    curves: LayerScores | None = None           # per layer, the refit error at every kept count (the
                                                # curve allocation's; kcm_core.curves)


def score_with(spec: Method, sources: ScoreSources, seconds: dict[str, float] | None = None) -> MethodScores:
    """Run ``spec``'s row against ``sources`` and record what was used; with the curve allocation, the
    error curves of the scores' order come with them."""
    scores = spec.score(sources)
    curves = sources.curves(scores) if sources.config.resolved_allocation == "curve" else None
    grads = sources.grads() if spec.refine else None
    fits = sources.r2()[1] if "r2" in spec.needs else None
    stats = sources.stats() if "stats" in spec.needs else None
    means = list(stats.mean) if stats is not None else None
    return MethodScores(spec.name, scores, grads, means, ScoreDetails.of(fits, stats), dict(seconds or {}),
                        curves)
