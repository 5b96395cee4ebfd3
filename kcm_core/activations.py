"""Activation statistics of every FFN neuron on unlabeled batches, streamed (memory does not grow
with the sample), padding excluded, hooks always removed. D2 and Output-Magnitude are built on them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .arch import ffn_blocks
from .distributed import SINGLE, Group
from .runtime import Batch, Progress, eval_mode, hooks, model_device, model_inputs, tell, token_mask


@dataclass(frozen=True)
class NeuronStats:
    """Per-layer statistics of each neuron's post-activation output (the down-projection's input)."""

    mean: tuple[torch.Tensor, ...]       # (N,) per layer
    mean_abs: tuple[torch.Tensor, ...]
    rms: tuple[torch.Tensor, ...]
    tokens: int                          # non-padding tokens seen
    sequences: int
    var: tuple[torch.Tensor, ...] = ()   # variance over tokens (FLAP's fluctuation), from float64 sums


def collect_stats(model: nn.Module, batches: Iterable[Batch], progress: Progress | None = None,
                  total: int | None = None, group: Group = SINGLE) -> NeuronStats:
    """Run ``batches`` through ``model`` without gradients and accumulate neuron statistics.

    Under a distributed ``group`` this rank runs its share of the batches and the float64 sums and
    counts are summed over the ranks before they become means, so every rank returns the statistics
    of all ``batches``."""
    if group.distributed:
        batches = group.share(batches)
        total = group.share_count(total) if total else total
    blocks = ffn_blocks(model)
    device = model_device(model)
    sums = [torch.zeros(b.width, dtype=torch.float64) for b in blocks]
    abs_sums = [torch.zeros(b.width, dtype=torch.float64) for b in blocks]
    sq_sums = [torch.zeros(b.width, dtype=torch.float64) for b in blocks]
    rows_seen = [0 for _ in blocks]
    current: dict[str, Batch] = {}
    sequences = 0

    def make_hook(i: int):
        def hook(_module, args):
            h = args[0]                                          # (B, T, N)
            keep = token_mask(current["batch"], h.shape, h.device)
            rows = h[keep].to(torch.float64)                     # (tokens, N)
            sums[i] += rows.sum(0).cpu()
            abs_sums[i] += rows.abs().sum(0).cpu()
            sq_sums[i] += (rows * rows).sum(0).cpu()
            rows_seen[i] += rows.shape[0]
        return hook

    handles = [b.down.register_forward_pre_hook(make_hook(i)) for i, b in enumerate(blocks)]
    with hooks(handles), eval_mode(model), torch.no_grad():
        for step, batch in enumerate(batches):
            current["batch"] = batch
            inputs = model_inputs(batch, device)
            model(**inputs)
            sequences += int(next(iter(inputs.values())).shape[0])
            if total:
                tell(progress, f"activations: batch {step + 1}/{total}", (step + 1) / total)
    counts = torch.tensor([rows_seen[0] if rows_seen else 0, sequences], dtype=torch.float64)
    group.sum_([*sums, *abs_sums, *sq_sums, counts])
    tokens, sequences = int(counts[0]), int(counts[1])
    if sequences == 0:
        raise ValueError("no data: the unlabeled sample is empty")
    if tokens == 0:
        raise ValueError("the unlabeled sample has no real tokens (every position is padding)")
    mean = tuple((s / tokens).float() for s in sums)
    mean_abs = tuple((s / tokens).float() for s in abs_sums)
    rms = tuple((s / tokens).sqrt().float() for s in sq_sums)
    var = tuple((q / tokens - (s / tokens) ** 2).clamp_min(0).float() for s, q in zip(sums, sq_sums))
    return NeuronStats(mean, mean_abs, rms, tokens, sequences, var)
