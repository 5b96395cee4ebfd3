"""Running a copy of a model one transformer layer at a time, for the layer-by-layer fits (the
scaling step, ``kcm_core.repair``): the layers in front of the one being fitted are replaced by a
``Replay`` of their recorded output, and a hook on the module of interest ends each forward pass with
``StopForward``, so fitting all layers costs about two forward passes, not one per layer."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .runtime import Batch, eval_mode, hooks, model_device, model_inputs


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once the layer of interest has been seen."""


class Replay(nn.Module):
    """Stands in for the transformer layers before the one being fitted: it returns that earlier
    layer's recorded output for the current batch, so the layers in front are not recomputed.
    Attribute reads fall through to the layer it replaces (some models read e.g. attention_type)."""

    def __init__(self, original: nn.Module, outputs: list, state: dict):
        super().__init__()
        object.__setattr__(self, "_original", original)
        object.__setattr__(self, "_outputs", outputs)
        object.__setattr__(self, "_state", state)

    def forward(self, *args, **kwargs):
        return self._outputs[self._state["batch"]]

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)


def detached(obj):
    """``obj`` (a tensor, or a plain tuple of them) without its autograd history."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(detached(o) for o in obj)
    return obj


def run_layer(student: nn.Module, layers: nn.ModuleList, li: int, batches: Sequence[Batch],
              recorded: list | None, stop_module: nn.Module, stop_hook) -> None:
    """Run every batch up to ``stop_module`` (whose hook raises StopForward), replaying the
    recorded output of layer ``li - 1`` in place of layers ``0 .. li-1`` when ``recorded`` is given."""
    device = model_device(student)
    state = {"batch": 0}
    originals = [layers[j] for j in range(li)] if recorded is not None else []
    handles = [stop_hook(stop_module)]
    try:
        for j, original in enumerate(originals):
            layers[j] = Replay(original, recorded, state)
        with hooks(handles), eval_mode(student), torch.no_grad():
            for b, batch in enumerate(batches):
                state["batch"] = b
                state["mask"] = batch
                try:
                    student(**model_inputs(batch, device))
                except StopForward:
                    continue
                raise ValueError(f"scaling: the forward pass never reached layer {li}; this model's "
                                 "layers do not run in the order the adapter table gives")
    finally:
        for j, original in enumerate(originals):
            layers[j] = original


def record_layer_output(student, layers, li, batches, recorded) -> list:
    """Layer ``li``'s output for every batch (scales folded in), to replay into the next fit."""
    out: list = []

    def stop_hook(module):
        def hook(_module, _args, output):
            out.append(detached(output))
            raise StopForward
        return module.register_forward_hook(hook)

    run_layer(student, layers, li, batches, recorded, layers[li], stop_hook)
    return out
