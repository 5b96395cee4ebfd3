"""FLAP's bias compensation (An et al., AAAI 2024): the dropped neurons' *mean* contribution is kept.

For layer l, ``shift_l = sum over dropped i of mean(x_i) * W2[i, :]`` (``x_i`` the neuron's input to
the down-projection, averaged over the calibration tokens) is added to the down-projection's bias, so
the layer's average output is unchanged and only the fluctuation around it is lost. The shift is part
of the plan (``LayerKeep.bias_shift``), so masking and slicing realise it alike. A family whose down
projection has no bias in stock code gets one through its config switch (LLaMA's ``mlp_bias``); a
family with neither (Mistral, Qwen2) is realised in the stock class of a family that has one and computes
the same function (``kcm_core.bias_carrier``: LLaMA), and refused where no such class reproduces it (a
sliding window shorter than the model's positions).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .arch import family_for_model, ffn_blocks
from .bias_carrier import carrier_family, carrier_refusal
from .plan import KeepPlan


def can_carry_bias(model: nn.Module) -> bool:
    """Whether the down-projection has a bias, a config switch that gives it one in stock code, or a
    stock class that holds the model with one and computes the same outputs (``kcm_core.bias_carrier``)."""
    if all(b.down.bias is not None for b in ffn_blocks(model)) or family_for_model(model).mlp_bias_field:
        return True
    return carrier_family(model.config) is not None and carrier_refusal(model.config) is None


def check_compensable(model: nn.Module) -> None:
    """``ValueError`` when the down-projection cannot carry a bias that stock code would load."""
    if can_carry_bias(model):
        return
    name = type(model).__name__
    raise ValueError(f"a repair that adds a bias (bias, scales+bias, FLAP's compensation) needs a bias on the "
                     f"down-projection, and {name} has none in stock transformers (no config switch); it "
                     f"cannot be moved to a class that has one: {carrier_refusal(model.config)}. Choose a "
                     "repair that adds no bias for this model (scales or none; refit fits no intercept here)")


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
