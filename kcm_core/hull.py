"""R2: the kernelized convex-hull ranking (Huang et al., IJCNN 2018, as used by Nova et al., 2023).

Works on any point set. Every point is approximated as a non-negative combination of all points in
the feature space of a Gaussian kernel; the self-representation ``C`` starts at ``1/N`` everywhere and
is updated multiplicatively, ``C <- C * sqrt(K / (K @ C))``. A point that the others cannot represent
(a vertex of the kernelized hull) keeps a large self-weight ``C_ii``: that diagonal is the R2 score.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

SigmaMode = Literal["fixed", "median"]
StopRule = Literal["absolute", "signed"]


@dataclass(frozen=True)
class HullConfig:
    """Options of the kernel-hull fit; every open choice of METHOD.md is here.

    sigma_mode: "fixed" uses ``sigma`` as is (the paper: sigma = 1). "median" uses ``sigma`` times the
        median pairwise distance of the points, so the kernel means the same on any weight scale.
    stop_rule: "absolute" stops when ``sum |C_new - C| / sum C <= alpha``; "signed" uses the paper's
        printed ``sum (C_new - C) / sum C``, which on real weights stops after one iteration.
    """

    sigma: float = 1.0
    sigma_mode: SigmaMode = "median"
    alpha: float = 0.01
    stop_rule: StopRule = "absolute"
    max_iter: int = 200

    def __post_init__(self):
        if not (self.sigma > 0):
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if self.sigma_mode not in ("fixed", "median"):
            raise ValueError(f"sigma_mode must be 'fixed' or 'median', got {self.sigma_mode!r}")
        if not (self.alpha > 0):
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.stop_rule not in ("absolute", "signed"):
            raise ValueError(f"stop_rule must be 'absolute' or 'signed', got {self.stop_rule!r}")
        if not (isinstance(self.max_iter, int) and self.max_iter >= 1):
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}")


@dataclass(frozen=True)
class HullFit:
    scores: torch.Tensor      # (N,) diag(C), float32 on the CPU
    iterations: int
    converged: bool
    sigma: float              # the bandwidth actually used
    last_delta: float


def _pairwise_sq_dists(points: torch.Tensor) -> torch.Tensor:
    sq = (points * points).sum(1)                              # (N,)
    d2 = sq[:, None] + sq[None, :] - 2.0 * points @ points.t()  # (N, N)
    return d2.clamp_min_(0.0)


def _median_distance(d2: torch.Tensor) -> float:
    n = d2.shape[0]
    if n < 2:
        return 1.0
    iu = torch.triu_indices(n, n, offset=1, device=d2.device)
    vals = d2[iu[0], iu[1]]
    if vals.numel() > 1_000_000:   # the median of a fixed subsample is plenty and stays deterministic
        vals = vals[:: vals.numel() // 1_000_000 + 1]
    med = float(vals.median().sqrt())
    return med if med > 0 else 1.0


def kernel_hull(points: torch.Tensor, config: HullConfig = HullConfig()) -> HullFit:
    """Fit the kernelized convex-hull self-representation of ``points`` (N, d); see the module doc."""
    if points.dim() != 2:
        raise ValueError(f"points must be a 2-D (N, d) tensor, got shape {tuple(points.shape)}")
    if not torch.isfinite(points).all():
        raise ValueError("points contain NaN or infinite values; check the model's weights")
    n = points.shape[0]
    if n == 0:
        return HullFit(torch.zeros(0), 0, True, config.sigma, 0.0)
    # Distances in float64 (exact enough for the median and the kernel); the N^3 iteration in float32,
    # which halves its cost and stays well inside alpha's tolerance.
    dtype = torch.float32
    d2 = _pairwise_sq_dists(points.detach().to(torch.float64))
    sigma = config.sigma * (_median_distance(d2) if config.sigma_mode == "median" else 1.0)
    kernel = torch.exp(-d2 / (2.0 * sigma * sigma)).to(dtype)  # (N, N), symmetric, diag 1
    del d2
    coef = torch.full((n, n), 1.0 / n, dtype=dtype, device=kernel.device)
    tiny = torch.finfo(dtype).tiny
    delta, converged, it = float("inf"), False, 0
    for it in range(1, config.max_iter + 1):
        new = coef * torch.sqrt(kernel / (kernel @ coef).clamp_min(tiny))
        change = new - coef
        change = change.abs().sum() if config.stop_rule == "absolute" else change.sum()
        delta = float(change / coef.sum())
        coef = new
        if abs(delta) <= config.alpha if config.stop_rule == "signed" else delta <= config.alpha:
            converged = True
            break
    scores = torch.diagonal(coef).to(torch.float32).cpu().clone()
    return HullFit(scores, it, converged, float(sigma), delta)


def r2_scores(points: torch.Tensor, sigma: float = 1.0, alpha: float = 0.01, *,
              sigma_mode: SigmaMode = "median", stop_rule: StopRule = "absolute",
              max_iter: int = 200) -> torch.Tensor:
    """R2 score of every point of an (N, d) tensor: larger means nearer the kernelized hull."""
    config = HullConfig(sigma=sigma, sigma_mode=sigma_mode, alpha=alpha, stop_rule=stop_rule,
                        max_iter=max_iter)
    return kernel_hull(points, config).scores
