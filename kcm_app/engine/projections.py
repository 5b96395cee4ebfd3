"""2-D pictures of one layer's down-projection rows, stored once for all sessions: PCA at once, UMAP
(seconds, and a numba compile on the process's first call) also kept on disk (``kcm_app.disk_cache``)."""
from __future__ import annotations

import numpy as np

from .. import disk_cache, projection
from ..store import SharedStore
from .workspace import Workspace, skeleton


def umap_key(ws: Workspace, layer: int, seed: int) -> tuple:
    return ("umap", ws.model_key, layer, seed)


def layer_points(ws: Workspace, layer: int) -> np.ndarray:
    """``layer``'s down-projection rows (N, d), float32: from the shared model, or, for a model opened
    layer by layer, read alone from its files."""
    if ws.streamed:
        from kcm_core.streamed.passes import layer_rows_streamed
        return layer_rows_streamed(skeleton(ws), layer).numpy()
    return projection.layer_points(ws.model, layer)


def _layerwise_trimmed(coords: np.ndarray, ws: Workspace) -> np.ndarray:
    """``coords``, with the heap trimmed first for a model opened layer by layer (the projection's
    float64 temporaries would otherwise stay resident: ``kcm_core.streamed.skeleton.trim_heap``)."""
    if ws.streamed:
        from kcm_core.streamed.skeleton import trim_heap
        trim_heap()
    return coords


def layer_pca(ws: Workspace, layer: int, store: SharedStore) -> np.ndarray:
    return store.get_or_compute(("pca", ws.model_key, layer),
                                lambda: _layerwise_trimmed(projection.pca_2d(layer_points(ws, layer)), ws))


def layer_umap(ws: Workspace, layer: int, seed: int, store: SharedStore) -> np.ndarray:
    """UMAP of ``layer`` with ``seed``: from memory, else from disk, else computed (and kept in both)."""
    def compute() -> np.ndarray:
        return disk_cache.cached(
            "umap", (ws.weights_hash, layer, seed),
            lambda: _layerwise_trimmed(projection.umap_2d(layer_points(ws, layer), seed=seed), ws),
            disk_cache.encode_coords, disk_cache.decode_coords)
    return store.get_or_compute(umap_key(ws, layer, seed), compute)
