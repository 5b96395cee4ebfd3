"""Measured latency per block on this machine, beside the analytic MACs.

Timing hooks go on a private copy of the model (never the shared one). Each layer's time splits into
the FFN up projection, the FFN down projection, and the rest of the layer (attention, norms,
activation); whatever the layers do not account for is embeddings and head.
"""
from __future__ import annotations

import copy
import statistics
import time

import pandas as pd
import torch
from torch import nn

from kcm_core.arch import ffn_blocks, transformer_layers
from kcm_core.runtime import hooks, model_inputs


def block_latency(model: nn.Module, batch: dict[str, torch.Tensor], repeats: int = 5) -> pd.DataFrame:
    """Median milliseconds per (part, block) over ``repeats`` timed forward passes of ``batch``."""
    timed = copy.deepcopy(model)
    _, layers = transformer_layers(timed)
    blocks = ffn_blocks(timed)
    samples: dict[tuple[str, str], list[float]] = {}
    starts: dict[int, float] = {}

    def watch(module: nn.Module, part: str, block: str) -> list:
        key = (part, block)

        def pre(_m, _a):
            starts[id(module)] = time.perf_counter()

        def post(_m, _a, _o):
            samples.setdefault(key, []).append(time.perf_counter() - starts[id(module)])
        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    handles: list = []
    for i, layer in enumerate(layers):
        handles += watch(layer, f"layer {i}", "layer")
    for b in blocks:
        handles += watch(b.up, f"layer {b.index}", "ffn_up")
        handles += watch(b.down, f"layer {b.index}", "ffn_down")
    inputs = model_inputs(batch, next(timed.parameters()).device)
    totals = []
    with hooks(handles), torch.inference_mode():
        timed.eval()          # a private copy: safe to switch its mode
        timed(**inputs)       # warm-up
        samples.clear()
        for _ in range(repeats):
            start = time.perf_counter()
            timed(**inputs)
            totals.append(time.perf_counter() - start)
    med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    rows, layers_total = [], 0.0
    for i in range(len(layers)):
        part = f"layer {i}"
        up, down, whole = med[(part, "ffn_up")], med[(part, "ffn_down")], med[(part, "layer")]
        layers_total += whole
        rows += [{"part": part, "block": "attention", "ms": max(whole - up - down, 0.0)},
                 {"part": part, "block": "ffn_up", "ms": up}, {"part": part, "block": "ffn_down", "ms": down}]
    rows.append({"part": "embeddings + head", "block": "head",
                 "ms": max(statistics.median(totals) * 1e3 - layers_total, 0.0)})
    return pd.DataFrame(rows)
