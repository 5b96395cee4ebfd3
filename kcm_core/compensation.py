"""FLAP's bias compensation (An et al., AAAI 2024): the dropped neurons' *mean* contribution is kept.

For layer l, ``shift_l = sum over dropped i of mean(x_i) * W2[i, :]`` (``x_i`` the neuron's input to
the down-projection, averaged over the calibration tokens) is added to the down-projection's bias, so
the layer's average output is unchanged and only the fluctuation around it is lost. The shift is part
of the plan (``LayerKeep.bias_shift``), so masking and slicing realise it alike. A family whose down
projection has no bias in stock code gets one through its config switch (LLaMA's ``mlp_bias``); a
family with neither (Mistral, Qwen2) is refused rather than exported in a form stock code cannot load.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .arch import family_for_model, ffn_blocks
from .plan import KeepPlan


def can_carry_bias(model: nn.Module) -> bool:
    """Whether the down-projection has a bias, or a config switch that gives it one in stock code."""
    return all(b.down.bias is not None for b in ffn_blocks(model)) or bool(family_for_model(model).mlp_bias_field)


def check_compensable(model: nn.Module) -> None:
    """``ValueError`` when the down-projection cannot carry a bias that stock code would load."""
    if can_carry_bias(model):
        return
    raise ValueError(f"FLAP's bias compensation needs a bias on the down-projection, and "
                     f"{type(model).__name__} has none in stock transformers (no config switch); "
                     "choose wanda-sp, kcm or another method for this model")


def compensate(model: nn.Module, plan: KeepPlan, means: Sequence[torch.Tensor]) -> KeepPlan:
    """``plan`` with each layer's bias shift: the dropped neurons' mean output (a d-vector)."""
    check_compensable(model)
    shifts = []
    with torch.no_grad():
        for block, layer, mean in zip(ffn_blocks(model), plan.layers, means):
            drop = torch.tensor(layer.drop_idx(), dtype=torch.long)
            rows = block.down_rows().detach().double().cpu()                # (N, d)
            shift = (mean.double()[drop, None] * rows[drop]).sum(0)          # (d,)
            shifts.append(shift.tolist() if len(drop) else None)
    return plan.with_bias_shifts(shifts)
