"""2-D projections of one layer's down-projection rows (one point per neuron): PCA and UMAP."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kcm_core.arch import ffn_blocks


def layer_points(model: nn.Module, layer: int) -> np.ndarray:
    """The (N, d) rows of ``layer``'s down-projection, as float32 numpy (a copy; weights unchanged)."""
    blocks = ffn_blocks(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer must be in [0, {len(blocks) - 1}], got {layer}")
    with torch.no_grad():
        return blocks[layer].down_rows().detach().float().cpu().numpy().copy()


def pca_2d(points: np.ndarray) -> np.ndarray:
    """Projection onto the two leading principal components (deterministic signs), (N, 2)."""
    centred = points - points.mean(0, keepdims=True)
    if len(points) < 2:
        return np.zeros((len(points), 2))
    # The leading eigenvectors of the (d, d) covariance, not an SVD of the (N, d) rows: the same axes
    # (to 1e-8 on real weights) at a fraction of the cost (15 s -> about 1 s for SmolLM2's 1536 x 576
    # under load; benchmarks/results/app_lm_pages.md).
    cov = centred.T.astype(np.float64) @ centred.astype(np.float64)
    _, vecs = np.linalg.eigh(cov)                   # ascending eigenvalues
    comps = vecs[:, ::-1][:, :2].T.copy()
    comps *= np.sign(comps[:, [int(np.argmax(np.abs(c))) for c in comps]].diagonal())[:, None]
    out = centred @ comps.T
    return out if out.shape[1] == 2 else np.c_[out, np.zeros(len(out))]


def clip_to_quantiles(coords: np.ndarray, q: float = 0.01, margin: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """``coords`` with each axis clipped to its [q, 1 - q] quantile range widened by ``margin`` of that
    range, and the mask of points that were moved: a few outlying neurons (PCA's leading component
    often follows one or two huge rows) no longer squeeze the rest into a dot."""
    if len(coords) == 0:
        return coords, np.zeros(0, dtype=bool)
    low, high = np.quantile(coords, q, axis=0), np.quantile(coords, 1 - q, axis=0)
    pad = margin * np.maximum(high - low, 1e-12)
    clipped = np.clip(coords, low - pad, high + pad)
    return clipped, np.any(clipped != coords, axis=1)


def umap_2d(points: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """UMAP to 2-D with an explicit seed (umap-learn is imported only when called)."""
    try:
        import umap
    except ImportError as err:  # pragma: no cover - umap-learn is in requirements.txt
        raise ValueError("UMAP needs umap-learn: pip install umap-learn") from err
    if len(points) <= n_neighbors + 1:
        return pca_2d(points)
    reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, random_state=seed, n_jobs=1)
    return np.asarray(reducer.fit_transform(points), dtype=np.float64)
