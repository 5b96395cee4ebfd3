"""Neuron scores per method, assembled from components stored once for all sessions (the kernel hull
and the activation statistics are shared by KCM, R2, D2 and Output-Magnitude). The method table
(``kcm_core.methods``) says which components a method needs; this module only says where they live."""
from __future__ import annotations

import torch

from kcm_core import scores as S
from kcm_core.activations import NeuronStats, collect_stats
from kcm_core.curves import error_curves
from kcm_core.hull import HullFit
from kcm_core.methods import MethodScores, score_with
from kcm_core.pipeline import PruneConfig
from kcm_core.runtime import Progress, take_sequences
from kcm_core.streamed.passes import r2_streamed, score_streamed, stats_streamed

from .. import disk_cache
from ..store import SharedStore
from .workspace import Workspace, not_streamed, private_copy, skeleton


def component_key(ws: Workspace, config: PruneConfig, component: str) -> tuple:
    """What one score component depends on: never the budget, the scaling or the rounding."""
    if component == "r2":
        return ("r2", ws.model_key, config.hull)
    if component == "stats":
        return ("stats", ws.model_key, ws.data_key)
    if component == "grads":
        return ("grads", ws.model_key, ws.data_key, config.label_samples)
    raise ValueError(f"unknown score component {component!r}")


def score_key(ws: Workspace, config: PruneConfig) -> tuple:
    """What a method's scores depend on: its components' keys, plus D2's options or the seed."""
    spec = config.spec
    key: tuple = (ws.model_key, config.method)
    for component in sorted(spec.needs):
        key += component_key(ws, config, component)
    if "stats" in spec.needs:
        key += (config.d2,)
    if spec.seeded:
        key += (config.seed,)
    if config.resolved_allocation == "curve":      # the curves come with the scores
        key += ("curves", ws.data_key, config.repair.damp)
    return key


def r2_fits(ws: Workspace, config: PruneConfig, store: SharedStore,
            progress: Progress | None = None) -> tuple[list[torch.Tensor], list[HullFit]]:
    """R2 per layer (weights only); shared by KCM, R2 and the Scores page, kept on disk."""
    def fit():
        if ws.streamed:
            return r2_streamed(skeleton(ws), config.hull, progress)
        return S.r2(ws.model, config.hull, progress)

    def compute():
        return disk_cache.cached("r2", (ws.weights_hash, repr(config.hull)), fit, disk_cache.encode_fits,
                                 disk_cache.decode_fits)
    return store.get_or_compute(component_key(ws, config, "r2"), compute, progress)


def neuron_stats(ws: Workspace, store: SharedStore, progress: Progress | None = None) -> NeuronStats:
    """Activation statistics of every neuron on the scoring sample (hooks on a private copy), kept on
    disk."""
    def collect() -> NeuronStats:
        if ws.streamed:
            return stats_streamed(skeleton(ws), ws.unlabeled, progress)
        return collect_stats(private_copy(ws.model), ws.unlabeled, progress, len(ws.unlabeled))

    def compute() -> NeuronStats:
        return disk_cache.cached("stats", (ws.weights_hash, ws.data_key), collect, disk_cache.encode_stats,
                                 disk_cache.decode_stats)
    return store.get_or_compute(("stats", ws.model_key, ws.data_key), compute, progress)


def gradient_scores(ws: Workspace, config: PruneConfig, store: SharedStore,
                    progress: Progress | None = None) -> list[torch.Tensor]:
    """Fisher importance (squared mask gradients) from the labeled sample (a private copy)."""
    not_streamed(ws, f"method {config.method!r} (gradients through the model)")
    if ws.labeled is None:
        raise ValueError(f"method {config.method!r} needs labeled data: choose data with a label column")
    batches = take_sequences(ws.labeled, config.label_samples)

    def compute() -> list[torch.Tensor]:
        return disk_cache.cached(
            "grads", (ws.weights_hash, ws.data_key, config.label_samples),
            lambda: S.mask_gradients(private_copy(ws.model), batches, squared=True, progress=progress,
                                     total=len(batches)),
            disk_cache.encode_grads, disk_cache.decode_grads)
    return store.get_or_compute(component_key(ws, config, "grads"), compute, progress)


class SharedSources:
    """``kcm_core.methods.ScoreSources`` served from the store shared by every session."""

    def __init__(self, ws: Workspace, config: PruneConfig, store: SharedStore,
                 progress: Progress | None) -> None:
        self.model, self.config = ws.model, config
        self._ws, self._store, self._progress = ws, store, progress

    def r2(self):
        return r2_fits(self._ws, self.config, self._store, self._progress)

    def stats(self) -> NeuronStats:
        return neuron_stats(self._ws, self._store, self._progress)

    def grads(self) -> list[torch.Tensor]:
        return gradient_scores(self._ws, self.config, self._store, self._progress)

    def curves(self, scores: list[torch.Tensor]) -> list[torch.Tensor]:
        """The curve allocation's refit-error curves, on a private copy (they are kept with the scores)."""
        not_streamed(self._ws, "the curve allocation with a method scored from shared components")
        return error_curves(private_copy(self._ws.model), scores, self._ws.unlabeled, self.config.repair.damp,
                            self._progress)


def method_scores(ws: Workspace, config: PruneConfig, store: SharedStore,
                  progress: Progress | None = None) -> MethodScores:
    """``kcm_core.pipeline.compute_scores``'s result from shared components (equal to it: tested in
    ``tests/test_app_logic.py``)."""
    spec = config.spec
    if ws.streamed and spec.reads_weights:     # its own pass over the layers (the weights are on disk)
        return store.get_or_compute(("scores",) + score_key(ws, config),
                                    lambda: score_streamed(skeleton(ws), config, ws.unlabeled, progress), progress)
    return store.get_or_compute(("scores",) + score_key(ws, config),
                                lambda: score_with(spec, SharedSources(ws, config, store, progress)), progress)
