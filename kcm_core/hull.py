"""R2: the kernelized convex-hull ranking (Huang et al., IJCNN 2018, as used by Nova et al., 2023).

Works on any point set. Every point is approximated as a non-negative combination of all points in
the feature space of a Gaussian kernel; the self-representation ``C`` starts at ``1/N`` everywhere and
is updated multiplicatively, ``C <- C * sqrt(K / (K @ C))``. A point that the others cannot represent
(a vertex of the kernelized hull) keeps a large self-weight ``C_ii``: that diagonal is the R2 score.

The iteration's limit is the identity (``K`` is positive definite, so ``C = I`` is the unique exact
self-representation): R2 is the ranking of the diagonal at the stopping point, and the stopping rule
is part of the score's definition. Each column of ``C`` is updated on its own (column j only needs
column j and ``K``), so the update runs a block of columns at a time, in place, in float32 on
``kcm_core.runtime.default_device()``: memory is the kernel, ``C`` and a few blocks
(``hull_memory_bytes``). The closed form of one step from the uniform start,
``C_ii = 1 / sqrt(N * rowsum_i(K))``, needs no N x N matrix at all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .kernel import MEDIAN_PAIRS, distance_dtype, gaussian_kernel, kernel_row_sums, median_distance
from .runtime import default_device

SigmaMode = Literal["fixed", "median"]
StopRule = Literal["auto", "absolute", "signed", "spearman", "topk", "closed_form"]
STOP_RULES = ("auto", "absolute", "signed", "spearman", "topk", "closed_form")
RANK_RULES = ("spearman", "topk")
# "auto" (the default): the exact iteration ("absolute") up to this many neurons per layer, the closed
# form above. Decided by measurement (benchmarks/README.md, "R2 at scale"): where the exact iteration is affordable
# (N^3 per iteration: about 5 minutes for BERT-base's 12 x 3072 on two cores) no cheaper rule was
# better on the four models measured and the closed form lost 1.0 point [-2.0, -0.1] on the demo;
# above it the exact iteration takes about 40 minutes (Qwen2-0.5B, 24 x 4864) to 11 hours (LLaMA-7B,
# 32 x 11008), while the closed form meets the time goals and, on the LM demo, agrees with the exact
# ranking at Spearman >= 0.98 and prunes to a lower perplexity.
AUTO_EXACT_MAX_WIDTH = 3072


def resolved_rule(config: "HullConfig", n: int) -> str:
    """The stop rule a fit of ``n`` points uses: ``config.stop_rule``, with "auto" resolved by width."""
    if config.stop_rule != "auto":
        return config.stop_rule
    return "absolute" if n <= AUTO_EXACT_MAX_WIDTH else "closed_form"
SLAB_BYTES = 128 * 2 ** 20    # one float32 work slab (a block of columns of C) at most this big


CLOSED_FORM_BLOCK = 512       # rows per block of the closed form's symmetric row sums


def block_rows(n: int) -> int:
    """Columns of C updated at once: all of them up to N = 5792, so the product is one matrix
    multiply (smaller blocks multiply measurably slower on two cores), else a 128 MiB slab's worth."""
    return max(1, min(n, SLAB_BYTES // (4 * max(n, 1))))


@dataclass(frozen=True)
class HullConfig:
    """Options of the kernel-hull fit; every open choice of docs/method.md is here.

    sigma_mode: "fixed" uses ``sigma`` as is (the paper: sigma = 1). "median" uses ``sigma`` times the
        median pairwise distance of the points, so the kernel means the same on any weight scale.
    stop_rule: "auto" (the default) is "absolute" for a layer of at most ``AUTO_EXACT_MAX_WIDTH`` neurons
        and "closed_form" for a wider one (see ``AUTO_EXACT_MAX_WIDTH`` for the measurements).
        "absolute" stops when ``sum |C_new - C| / sum C <= alpha``; "signed" uses the paper's
        printed ``sum (C_new - C) / sum C``, which on real weights stops after one iteration.
        Rules on the ranking itself: "spearman" stops when ``1 - rho <= rank_tol``, rho the Spearman
        correlation of the diagonal's ranks at two successive iterations; "topk" stops when at most a
        ``rank_tol`` share of the top ``top_share`` of the diagonal changed between two iterations.
        "closed_form" is exactly one step from the uniform start, ``C_ii = 1 / sqrt(N rowsum_i(K))``
        (an inverse kernel density), computed in O(N^2 d) without the N x N iteration.
    rank_tol, top_share: the ranking rules' tolerance and top-set size (ignored by the other rules).
    """

    sigma: float = 1.0
    sigma_mode: SigmaMode = "median"
    alpha: float = 0.01
    stop_rule: StopRule = "auto"
    max_iter: int = 200
    rank_tol: float = 1e-4
    top_share: float = 0.4

    def __post_init__(self):
        if not (self.sigma > 0):
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if self.sigma_mode not in ("fixed", "median"):
            raise ValueError(f"sigma_mode must be 'fixed' or 'median', got {self.sigma_mode!r}")
        if not (self.alpha > 0):
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.stop_rule not in STOP_RULES:
            raise ValueError(f"stop_rule must be one of {', '.join(STOP_RULES)}, got {self.stop_rule!r}")
        if not (isinstance(self.max_iter, int) and self.max_iter >= 1):
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}")
        if not (0 <= self.rank_tol < 1):
            raise ValueError(f"rank_tol must be in [0, 1), got {self.rank_tol}")
        if not (0 < self.top_share <= 1):
            raise ValueError(f"top_share must be in (0, 1], got {self.top_share}")


@dataclass(frozen=True)
class HullFit:
    scores: torch.Tensor      # (N,) diag(C), float32 on the CPU
    iterations: int
    converged: bool
    sigma: float              # the bandwidth actually used
    last_delta: float         # the stop rule's last change (the rank change for ranking rules; NaN
                              # for the closed form, which has no second iterate to compare)
    stop_rule: str = ""       # the rule used ("auto" resolved); "" in fits stored before it was recorded


def hull_memory_bytes(n: int, d: int, block: int | None = None, closed_form: bool = False) -> int:
    """Working memory of one fit, by construction: the float32 kernel and ``C`` (neither for the closed
    form), the float64 points, and per block one float64 distance slab or (iterating) two float32 work
    slabs, plus two more slabs' room for the matrix product's workspace. The median's pair sample
    (``MEDIAN_PAIRS`` float64 values and three int64 indices) is included. For N = 11008 and d = 4096
    this is about 1.9 GB iterating and 0.9 GB in closed form with the default block
    (``benchmarks/bench_r2_scale.py`` measures it)."""
    b = min(block or block_rows(n), max(n, 1))
    fixed = 0 if closed_form else 2 * 4 * n * n
    slabs = 2 * 8 * b * n if closed_form else max(2 * 8 * b * n, 4 * 4 * b * n)
    return fixed + 8 * n * d + slabs + 32 * min(n * n // 2, MEDIAN_PAIRS)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ordinal ranks 0..N-1 (ties broken by position), float64."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty(x.numel(), dtype=torch.float64, device=x.device)
    ranks[order] = torch.arange(x.numel(), dtype=torch.float64, device=x.device)
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two score vectors (1.0 for fewer than two points)."""
    if a.numel() < 2:
        return 1.0
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def top_overlap(a: torch.Tensor, b: torch.Tensor, share: float) -> float:
    """Share of the top ``ceil(share * N)`` of ``a`` that is also in the top of ``b``."""
    k = max(1, math.ceil(share * a.numel()))
    top_a = torch.zeros(a.numel(), dtype=torch.bool, device=a.device)
    top_a[torch.topk(a, k).indices] = True
    return float(top_a[torch.topk(b, k).indices].sum()) / k


def _rank_change(config: HullConfig, before: torch.Tensor, after: torch.Tensor) -> float:
    if config.stop_rule == "spearman":
        return 1.0 - spearman(before, after)
    return 1.0 - top_overlap(before, after, config.top_share)


def _step(kernel: torch.Tensor, coef_t: torch.Tensor, block: int) -> tuple[float, float, float]:
    """One multiplicative update of ``C``, stored transposed (row j of ``coef_t`` is column j of C),
    a block of columns at a time and in place: column j's update reads only column j and K.
    Returns (sum |C_new - C|, sum (C_new - C), sum C) of the old C."""
    tiny = torch.finfo(coef_t.dtype).tiny
    abs_change = signed_change = total = 0.0
    for start in range(0, coef_t.shape[0], block):
        rows = slice(start, start + block)
        old = coef_t[rows]                                           # (b, N) view
        # (K @ C)^T = C^T @ K (K symmetric) and K[:, cols]^T = K[cols]; two work slabs, in place
        new = (old @ kernel).clamp_min_(tiny)
        torch.div(kernel[rows], new, out=new).sqrt_().mul_(old)
        change = torch.sub(new, old)
        signed_change += float(change.sum())
        abs_change += float(change.abs_().sum())
        total += float(old.sum())
        old.copy_(new)
    return abs_change, signed_change, total


def kernel_hull(points: torch.Tensor, config: HullConfig = HullConfig(), *,
                device: torch.device | str | None = None, block: int | None = None) -> HullFit:
    """Fit the kernelized convex-hull self-representation of ``points`` (N, d); see the module doc.
    ``device``: where to compute (default ``kcm_core.runtime.default_device()``); ``block``: columns
    updated at once (default ``block_rows(N)``), which sets the memory above the kernel and ``C``
    (``hull_memory_bytes``)."""
    if points.dim() != 2:
        raise ValueError(f"points must be a 2-D (N, d) tensor, got shape {tuple(points.shape)}")
    if not torch.isfinite(points).all():
        raise ValueError("points contain NaN or infinite values; check the model's weights")
    if block is not None and not (isinstance(block, int) and block >= 1):
        raise ValueError(f"block must be a positive integer, got {block!r}")
    n = points.shape[0]
    block = block or block_rows(n)
    rule = resolved_rule(config, n)
    if n == 0:
        return HullFit(torch.zeros(0), 0, True, config.sigma, 0.0, rule)
    device = torch.device(device) if device is not None else default_device()
    # Distances in float64 (exact enough for the median and the kernel); the N^3 iteration in float32,
    # which halves its cost and stays well inside alpha's tolerance.
    points = points.detach().to(device=device, dtype=distance_dtype(device))
    sigma = config.sigma * (median_distance(points, block) if config.sigma_mode == "median" else 1.0)
    if rule == "closed_form":
        diag = 1.0 / torch.sqrt(n * kernel_row_sums(points, sigma, min(block, CLOSED_FORM_BLOCK)))
        return HullFit(diag.to(torch.float32).cpu(), 1, True, float(sigma), float("nan"), rule)
    kernel = gaussian_kernel(points, sigma, block)                     # (N, N), symmetric, diag 1
    del points
    coef_t = torch.full((n, n), 1.0 / n, dtype=torch.float32, device=device)   # C^T
    rank_rule = rule in RANK_RULES
    diag = torch.diagonal(coef_t).clone() if rank_rule else None
    delta, converged, it = float("inf"), False, 0
    for it in range(1, config.max_iter + 1):
        abs_change, signed_change, total = _step(kernel, coef_t, block)
        if rank_rule:
            new_diag = torch.diagonal(coef_t).clone()
            delta, diag = _rank_change(config, diag, new_diag), new_diag
            done = it > 1 and delta <= config.rank_tol     # iteration 1 leaves the uniform start
        elif rule == "signed":
            delta = signed_change / total
            done = abs(delta) <= config.alpha
        else:
            delta = abs_change / total
            done = delta <= config.alpha
        if done:
            converged = True
            break
    scores = torch.diagonal(coef_t).to(torch.float32).cpu().clone()
    return HullFit(scores, it, converged, float(sigma), delta, rule)


def r2_scores(points: torch.Tensor, sigma: float = 1.0, alpha: float = 0.01, *,
              sigma_mode: SigmaMode = "median", stop_rule: StopRule = "auto",
              max_iter: int = 200) -> torch.Tensor:
    """R2 score of every point of an (N, d) tensor: larger means nearer the kernelized hull."""
    config = HullConfig(sigma=sigma, sigma_mode=sigma_mode, alpha=alpha, stop_rule=stop_rule,
                        max_iter=max_iter)
    return kernel_hull(points, config).scores
