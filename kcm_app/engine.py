"""The app's calls into ``kcm_core``, each result stored once for all sessions. No Streamlit here.

Isolation rules (STYLE habit 6), applied in one place:
- the shared model (``Workspace.model``) is only *read*: forward passes, ``slice_model``,
  ``mask_copy`` and ``fit_scales`` (which work on copies they make themselves);
- every core call that registers hooks (activation statistics, gradients, teacher targets, timing)
  gets a private ``copy.deepcopy`` of the model, so a hook can never fire in another session's
  forward pass;
- every result goes into a ``SharedStore`` under a key of hashable ids (model id, data fingerprint,
  method, hyper-parameters, budget) and is never mutated afterwards; sessions differ only in which
  keys they ask for, so two browsers never see each other's numbers.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from torch import nn

from kcm_core import scores as S
from kcm_core.activations import NeuronStats, collect_stats
from kcm_core.arch import ModelShape, ffn_blocks
from kcm_core.evaluate import ClassifierEval, evaluate_classifier
from kcm_core.flops import count_params, flops_floor, keep_count, relative_flops
from kcm_core.hull import HullFit
from kcm_core.pipeline import MethodScores, PruneConfig, make_plan, method
from kcm_core.plan import KeepPlan
from kcm_core.realise import slice_model
from kcm_core.runtime import Batch, Progress, model_inputs, tell
from kcm_core.scaling import fit_scales, teacher_targets

from .store import SharedStore

# How many sequences the scaling step fits on in the app (the CLI default is 512). Its cost grows with
# the token count times k^2 (float64 Gram matrices), so a small sample keeps a new budget quick; on the
# demo, 32, 64, 128 and 512 sequences gave the same accuracy within the 95% intervals at 50% and 60%
# of FLOPs (weight magnitude + scale, 800 test sentences). Shown on the Prune page.
APP_SCALE_SAMPLES = 64
TIMING_BATCH = 16          # sequences per timed forward pass (measured speedup)
TIMING_REPEATS = 3


@dataclass(frozen=True)
class Workspace:
    """Everything one view needs about the loaded model and data. Built by ``kcm_app.resources``.

    ``model`` is shared by every session: read it, never change it (see the module docstring).
    """

    model_key: str
    model: nn.Module
    tokenizer: Any
    shape: ModelShape
    data_key: str                      # fingerprint of the samples, max_len and batching
    unlabeled: tuple[Batch, ...]       # the scoring sample, without labels
    labeled: tuple[Batch, ...] | None  # the same sample with labels (label-using methods)
    eval_batches: tuple[Batch, ...] | None
    seq_len: float                     # mean real tokens per sequence of the scoring sample
    info: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def has_labels(self) -> bool:
        return self.labeled is not None and self.eval_batches is not None

    @property
    def widths(self) -> list[int]:
        return list(self.shape.ffn_width)

    @property
    def floor(self) -> float:
        return flops_floor(self.shape, self.seq_len)


def private_copy(model: nn.Module) -> nn.Module:
    """A session-private deep copy, for core calls that register hooks."""
    return copy.deepcopy(model)


def take(batches: Sequence[Batch], sequences: int) -> list[Batch]:
    """The first batches holding at least ``sequences`` sequences (whole batches)."""
    out, n = [], 0
    for batch in batches:
        if n >= sequences:
            break
        out.append(batch)
        n += int(batch["input_ids"].shape[0])
    return out


def score_key(ws: Workspace, config: PruneConfig) -> tuple:
    """What a method's scores depend on: never the budget, the scaling or the rounding."""
    spec = method(config.method)
    key: tuple = (ws.model_key, config.method)
    if config.method in ("kcm", "kcm-labels", "r2"):
        key += (config.hull,)
    if spec.uses_data:
        key += (ws.data_key, config.d2)
    if spec.uses_labels:
        key += (config.label_samples,)
    if config.method == "random":
        key += (config.seed,)
    return key


# --------------------------------------------------------------------------- score components

def r2_fits(ws: Workspace, config: PruneConfig, store: SharedStore,
            progress: Progress | None = None) -> tuple[list[torch.Tensor], list[HullFit]]:
    """R2 per layer (weights only); shared by KCM, R2 and the Scores page."""
    return store.get_or_compute(("r2", ws.model_key, config.hull),
                                lambda: S.r2(ws.model, config.hull, progress))


def neuron_stats(ws: Workspace, store: SharedStore, progress: Progress | None = None) -> NeuronStats:
    """Activation statistics of every neuron on the scoring sample (hooks on a private copy)."""
    def compute() -> NeuronStats:
        return collect_stats(private_copy(ws.model), ws.unlabeled, progress, len(ws.unlabeled))
    return store.get_or_compute(("stats", ws.model_key, ws.data_key), compute)


def gradient_scores(ws: Workspace, config: PruneConfig, store: SharedStore,
                    progress: Progress | None = None) -> list[torch.Tensor]:
    """Fisher importance (squared mask gradients) from the labeled sample (a private copy)."""
    if ws.labeled is None:
        raise ValueError(f"method {config.method!r} needs labeled data: choose data with a label column")
    batches = ws.labeled if config.label_samples is None else take(ws.labeled, config.label_samples)

    def compute() -> list[torch.Tensor]:
        return S.mask_gradients(private_copy(ws.model), batches, squared=True, progress=progress,
                                total=len(batches))
    return store.get_or_compute(("grads", ws.model_key, ws.data_key, config.label_samples), compute)


def method_scores(ws: Workspace, config: PruneConfig, store: SharedStore,
                  progress: Progress | None = None) -> MethodScores:
    """``kcm_core.pipeline.compute_scores``'s result, assembled from shared components so that the
    kernel hull and the activation statistics are computed once for KCM, R2, D2 and Output-Magnitude.
    ``tests/test_app_logic.py`` checks that it equals ``compute_scores``."""
    def compute() -> MethodScores:
        name = method(config.method).name
        details: dict[str, Any] = {}
        grads = None
        if name in ("kcm", "kcm-labels", "r2"):
            r2, fits = r2_fits(ws, config, store, progress)
            details.update(r2_iterations=[f.iterations for f in fits],
                           r2_converged=all(f.converged for f in fits), r2_sigma=[f.sigma for f in fits])
        if name in ("kcm", "kcm-labels", "d2", "output-magnitude"):
            stats = neuron_stats(ws, store, progress)
            details.update(tokens=stats.tokens, sequences=stats.sequences)
        if name in ("kcm", "kcm-labels"):
            scores = S.r2d2(r2, S.d2(stats, config.d2))
            if name == "kcm-labels":
                grads = gradient_scores(ws, config, store, progress)
        elif name == "r2":
            scores = r2
        elif name == "d2":
            scores = S.d2(stats, config.d2)
        elif name in ("weight-magnitude", "weight-magnitude-scale"):
            scores = S.weight_magnitude(ws.model)
        elif name == "output-magnitude":
            scores = S.output_magnitude(ws.model, stats)
        elif name == "random":
            scores = S.random_scores(ws.widths, config.seed)
        elif name == "mask-tuning":
            scores = gradient_scores(ws, config, store, progress)
        else:  # pragma: no cover - METHODS and this switch move together (tested)
            raise ValueError(f"method {name!r} has no scorer in the app")
        return MethodScores(name, scores, grads, details)
    return store.get_or_compute(("scores",) + score_key(ws, config), compute)


# --------------------------------------------------------------------------- fast readouts

@dataclass(frozen=True)
class Readout:
    """What the budget slider shows at once (no forward pass): plan, FLOPs, parameters."""

    budget: float
    plan: KeepPlan
    relative_flops: float
    neurons_kept: int
    neurons_total: int
    params_before: int
    params_after: int
    estimated_speedup: float     # 1 / relative encoder FLOPs

    @property
    def neurons_pruned(self) -> float:
        return 1 - self.neurons_kept / self.neurons_total if self.neurons_total else 0.0

    @property
    def relative_params(self) -> float:
        return self.params_after / self.params_before


def params_per_neuron(model: nn.Module) -> list[int]:
    """Parameters one neuron owns in each layer: its up (and gate) row with bias, its down column."""
    out = []
    for block in ffn_blocks(model):
        n = block.width
        owned = block.up.weight.numel() + block.down.weight.numel()
        if getattr(block.up, "bias", None) is not None:
            owned += block.up.bias.numel()
        if block.gate is not None:
            owned += block.gate.weight.numel()
            if getattr(block.gate, "bias", None) is not None:
                owned += block.gate.bias.numel()
        out.append(owned // n if n else 0)
    return out


def model_params(ws: Workspace, store: SharedStore) -> tuple[int, tuple[int, ...]]:
    """(total parameters, parameters per neuron in each layer) of the shared model."""
    return store.get_or_compute(("params", ws.model_key), lambda: (
        count_params(ws.model).total, tuple(params_per_neuron(ws.model))))


def readout(ws: Workspace, scores: MethodScores, config: PruneConfig, store: SharedStore) -> Readout:
    """Select under ``config.budget`` and count; milliseconds, no model is run."""
    plan = make_plan(ws.model, scores, config, ws.seq_len)
    total, per_neuron = model_params(ws, store)
    removed = sum((w - k) * p for w, k, p in zip(plan.widths, plan.kept_counts, per_neuron))
    rel = relative_flops(ws.shape, ws.seq_len, plan.kept_counts)
    return Readout(budget=config.budget, plan=plan, relative_flops=rel,
                   neurons_kept=plan.total_kept, neurons_total=sum(plan.widths),
                   params_before=total, params_after=total - removed, estimated_speedup=1 / rel)


def budget_for_pruned_fraction(ws: Workspace, fraction: float) -> float:
    """The relative FLOPs of a model with ``fraction`` of its FFN neurons removed (any layout)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction of neurons pruned must be in [0, 1], got {fraction}")
    widths = ws.widths
    kept_total = round(sum(widths) * (1 - fraction))
    # FLOPs depend only on the total kept count; spread it over the layers in any way.
    kept, left = [], kept_total
    for w in widths:
        kept.append(min(w, left))
        left -= kept[-1]
    return relative_flops(ws.shape, ws.seq_len, kept)


def neurons_for_budget(ws: Workspace, budget: float) -> int:
    return keep_count(ws.shape, ws.seq_len, budget)


# --------------------------------------------------------------------------- evaluations

def reference_run(ws: Workspace, store: SharedStore,
                  progress: Progress | None = None) -> tuple[ClassifierEval, float]:
    """The unpruned model on the evaluation data, and the wall time that took (seconds)."""
    if ws.eval_batches is None:
        raise ValueError("no labeled evaluation data: choose data with a label column to see accuracy")

    def compute():
        start = time.perf_counter()
        result = evaluate_classifier(ws.model, ws.eval_batches, progress=progress)
        return result, time.perf_counter() - start
    return store.get_or_compute(("dense", ws.model_key, ws.data_key), compute)


def reference(ws: Workspace, store: SharedStore, progress: Progress | None = None) -> ClassifierEval:
    """The unpruned model's evaluation (its predictions are the agreement reference)."""
    return reference_run(ws, store, progress)[0]


def teacher(ws: Workspace, scale_samples: int, store: SharedStore) -> tuple[list[Batch], list[torch.Tensor]]:
    """The scaling sample and the unpruned model's FFN outputs on it (computed once)."""
    batches = take(ws.unlabeled, scale_samples)

    def compute():
        return batches, teacher_targets(private_copy(ws.model), batches)
    return store.get_or_compute(("teacher", ws.model_key, ws.data_key, scale_samples), compute)


def timing_batch(ws: Workspace, length: int | None = None) -> dict[str, torch.Tensor]:
    """A fixed batch of ``TIMING_BATCH`` sequences of ``length`` tokens (default: the sample's mean)."""
    length = max(2, round(ws.seq_len if length is None else length))
    gen = torch.Generator().manual_seed(0)
    vocab = max(ws.shape.vocab_size, 2)
    ids = torch.randint(1, vocab, (TIMING_BATCH, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def paired_seconds(dense: nn.Module, pruned: nn.Module, batch: dict[str, torch.Tensor],
                   repeats: int = TIMING_REPEATS) -> tuple[float, float]:
    """Median forward time of each model, timed alternately so that a change in machine load
    (another session computing) hits both alike."""
    inputs = model_inputs(batch, next(dense.parameters()).device)
    times: dict[int, list[float]] = {0: [], 1: []}
    with torch.inference_mode():
        dense(**inputs)
        pruned(**inputs)
        for _ in range(repeats):
            for i, model in enumerate((dense, pruned)):
                start = time.perf_counter()
                model(**inputs)
                times[i].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


@dataclass(frozen=True)
class BudgetResult:
    """A plan realised and measured: the slow readouts of the Prune page."""

    method: str
    budget: float
    plan: KeepPlan                   # with scales when the method scales
    relative_flops: float
    params_after: int
    accuracy: dict | None            # Rate.to_dict(): value, ci95, n
    agreement: dict | None
    dense_seconds: float             # forward time of the unpruned model on the timing batch
    pruned_seconds: float            # the same for the sliced model
    timed_on: str                    # what was timed
    seconds: dict

    @property
    def measured_speedup(self) -> float:
        return self.dense_seconds / self.pruned_seconds if self.pruned_seconds else float("nan")


def budget_key(ws: Workspace, config: PruneConfig) -> tuple:
    return ("budget",) + score_key(ws, config) + (
        round(config.budget, 6), config.scale, config.scale_samples, config.multiple,
        config.min_per_layer, config.uniform)


def scaled_plan(ws: Workspace, scores: MethodScores, config: PruneConfig, store: SharedStore,
                progress: Progress | None = None) -> KeepPlan:
    """Select, then fit scales when the method scales (teacher targets reused)."""
    plan = make_plan(ws.model, scores, config, ws.seq_len)
    if method(config.method).scaled:
        batches, targets = teacher(ws, config.scale_samples, store)
        plan = fit_scales(ws.model, plan, batches, config.scale, progress, targets=targets)
    return replace(plan, info={**plan.info, "seq_len": ws.seq_len})


def evaluate_budget(ws: Workspace, config: PruneConfig, store: SharedStore,
                    progress: Progress | None = None) -> BudgetResult:
    """Plan, scale, slice, evaluate and time one budget; stored per (method, hyper, budget)."""
    def compute() -> BudgetResult:
        seconds: dict[str, float] = {}
        t = time.perf_counter()
        scores = method_scores(ws, config, store, progress)
        dense = reference_run(ws, store, progress) if ws.eval_batches is not None else None
        seconds["scores"] = time.perf_counter() - t
        t = time.perf_counter()
        plan = scaled_plan(ws, scores, config, store, progress)
        seconds["select+scale"] = time.perf_counter() - t
        t = time.perf_counter()
        pruned = slice_model(ws.model, plan)
        seconds["slice"] = time.perf_counter() - t
        result = None
        if dense is not None:
            t = time.perf_counter()
            result = evaluate_classifier(pruned, ws.eval_batches, reference=dense[0].predictions,
                                         progress=progress)
            seconds["evaluate"] = time.perf_counter() - t
        tell(progress, "timing", 1.0)
        t = time.perf_counter()
        batch = timing_batch(ws)
        base, pruned_time = paired_seconds(ws.model, pruned, batch)
        seconds["timing"] = time.perf_counter() - t
        timed_on = (f"a batch of {TIMING_BATCH} x {batch['input_ids'].shape[1]} tokens, the two models "
                    f"timed alternately, median of {TIMING_REPEATS}")
        return BudgetResult(
            method=config.method, budget=config.budget, plan=plan,
            relative_flops=relative_flops(ws.shape, ws.seq_len, plan.kept_counts),
            params_after=count_params(pruned).total,
            accuracy=result.accuracy.to_dict() if result and result.accuracy else None,
            agreement=result.agreement.to_dict() if result and result.agreement else None,
            dense_seconds=base, pruned_seconds=pruned_time, timed_on=timed_on, seconds=seconds)
    return store.get_or_compute(budget_key(ws, config), compute)


def is_evaluated(ws: Workspace, config: PruneConfig, store: SharedStore) -> bool:
    return budget_key(ws, config) in store


def comparison(ws: Workspace, methods: Sequence[str], budgets: Sequence[float], base: PruneConfig,
               store: SharedStore, progress: Progress | None = None) -> list[BudgetResult]:
    """Every (method, budget) pair evaluated (stored ones are reused), in method-major order."""
    results = []
    pairs = [(m, b) for m in methods for b in budgets]
    for i, (name, budget) in enumerate(pairs):
        config = replace(base, method=name, budget=float(budget))

        def step(message: str, fraction: float, i=i, name=name, budget=budget) -> None:
            tell(progress, f"{method(name).label} at {budget:.2f}: {message}", (i + fraction) / len(pairs))
        results.append(evaluate_budget(ws, config, store, step))
    tell(progress, "comparison: done", 1.0)
    return results
