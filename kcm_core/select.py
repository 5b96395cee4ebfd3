"""Selection: scores plus a global FLOPs budget become a ``KeepPlan``. Selectors never score."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .arch import ModelShape
from .curves import curve_counts, halfway
from .curves import layer_order as _layer_order   # best to worst, ties to the lower index
from .flops import keep_count
from .plan import KeepPlan, LayerKeep, PlanInfo


def _check_scores(scores: Sequence[torch.Tensor], widths: Sequence[int]) -> None:
    if len(scores) != len(widths):
        raise ValueError(f"{len(scores)} score vectors for {len(widths)} layers")
    for i, (s, w) in enumerate(zip(scores, widths)):
        if s.numel() != w:
            raise ValueError(f"layer {i}: {s.numel()} scores for {w} neurons")
        if not torch.isfinite(s).all():
            raise ValueError(f"layer {i}: scores contain NaN or infinite values")


# pooled: the raw scores ranked over all layers (the paper); standardised: per-layer z-scores ranked
# together (FLAP); curve: from each layer's refit-error curve, averaged with standardised (kcm_core.curves)
ALLOCATIONS = ("pooled", "standardised", "curve")


def standardised(scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each layer's scores as z-scores (mean 0, standard deviation 1 within the layer; a constant layer
    becomes zeros), so a layer's share of a pooled ranking no longer depends on the scale its scores
    happen to have (FLAP standardises the same way before its global ranking)."""
    out = []
    for s in scores:
        s = s.double()
        std = s.std(unbiased=False) if s.numel() else torch.tensor(0.0)
        out.append(torch.zeros_like(s) if not std > 0 else (s - s.mean()) / std)
    return out


def select_top_k(scores: Sequence[torch.Tensor], k: int, *, min_per_layer: int = 0,
                 method: str = "", info: PlanInfo | None = None) -> KeepPlan:
    """Keep the ``k`` best neurons pooled over all layers; no per-layer quota beyond ``min_per_layer``."""
    widths = [int(s.numel()) for s in scores]
    reserved = [min(min_per_layer, w) for w in widths]
    if k < sum(reserved):
        raise ValueError(
            f"min_per_layer={min_per_layer} needs {sum(reserved)} neurons but the budget keeps only {k}"
        )
    masks = [torch.zeros(w, dtype=torch.bool) for w in widths]
    for m, s, r in zip(masks, scores, reserved):
        m[_layer_order(s)[:r]] = True
    pooled = torch.cat([s.double() for s in scores]) if scores else torch.zeros(0)
    taken = torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)
    # Stable sort over the layer-major pool: ties go to the lower layer, then the lower neuron index.
    order = torch.sort(-pooled, stable=True).indices
    order = order[~taken[order]][: max(0, k - sum(reserved))]
    taken[order] = True
    return KeepPlan.from_masks(list(torch.split(taken, widths)), method=method, info=info)


def check_multiple(multiple: int, widths: Sequence[int]) -> None:
    """Refuse a rounding multiple that is not a positive integer or exceeds the widest layer (every
    layer would be kept whole or emptied); callers run it before scoring, ``select`` again."""
    if not (isinstance(multiple, int) and not isinstance(multiple, bool) and multiple >= 1):
        raise ValueError(f"multiple must be a positive integer, got {multiple!r}")
    if widths and multiple > max(widths):
        widest = max(widths)
        raise ValueError(f"multiple {multiple} is larger than the widest FFN layer ({widest} neurons), so "
                         f"every layer would be kept whole or emptied; choose a multiple of at most {widest}")


def select(scores: Sequence[torch.Tensor], shape: ModelShape, budget: float, seq_len: float, *,
           multiple: int = 1, min_per_layer: int = 0, uniform: bool = False,
           method: str = "", allocation: str = "pooled",
           curves: Sequence[torch.Tensor] | None = None) -> KeepPlan:
    """Turn per-layer scores into a plan that fits ``budget`` relative FLOPs at ``seq_len``.

    multiple: round each layer's kept width to a multiple of this (8, 16, 64 help real speed);
        widths are rounded down where needed so the budget still holds.
    min_per_layer: each layer keeps at least this many (its best) neurons.
    uniform: every layer keeps the same width (needed for a stock ``from_pretrained`` export).
    allocation: how the pooled ranking compares layers: "pooled" ranks the raw scores (the paper),
        "standardised" ranks per-layer z-scores (see ``standardised``), "curve" averages the standardised
        counts with those that minimise the layers' refit-error ``curves`` (``kcm_core.curves``; the
        neurons within a layer still go by their z-scores).
    curves: per layer, the refit error for every kept count (``MethodScores.curves``); needed by "curve".
    """
    check_multiple(multiple, shape.ffn_width)
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    if not (isinstance(min_per_layer, int) and min_per_layer >= 0):
        raise ValueError(f"min_per_layer must be a non-negative integer, got {min_per_layer!r}")
    widths = list(shape.ffn_width)
    _check_scores(scores, widths)
    k = keep_count(shape, seq_len, budget)
    info = PlanInfo(budget=budget, seq_len=seq_len, k=k, multiple=multiple,
                    min_per_layer=min_per_layer, uniform=uniform, allocation=allocation)
    if allocation in ("standardised", "curve"):
        scores = standardised(scores)
    if allocation == "curve" and not uniform:
        if curves is None or len(curves) != len(widths) or any(c.numel() != w + 1 for c, w in zip(curves, widths)):
            raise ValueError("the curve allocation needs each layer's refit-error curve (MethodScores.curves): "
                             "score with allocation='curve' (compute_scores computes them)")
        floors = [min(min_per_layer, w) for w in widths]
        if k < sum(floors):
            raise ValueError(f"min_per_layer={min_per_layer} needs {sum(floors)} neurons but the budget keeps only {k}")
        pooled = select_top_k(scores, k, min_per_layer=min_per_layer).kept_counts
        counts = halfway(pooled, curve_counts(curves, k, floors))
        if multiple > 1:
            counts = _round_counts(counts, scores, widths, k, multiple, min_per_layer)
    elif uniform:
        width = min(k // len(widths), min(widths))
        width = max(width - width % multiple, 0)
        if width < min_per_layer:
            raise ValueError(
                f"a uniform plan at budget {budget} keeps {width} neurons per layer, "
                f"below min_per_layer={min_per_layer}"
            )
        counts = [width] * len(widths)
    else:
        plan = select_top_k(scores, k, min_per_layer=min_per_layer, method=method, info=info)
        if multiple == 1:
            return plan
        counts = _round_counts(plan.kept_counts, scores, widths, k, multiple, min_per_layer)
    if multiple > 1 and k > 0 and not any(counts):
        # the budget keeps k neurons but no layer fits one whole group: an empty model, not a plan
        raise ValueError(f"multiple {multiple} empties every layer at budget {budget}: the budget keeps {k} "
                         f"neurons ({k // len(widths)} per layer), fewer than one group of {multiple} in any "
                         "layer; choose a smaller multiple or a larger budget")
    layers = []
    for s, w, c in zip(scores, widths, counts):
        keep = sorted(int(i) for i in _layer_order(s)[:c])
        layers.append(LayerKeep(tuple(keep), w))
    return KeepPlan(tuple(layers), method=method, info=info)


def _round_counts(counts: list[int], scores, widths, k: int, multiple: int,
                  min_per_layer: int) -> list[int]:
    """Round per-layer counts to ``multiple``, then trade whole groups so the total stays <= k.

    A layer may always keep all of its neurons even when its width is not a multiple.
    """
    sorted_scores = [s.double()[_layer_order(s)] for s in scores]
    floor_of = [min(w, math.ceil(min_per_layer / multiple) * multiple) for w in widths]

    def snap(c: int, w: int) -> int:
        return w if c >= w else min(w, multiple * round(c / multiple))

    counts = [max(snap(c, w), f) for c, w, f in zip(counts, widths, floor_of)]

    def group_value(i: int, lo: int, hi: int) -> float:
        return float(sorted_scores[i][lo:hi].sum())

    while sum(counts) > k:   # drop the cheapest group
        candidates = [(group_value(i, c - _step_down(c, multiple), c), i)
                      for i, c in enumerate(counts) if c - _step_down(c, multiple) >= floor_of[i] and c > 0]
        if not candidates:
            raise ValueError(f"cannot round widths to multiples of {multiple} within the budget")
        _, i = min(candidates)
        counts[i] -= _step_down(counts[i], multiple)
    while True:              # add the most valuable group that still fits
        candidates = [(group_value(i, c, min(c + multiple, widths[i])), i)
                      for i, c in enumerate(counts)
                      if c < widths[i] and sum(counts) + min(multiple, widths[i] - c) <= k]
        if not candidates:
            return counts
        _, i = max(candidates)
        counts[i] = min(counts[i] + multiple, widths[i])


def _step_down(count: int, multiple: int) -> int:
    """How many neurons one rounding step removes from ``count`` (back onto the multiple grid)."""
    rem = count % multiple
    return rem if rem else multiple


def refine_with_gradients(plan: KeepPlan, base_scores: Sequence[torch.Tensor],
                          grad_scores: Sequence[torch.Tensor], *, within_layer: bool = False) -> KeepPlan:
    """Limited-label refinement of METHOD.md: swap the lowest-``base_scores`` kept neuron for the
    highest-``grad_scores`` dropped one while that raises the kept set's total gradient score.

    Every neuron costs the same FLOPs, so the budget holds. ``within_layer`` restricts swaps to one
    layer at a time, keeping each layer's width (needed for uniform or rounded plans).
    """
    widths = plan.widths
    _check_scores(base_scores, widths)
    _check_scores(grad_scores, widths)
    groups = [[i] for i in range(len(widths))] if within_layer else [list(range(len(widths)))]
    masks = [layer.keep_mask() for layer in plan.layers]
    swaps = 0
    for group in groups:
        kept, dropped = [], []
        for li in group:
            for n in range(widths[li]):
                entry = (float(base_scores[li][n]), float(grad_scores[li][n]), li, n)
                (kept if masks[li][n] else dropped).append(entry)
        kept.sort(key=lambda e: (e[0], e[2], e[3]))          # lowest R2D2 first
        dropped.sort(key=lambda e: (-e[1], e[2], e[3]))      # highest gradient first
        for out_entry, in_entry in zip(kept, dropped):
            if in_entry[1] <= out_entry[1]:
                break
            masks[out_entry[2]][out_entry[3]] = False
            masks[in_entry[2]][in_entry[3]] = True
            swaps += 1
    return KeepPlan.from_masks(masks, method=plan.method, info=plan.info.updated(label_swaps=swaps))
