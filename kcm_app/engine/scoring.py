"""Neuron scores per method, assembled from components stored once for all sessions (the kernel hull
and the activation statistics are shared by KCM, R2, D2 and Output-Magnitude)."""
from __future__ import annotations

from typing import Any

import torch

from kcm_core import scores as S
from kcm_core.activations import NeuronStats, collect_stats
from kcm_core.hull import HullFit
from kcm_core.pipeline import MethodScores, PruneConfig, method
from kcm_core.runtime import Progress

from ..store import SharedStore
from .workspace import Workspace, private_copy, take


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
