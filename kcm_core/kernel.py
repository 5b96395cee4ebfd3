"""The Gaussian kernel of a point set, built in blocks of rows so that no N x N float64 matrix exists.

R2 needs ``K_ij = exp(-||w_i - w_j||^2 / (2 sigma^2))`` for N up to 11008 (LLaMA-7B's MLP). A float64
distance matrix of that size alone is 970 MB; here distances are float64 only one block of rows at a
time (exact enough for the median and the exponent), and the kernel is stored in float32 or not at all
(``kernel_row_sums``, for the closed form).
"""
from __future__ import annotations

from typing import Iterator

import torch

MEDIAN_PAIRS = 1_000_000     # the median of a fixed subsample of this many pairs is plenty


def distance_dtype(device: torch.device) -> torch.dtype:
    """float64 for distances, except on Apple's MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _sq_norms(points: torch.Tensor) -> torch.Tensor:
    return (points * points).sum(1)                            # (N,)


def sq_dist_blocks(points: torch.Tensor, block: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(rows, d2)`` for consecutive blocks of rows: ``d2`` is (len(rows), N), the squared distances of
    those points to every point, clamped at 0 (the expansion can round below it)."""
    sq = _sq_norms(points)
    n = points.shape[0]
    for start in range(0, n, block):
        rows = slice(start, min(start + block, n))
        d2 = points[rows] @ points.t()                                   # (b, N), one slab
        d2.mul_(-2.0).add_(sq[rows, None]).add_(sq[None, :])
        yield rows, d2.clamp_min_(0.0)


def median_distance(points: torch.Tensor, block: int = 1024) -> float:
    """Median pairwise distance over the pairs i < j (row-major order), or over every
    ``len // MEDIAN_PAIRS + 1``-th of them when there are more than ``MEDIAN_PAIRS``: a fixed,
    deterministic subsample. Distances come from matrix products over blocks of rows (the upper
    triangle only), which is far faster than gathering the sampled pairs' rows one by one."""
    n = points.shape[0]
    pairs = n * (n - 1) // 2
    if pairs < 1:
        return 1.0
    step = pairs // MEDIAN_PAIRS + 1 if pairs > MEDIAN_PAIRS else 1
    flat = torch.arange(0, pairs, step, dtype=torch.int64, device=points.device)  # (P,)
    # Row i of the upper triangle starts at flat index i * n - i * (i + 1) / 2.
    starts = torch.arange(n, dtype=torch.int64, device=points.device)
    starts = starts * n - starts * (starts + 1) // 2                                # (N,)
    i = torch.searchsorted(starts, flat, right=True) - 1                           # sorted
    j = flat - starts[i] + i + 1
    edges = torch.searchsorted(i, torch.arange(0, n + block, block, device=points.device)).tolist()
    sq = _sq_norms(points)
    d2 = torch.empty(flat.numel(), dtype=points.dtype, device=points.device)
    for r0, lo, hi in zip(range(0, n, block), edges, edges[1:]):
        if lo == hi:
            continue
        rows = slice(r0, min(r0 + block, n))
        slab = points[rows] @ points[r0:].t()                      # (b, N - r0): upper part only
        slab.mul_(-2.0).add_(sq[rows, None]).add_(sq[None, r0:])
        d2[lo:hi] = slab[i[lo:hi] - r0, j[lo:hi] - r0]
    med = float(d2.clamp_min_(0.0).median().sqrt())
    return med if med > 0 else 1.0


def gaussian_kernel(points: torch.Tensor, sigma: float, block: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (N, N) kernel in ``dtype``, filled a block of rows at a time."""
    n = points.shape[0]
    kernel = torch.empty(n, n, dtype=dtype, device=points.device)
    scale = -1.0 / (2.0 * sigma * sigma)
    for rows, d2 in sq_dist_blocks(points, block):
        kernel[rows] = d2.mul_(scale).exp_()
    return kernel


def kernel_row_sums(points: torch.Tensor, sigma: float, block: int) -> torch.Tensor:
    """``K.sum(1)`` (N,) in the distance dtype, without ever holding K. K is symmetric, so each
    block of rows is computed against the columns from its first row on (the upper part) and adds
    its off-diagonal columns to the later rows' sums: about half the products of a full pass."""
    n = points.shape[0]
    scale = -1.0 / (2.0 * sigma * sigma)
    sq = _sq_norms(points)
    sums = torch.zeros(n, dtype=points.dtype, device=points.device)
    for r0 in range(0, n, block):
        r1 = min(r0 + block, n)
        slab = points[r0:r1] @ points[r0:].t()                       # (b, N - r0)
        slab.mul_(-2.0).add_(sq[r0:r1, None]).add_(sq[None, r0:]).clamp_min_(0.0)
        slab.mul_(scale).exp_()
        sums[r0:r1] += slab.sum(1)
        sums[r1:] += slab[:, r1 - r0:].sum(0)
    return sums
