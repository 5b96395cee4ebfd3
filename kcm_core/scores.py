"""Scorers: one number per FFN neuron, larger = more worth keeping. Scorers never choose; see select.py.

Every scorer returns ``LayerScores``: a list with one float32 CPU tensor of shape (N_l,) per layer.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Literal

import torch
from torch import nn

from .activations import NeuronStats
from .arch import ffn_blocks
from .distributed import SINGLE, Group
from .hull import HullConfig, HullFit, kernel_hull
from .runtime import (LABEL_KEYS, Batch, Progress, eval_mode, hooks, model_device, model_inputs,
                      tell)

LayerScores = list[torch.Tensor]
Statistic = Literal["auto", "mean", "mean_abs", "rms"]
Normalisation = Literal["minmax", "zscore", "none"]


@dataclass(frozen=True)
class D2Config:
    """How D2 turns activation statistics into a per-layer score.

    statistic: "auto" (the default: "mean" for ungated FFNs, "mean_abs" for gated MLPs), "mean" (the
        paper: mean post-activation output), "mean_abs", or "rms" (L2 norm per token). A gated MLP's
        neuron input act(gate) * up has no preferred sign, so its signed mean ranks strongly negative
        (busy) neurons last: on the LM demo at 0.9 relative FLOPs, KCM with the signed mean reached
        perplexity 1,179 (unpruned 80.5, 4 held-out blocks of the uncleaned text), with mean_abs 169,
        with rms 182.
    normalise: "minmax" to [0, 1] per layer (keeps the product with R2 non-negative), "zscore", "none".
    """

    statistic: Statistic = "auto"
    normalise: Normalisation = "minmax"

    def __post_init__(self):
        if self.statistic not in ("auto", "mean", "mean_abs", "rms"):
            raise ValueError(f"D2 statistic must be auto, mean, mean_abs or rms, got {self.statistic!r}")
        if self.normalise not in ("minmax", "zscore", "none"):
            raise ValueError(f"D2 normalise must be minmax, zscore or none, got {self.normalise!r}")

    def statistic_for(self, gated: bool) -> str:
        """The statistic actually used: ``auto`` resolves by the MLP's kind."""
        if self.statistic != "auto":
            return self.statistic
        return "mean_abs" if gated else "mean"


def normalise(x: torch.Tensor, how: Normalisation) -> torch.Tensor:
    """Per-layer normalisation; a constant layer maps to all ones under minmax, zeros under zscore."""
    x = x.float()
    if how == "none" or x.numel() == 0:
        return x.clone()
    if how == "minmax":
        lo, hi = x.min(), x.max()
        return torch.ones_like(x) if hi <= lo else (x - lo) / (hi - lo)
    std = x.std(unbiased=False)
    return torch.zeros_like(x) if std == 0 else (x - x.mean()) / std


def r2(model: nn.Module, config: HullConfig = HullConfig(),
       progress: Progress | None = None, group: Group = SINGLE) -> tuple[LayerScores, list[HullFit]]:
    """R2 per layer: the kernel-hull self-weight of each row of the down-projection (weights only).
    Under a distributed ``group`` each rank fits its share of the layers and every rank gets all fits."""
    blocks = ffn_blocks(model)

    def fit(i: int) -> HullFit:
        tell(progress, f"R2: layer {i + 1}/{len(blocks)}", i / len(blocks))
        with torch.no_grad():
            return kernel_hull(blocks[i].down_rows().detach(), config)

    fits = group.map_layers(len(blocks), fit)
    tell(progress, "R2: done", 1.0)
    return [f.scores for f in fits], fits


def d2(stats: NeuronStats, config: D2Config = D2Config(), *, gated: bool = False) -> LayerScores:
    """D2 per layer: the chosen activation statistic, normalised per layer (``gated``: the model has
    gated MLPs, which decides what ``auto`` means)."""
    raw = getattr(stats, config.statistic_for(gated))
    return [normalise(x, config.normalise) for x in raw]


def r2d2(r2_scores: LayerScores, d2_scores: LayerScores) -> LayerScores:
    """KCM's merge: the elementwise product of R2 and normalised D2, per layer."""
    return [a.float() * b.float() for a, b in zip(r2_scores, d2_scores)]


def weight_magnitude(model: nn.Module) -> LayerScores:
    """``||W1[:, i]||_2 * ||W2[i, :]||_2`` (times the gate row's norm for gated MLPs); no data."""
    out = []
    with torch.no_grad():
        for block in ffn_blocks(model):
            score = block.up_cols().float().norm(dim=1) * block.down_rows().float().norm(dim=1)
            if block.gate is not None:
                score = score * block.gate_cols().float().norm(dim=1)
            out.append(score.cpu())
    return out


def output_magnitude(model: nn.Module, stats: NeuronStats) -> LayerScores:
    """Mean magnitude of each neuron's output contribution: ``E|h_i| * ||W2[i, :]||_2``."""
    with torch.no_grad():
        return [m * b.down_rows().float().norm(dim=1).cpu()
                for m, b in zip(stats.mean_abs, ffn_blocks(model))]


def wanda_sp(model: nn.Module, stats: NeuronStats) -> LayerScores:
    """Structured Wanda (as FLAP's authors define the baseline): ``||W2[i, :]||_2 * ||x_i||_2``, the
    down-projection row's norm times the L2 norm of the neuron's input over all calibration tokens."""
    scale = float(stats.tokens) ** 0.5          # rms * sqrt(tokens) = the L2 norm over tokens
    with torch.no_grad():
        return [r * scale * b.down_rows().float().norm(dim=1).cpu()
                for r, b in zip(stats.rms, ffn_blocks(model))]


def flap(model: nn.Module, stats: NeuronStats) -> LayerScores:
    """FLAP's fluctuation metric ``Var(x_i) * ||W2[i, :]||_2^2``, standardised per layer (z-score, as
    FLAP does before its global ranking) so that layers of different scales compete fairly."""
    if not stats.var:
        raise ValueError("these activation statistics carry no variances; collect them again")
    with torch.no_grad():
        raw = [v * b.down_rows().float().norm(dim=1).pow(2).cpu() for v, b in zip(stats.var, ffn_blocks(model))]
    return [normalise(x, "zscore") for x in raw]


def random_scores(widths: Iterable[int], seed: int) -> LayerScores:
    """Uniform random scores from an explicit seed: the floor every method must beat."""
    gen = torch.Generator().manual_seed(int(seed))
    return [torch.rand(int(w), generator=gen) for w in widths]


@contextlib.contextmanager
def _config_restored(model: nn.Module):
    """Hugging Face task heads write ``config.problem_type`` on their first call with labels; put it
    back, since the caller's config (shared with every user of a cached model) must not change."""
    config = getattr(model, "config", None)
    before = getattr(config, "problem_type", None)
    try:
        yield
    finally:
        if hasattr(config, "problem_type"):
            config.problem_type = before


def mask_gradients(model: nn.Module, batches: Iterable[Batch], *, squared: bool = True,
                   progress: Progress | None = None, total: int | None = None,
                   group: Group = SINGLE) -> LayerScores:
    """Gradient of the task loss with respect to a mask of ones on every neuron, summed over batches.

    With ``squared`` (Kwon et al.'s Fisher importance) each batch adds ``grad^2``; without, ``|grad|``.
    Uses ``torch.autograd.grad`` so no ``.grad`` is written into the caller's parameters. Under a
    distributed ``group`` this rank takes its share of the batches and the sums are summed over ranks.
    """
    if group.distributed:
        batches = group.share(batches)
        total = group.share_count(total) if total else total
    blocks = ffn_blocks(model)
    device = model_device(model)
    masks = [torch.ones(b.width, device=device, requires_grad=True) for b in blocks]
    acc = [torch.zeros(b.width, dtype=torch.float64) for b in blocks]

    def make_hook(i: int):
        def hook(_module, args):
            return (args[0] * masks[i].to(args[0].dtype),) + tuple(args[1:])
        return hook

    handles = [b.down.register_forward_pre_hook(make_hook(i)) for i, b in enumerate(blocks)]
    seen = 0
    with hooks(handles), eval_mode(model), _config_restored(model), torch.enable_grad():
        for step, batch in enumerate(batches):
            labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
            if labels is None:
                raise ValueError("this method needs labeled data: the batches carry no labels")
            out = model(**model_inputs(batch, device), labels=labels.to(device))
            grads = torch.autograd.grad(out.loss, masks)
            for a, g in zip(acc, grads):
                g = g.detach().double().cpu()
                a += g * g if squared else g.abs()
            seen += 1
            if total:
                tell(progress, f"gradients: batch {step + 1}/{total}", (step + 1) / total)
    counts = torch.tensor([seen], dtype=torch.float64)
    group.sum_([*acc, counts])
    seen = int(counts[0])
    if seen == 0:
        raise ValueError("no labeled data: the batches are empty")
    return [a.float() for a in acc]
