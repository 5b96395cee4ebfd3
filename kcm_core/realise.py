"""Two realisations of a ``KeepPlan``: masking a copy, and slicing into physically smaller layers.

Both return a new model and leave the caller's untouched. Masking multiplies each neuron's column of
the down-projection by its scale (0 for a dropped neuron): same shapes, no speed gain, handy for
comparison. Slicing builds smaller up/gate/down layers with the kept rows, scales folded in, same dtype
and device: this is what makes a model faster and smaller. ``tests/test_realise.py`` checks that the two
agree to 1e-5.

A plan that adds biases to the down-projections (``LayerKeep.bias_shift``) of a family with no MLP-bias
switch (Mistral, Qwen2) is realised in the stock class that loads them, LLaMA's, with the same outputs
(``kcm_core.bias_carrier``): masked and sliced alike, so both keep agreeing and the export loads.
"""
from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from .arch import FFNBlock, Family, family_for_model, ffn_blocks, set_ffn_width
from .bias_carrier import carrier_family, into_carrier
from .plan import KeepPlan


def _check_plan(blocks: list[FFNBlock], plan: KeepPlan) -> None:
    if len(plan.layers) != len(blocks):
        raise ValueError(f"plan has {len(plan.layers)} layers, the model has {len(blocks)}")
    for block, layer in zip(blocks, plan.layers):
        if layer.width != block.width:
            raise ValueError(
                f"plan expects {layer.width} neurons in layer {block.index}, the model has {block.width}"
            )


def mask_copy(model: nn.Module, plan: KeepPlan, *, carry: bool = True) -> nn.Module:
    """A copy of ``model`` in which dropped neurons output zero and kept ones are scaled (or carry
    their refitted rows). ``carry``: a plan with bias shifts on a family with no MLP-bias switch gives a
    model of the carrier class (``kcm_core.bias_carrier``); False keeps the class, its down-projections
    holding the biases (a one-layer view of the streamed mode, which writes the carrier's files itself)."""
    plan.check_realisable()
    masked = copy.deepcopy(model)
    blocks = ffn_blocks(masked)
    _check_plan(blocks, plan)
    with torch.no_grad():
        for block, layer in zip(blocks, plan.layers):
            w = block.down.weight
            vec = layer.scale_vector().to(device=w.device, dtype=w.dtype)
            if block.transposed:
                w.mul_(vec[:, None])     # Conv1D weight: (N, d)
            else:
                w.mul_(vec[None, :])     # Linear weight: (d, N)
            if layer.rows is not None and layer.kept:
                keep = torch.tensor(layer.keep_idx, dtype=torch.long, device=w.device)
                rows = layer.rows.to(device=w.device, dtype=w.dtype)           # (k, d)
                if block.transposed:
                    w[keep] = rows
                else:
                    w[:, keep] = rows.t()
            if layer.bias_shift is not None:
                shift_bias(block.down, layer.bias_shift)
        if plan.has_bias_shift:
            give_mlp_biases(masked, family_for_model(masked))
    return into_carrier(masked) if carry and moves(masked, plan) else masked


def moves(model: nn.Module, plan: KeepPlan) -> bool:
    """Whether realising ``plan`` on ``model`` changes its class: the plan adds biases to the
    down-projections and the family has no switch for them (``kcm_core.bias_carrier``)."""
    return plan.has_bias_shift and carrier_family(model.config) is not None


def shift_bias(layer: nn.Module, shift) -> None:
    """Add ``shift`` (length d) to the layer's bias, creating a zero bias first where it has none."""
    w = layer.weight
    out = w.shape[1] if hasattr(layer, "nf") else w.shape[0]
    with torch.no_grad():
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(out, dtype=w.dtype, device=w.device),
                                      requires_grad=w.requires_grad)
        layer.bias.add_(torch.as_tensor(shift, dtype=w.dtype, device=w.device))


def give_mlp_biases(model: nn.Module, family) -> None:
    """Set the family's MLP-bias switch and give every up/gate/down layer a (zero) bias where it has
    none, so the config and the weights agree and stock ``from_pretrained`` loads the export."""
    if family.mlp_bias_field is None:
        return
    setattr(model.config, family.mlp_bias_field, True)
    for block in ffn_blocks(model):
        for layer in (block.up, block.gate, block.down):
            if layer is not None and layer.bias is None:
                shift_bias(layer, torch.zeros(()))


def _linear_like(old: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A new layer of ``old``'s kind holding ``weight`` and ``bias`` exactly (no re-initialisation)."""
    new = copy.copy(old)           # keeps the class and plain attributes, e.g. Conv1D.nf
    new._parameters = dict(old._parameters)
    new.weight = nn.Parameter(weight.detach().clone(), requires_grad=old.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=old.bias.requires_grad)
    if isinstance(old, nn.Linear):
        new.in_features, new.out_features = weight.shape[1], weight.shape[0]
    elif hasattr(old, "nf"):        # transformers' Conv1D: weight (nx, nf)
        new.nf = weight.shape[1]
        if hasattr(old, "nx"):
            new.nx = weight.shape[0]
    return new


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def _slice_up(layer: nn.Module, keep: torch.Tensor, transposed: bool) -> nn.Module:
    w = layer.weight[:, keep] if transposed else layer.weight[keep]
    b = layer.bias[keep] if layer.bias is not None else None
    return _linear_like(layer, w, b)


def _slice_down(layer: nn.Module, keep: torch.Tensor, scales: torch.Tensor, transposed: bool,
                rows: torch.Tensor | None = None) -> nn.Module:
    if rows is not None:                                  # refitted rows replace the kept ones
        rows = rows.to(device=layer.weight.device, dtype=layer.weight.dtype)     # (k, d)
        w = rows if transposed else rows.t().contiguous()
    elif transposed:
        w = layer.weight[keep] * scales[:, None]          # (k, d)
    else:
        w = layer.weight[:, keep] * scales[None, :]       # (d, k)
    new = _linear_like(layer, w, layer.bias)
    if transposed and w.shape[0] == 0:
        new.__class__ = _emptied_conv1d_class(type(layer))
    return new


@functools.cache
def _emptied_conv1d_class(base: type) -> type:
    """Conv1D's forward cannot reshape a zero-width input; an emptied FFN outputs only its bias."""

    class EmptiedConv1D(base):
        def forward(self, x):
            out = self.bias.expand(*x.shape[:-1], self.bias.shape[0])
            return out.clone()

    EmptiedConv1D.__name__ = EmptiedConv1D.__qualname__ = f"Emptied{base.__name__}"
    return EmptiedConv1D


def slice_model(model: nn.Module, plan: KeepPlan, *, carry: bool = True) -> nn.Module:
    """A new, physically smaller model: each FFN keeps only the plan's neurons, scales folded in.

    Its config records the new widths: the family's width field when all layers agree (a stock
    ``from_pretrained`` then loads it), else ``kcm_ffn_widths`` for ``kcm_core.load_pruned``.
    ``carry``: as in ``mask_copy`` (a Mistral or Qwen2 plan with bias shifts gives a LLaMA-class model).
    """
    plan.check_realisable()
    family = family_for_model(model)
    sliced = copy.deepcopy(model)
    blocks = ffn_blocks(sliced)
    _check_plan(blocks, plan)
    with torch.no_grad():
        for block, layer in zip(blocks, plan.layers):
            device = block.up.weight.device
            keep = torch.tensor(layer.keep_idx, dtype=torch.long, device=device)
            scales = layer.scale_vector()[list(layer.keep_idx)].to(device=device,
                                                                   dtype=block.down.weight.dtype)
            _set_module(sliced, block.up_name, _slice_up(block.up, keep, block.transposed))
            if block.gate is not None:
                _set_module(sliced, block.gate_name, _slice_up(block.gate, keep, block.transposed))
            down = _slice_down(block.down, keep, scales, block.transposed, layer.rows)
            if layer.bias_shift is not None:
                shift_bias(down, layer.bias_shift)
            _set_module(sliced, block.down_name, down)
    if plan.has_bias_shift:
        give_mlp_biases(sliced, family)
    record_widths(sliced.config, family, plan.kept_counts)
    return into_carrier(sliced) if carry and moves(sliced, plan) else sliced


def record_widths(config, family: Family, widths: list[int]) -> None:
    """Write per-layer FFN widths into ``config``: the stock field alone when every layer has one width
    that the field can state, else the widest layer's (or more) there and the real widths in
    ``kcm_ffn_widths`` (DINOv2's int ``mlp_ratio`` states only multiples of the hidden size)."""
    exact = set_ffn_width(config, family, max(widths))
    if len(set(widths)) == 1 and exact:
        if hasattr(config, "kcm_ffn_widths"):
            delattr(config, "kcm_ffn_widths")
    else:
        config.kcm_ffn_widths = list(widths)
