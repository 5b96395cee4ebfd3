"""Evaluation: accuracy with a bootstrap interval, agreement with the unpruned model, perplexity.

The statistics come from ``scipy.stats``: percentile bootstrap intervals (``bootstrap``) and McNemar's
exact test (``binomtest`` on the discordant pairs) for comparing two models on the same examples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .runtime import (LABEL_KEYS, Batch, Progress, check_finite, eval_mode, model_device, model_inputs,
                      tell)


def predict(model: nn.Module, batches: Sequence[Batch], progress: Progress | None = None) -> torch.Tensor:
    """Predicted class of every example, in batch order: (examples,) long tensor on the CPU."""
    device = model_device(model)
    preds = []
    with eval_mode(model), torch.no_grad():
        for step, batch in enumerate(batches):
            logits = model(**model_inputs(batch, device)).logits      # (B, classes)
            preds.append(logits.argmax(-1).cpu())
            tell(progress, f"evaluating: batch {step + 1}/{len(batches)}", (step + 1) / len(batches))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def labels_of(batches: Iterable[Batch]) -> torch.Tensor | None:
    parts = []
    for batch in batches:
        labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        if labels is None:
            return None
        parts.append(labels.cpu())
    return torch.cat(parts) if parts else None


def bootstrap_interval(hits, seed: int = 0, resamples: int = 1000,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``hits`` (0/1 per example, or per-example
    differences of two such vectors), resampling examples.

    ``scipy.stats.bootstrap`` with ``method="percentile"`` and ``rng=numpy.random.default_rng(seed)``:
    the same seed gives the same interval. NaN for no examples; one example gives its value twice.
    """
    from scipy import stats
    values = _as_float_array(hits)
    if values.size == 0:
        return (math.nan, math.nan)
    if values.size == 1:                      # scipy needs two observations; one has no spread
        return (float(values[0]), float(values[0]))
    result = stats.bootstrap((values,), np.mean, n_resamples=resamples, confidence_level=level,
                             method="percentile", vectorized=True, paired=False,
                             batch=max(1, _MAX_DRAWS // values.size), rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


# At most this many resampled values in memory at once (scipy draws resamples x examples indices).
_MAX_DRAWS = 1 << 22


def _as_float_array(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


@dataclass(frozen=True)
class Rate:
    """A proportion with its bootstrap interval (e.g. accuracy 0.87 [0.85, 0.89] over 800 examples)."""

    value: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, hits: torch.Tensor, seed: int = 0) -> "Rate":
        lo, hi = bootstrap_interval(hits, seed)
        return cls(float(hits.double().mean()) if hits.numel() else math.nan, lo, hi, int(hits.numel()))

    def to_dict(self) -> dict:
        return {"value": self.value, "ci95": [self.low, self.high], "n": self.n}


@dataclass(frozen=True)
class ClassifierEval:
    accuracy: Rate | None        # None without labels
    agreement: Rate | None       # None without reference predictions
    predictions: torch.Tensor
    # (examples,) bool, True where the prediction is right; None without labels. Kept so two models
    # on the same examples can be compared paired (``paired_difference``), not by their two intervals.
    hits: torch.Tensor | None = None

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy.to_dict() if self.accuracy else None,
                "agreement": self.agreement.to_dict() if self.agreement else None}


@dataclass(frozen=True)
class PairedDifference:
    """Model A minus model B on the same examples: the difference of their accuracies with a paired
    bootstrap interval, and McNemar's exact test on the examples where exactly one of them is right.

    ``a_only`` / ``b_only`` count the examples only A / only B gets right (the discordant pairs);
    ``p_value`` is the two-sided exact binomial test of ``a_only`` out of ``a_only + b_only`` against
    one half (1.0 when no example is discordant).
    """

    value: float
    low: float
    high: float
    n: int
    a_only: int
    b_only: int
    p_value: float

    def to_dict(self) -> dict:
        return {"value": self.value, "ci95": [self.low, self.high], "n": self.n,
                "a_only": self.a_only, "b_only": self.b_only, "mcnemar_p": self.p_value}


def paired_difference(a_correct, b_correct, seed: int = 0) -> PairedDifference:
    """Compare two models on the same examples from their 0/1 correctness vectors (same order).

    The interval resamples examples, keeping each example's pair of outcomes together: the percentile
    bootstrap of the per-example differences ``a - b`` (the same as resampling the pairs).
    """
    from scipy import stats
    a, b = _as_float_array(a_correct), _as_float_array(b_correct)
    if a.shape != b.shape:
        raise ValueError(f"a_correct has {a.size} examples but b_correct has {b.size}; compare the "
                         "two models on the same examples")
    if not np.isin(a, (0.0, 1.0)).all() or not np.isin(b, (0.0, 1.0)).all():
        raise ValueError("a_correct and b_correct must hold only 0/1 (or False/True) values")
    diff = a - b
    a_only, b_only = int((diff > 0).sum()), int((diff < 0).sum())
    discordant = a_only + b_only
    p_value = float(stats.binomtest(a_only, discordant, 0.5).pvalue) if discordant else 1.0
    low, high = bootstrap_interval(diff, seed)
    return PairedDifference(float(diff.mean()) if diff.size else math.nan, low, high, int(diff.size),
                            a_only, b_only, p_value)


def evaluate_classifier(model: nn.Module, batches: Sequence[Batch],
                        reference: torch.Tensor | None = None, seed: int = 0,
                        progress: Progress | None = None) -> ClassifierEval:
    """Accuracy (when the batches carry labels) and agreement with ``reference`` predictions.

    Refuses a model with NaN or infinite weights (its predictions mean nothing) and labels outside
    the model's classes (they could never be right; map them with ``data.labels_for_model``).
    """
    check_finite(model)
    batches = list(batches)
    labels = labels_of(batches)
    _check_label_range(labels, model)
    preds = predict(model, batches, progress)
    hits = preds == labels if labels is not None else None
    accuracy = Rate.of(hits, seed) if hits is not None else None
    agreement = Rate.of(preds == reference, seed) if reference is not None else None
    return ClassifierEval(accuracy, agreement, preds, hits)


def _check_label_range(labels: torch.Tensor | None, model: nn.Module) -> None:
    classes = getattr(getattr(model, "config", None), "num_labels", None)
    if labels is None or not labels.numel() or not classes:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        bad = low if low < 0 else high
        raise ValueError(f"the evaluation batches hold label {bad} but the model predicts only classes "
                         f"0-{classes - 1}; map the data's labels to the model's classes with "
                         "kcm_core.data.labels_for_model before making batches")


def perplexity(model: nn.Module, batches: Sequence[Batch], progress: Progress | None = None) -> float:
    """Token-level perplexity of a causal LM over the real (non-padding) tokens."""
    device = model_device(model)
    total_nll, total_tokens = 0.0, 0
    with eval_mode(model), torch.no_grad():
        for step, batch in enumerate(batches):
            inputs = model_inputs(batch, device)
            logits = model(**inputs).logits[:, :-1].float()               # (B, T-1, V)
            target = inputs["input_ids"][:, 1:]
            mask = inputs.get("attention_mask")
            mask = torch.ones_like(target, dtype=torch.bool) if mask is None else mask[:, 1:].bool()
            nll = torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum")
            total_nll += float(nll)
            total_tokens += int(mask.sum())
            tell(progress, f"perplexity: batch {step + 1}/{len(batches)}", (step + 1) / len(batches))
    if total_tokens == 0:
        raise ValueError("no tokens to score: the evaluation data is empty")
    return math.exp(total_nll / total_tokens)
