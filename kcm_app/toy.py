"""The 2-D teaching view: a point cloud, its true convex hull, and what R2 picks at a given sigma.

With a small sigma every point is its own island and R2 barely distinguishes them; as sigma grows the
kernel hull approaches the ordinary convex hull and the top R2 scores land on its vertices.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kcm_core.hull import HullConfig, kernel_hull

TOY_CSV = Path(__file__).resolve().parents[1] / "assets" / "toy_points.csv"


def toy_points(path: Path = TOY_CSV) -> np.ndarray:
    """The shipped 2-D cloud (columns x, y) as an (N, 2) array."""
    frame = pd.read_csv(path)
    return frame[["x", "y"]].to_numpy(dtype=np.float64)


def hull_vertices(points: np.ndarray) -> list[int]:
    """Indices of the ordinary convex hull's vertices, counter-clockwise (Andrew's monotone chain)."""
    order = sorted(range(len(points)), key=lambda i: (points[i, 0], points[i, 1]))
    if len(order) < 3:
        return order

    def cross(o: int, a: int, b: int) -> float:
        return float((points[a, 0] - points[o, 0]) * (points[b, 1] - points[o, 1])
                     - (points[a, 1] - points[o, 1]) * (points[b, 0] - points[o, 0]))

    lower: list[int] = []
    for i in order:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], i) <= 0:
            lower.pop()
        lower.append(i)
    upper: list[int] = []
    for i in reversed(order):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], i) <= 0:
            upper.pop()
        upper.append(i)
    return lower[:-1] + upper[:-1]


def toy_r2(points: np.ndarray, sigma: float, alpha: float = 0.01, picks: int | None = None) -> pd.DataFrame:
    """R2 of every point with a fixed sigma (points are in the plane's own units), the top ``picks``
    marked (default: as many as the hull has vertices), and whether each point is a hull vertex."""
    fit = kernel_hull(torch.tensor(points, dtype=torch.float64),
                      HullConfig(sigma=sigma, sigma_mode="fixed", alpha=alpha))
    vertices = set(hull_vertices(points))
    picks = len(vertices) if picks is None else picks
    scores = fit.scores.double().numpy()
    order = np.argsort(-scores, kind="stable")
    picked = np.zeros(len(points), dtype=bool)
    picked[order[:picks]] = True
    return pd.DataFrame({"x": points[:, 0], "y": points[:, 1], "r2": scores, "picked": picked,
                         "vertex": [i in vertices for i in range(len(points))]}).assign(
        iterations=fit.iterations)


def hit_rate(frame: pd.DataFrame) -> float:
    """Fraction of the hull's vertices among R2's picks."""
    vertices = int(frame["vertex"].sum())
    return float((frame["picked"] & frame["vertex"]).sum() / vertices) if vertices else 0.0
