"""The fixed probe an export is checked on: which inputs a model takes, a deterministic batch of them,
and the model's output on it (logits, else the last hidden state)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch import nn

from ..arch import model_shape
from ..runtime import model_device

# Largest acceptable |reloaded - in-memory| on the probe, by parameter dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
# Probe sizes: the ONNX graph is traced with one shape and checked with another (dynamic axes).
TRACE_BATCH, TRACE_SEQ = 2, 8
PROBE_BATCH, PROBE_SEQ = 3, 11


@dataclass(frozen=True)
class IOSpec:
    inputs: tuple[str, ...]             # in forward order
    output: str                         # "logits", or "last_hidden_state" for a bare backbone
    vision: bool
    vocab: int
    pad_id: int | None
    type_vocab: int
    image: tuple[int, int, int]         # channels, height, width (vision only)
    max_positions: int


def io_spec(model: nn.Module) -> IOSpec:
    config = model.config
    shape = model_shape(config)
    params = inspect.signature(model.forward).parameters
    if shape.vision:
        inputs: tuple[str, ...] = ("pixel_values",)
        size = int(config.image_size)
        image = (int(getattr(config, "num_channels", 3)), size, size)
    else:
        inputs = ("input_ids",) + tuple(
            name for name in ("attention_mask", "token_type_ids") if name in params
            and (name != "token_type_ids" or getattr(config, "type_vocab_size", 0)))
        image = (0, 0, 0)
    return IOSpec(inputs=inputs, output="logits", vision=shape.vision, vocab=shape.vocab_size,
                  pad_id=getattr(config, "pad_token_id", None),
                  type_vocab=int(getattr(config, "type_vocab_size", 0) or 0), image=image,
                  max_positions=shape.max_positions)


def probe_inputs(model: nn.Module, spec: IOSpec, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    """A fixed, deterministic input: random tokens (never the pad id), the last row half padded."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    if spec.vision:
        out["pixel_values"] = torch.randn(batch, *spec.image, generator=gen)
    else:
        ids = torch.randint(0, spec.vocab, (batch, seq), generator=gen)
        if spec.pad_id is not None and 0 <= spec.pad_id < spec.vocab:
            ids[ids == spec.pad_id] = (spec.pad_id + 1) % spec.vocab
        out["input_ids"] = ids
        if "attention_mask" in spec.inputs:
            mask = torch.ones(batch, seq, dtype=torch.long)
            mask[-1, seq // 2 + 1:] = 0
            out["attention_mask"] = mask
        if "token_type_ids" in spec.inputs:
            out["token_type_ids"] = torch.randint(0, max(spec.type_vocab, 1), (batch, seq), generator=gen)
    return {k: v.numpy() for k, v in out.items()}      # floats stay fp32; runners cast to the model's dtype


def float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def tolerance(model: nn.Module) -> float:
    return TOLERANCE.get(float_dtype(model), 1e-4)


def run_torch(model: nn.Module, probe: Mapping[str, np.ndarray]) -> tuple[np.ndarray, str]:
    """The model's output on ``probe`` (CPU fp32) and its name: logits, else the last hidden state."""
    device, dtype = model_device(model), float_dtype(model)
    inputs = {k: torch.from_numpy(v).to(device) for k, v in probe.items()}
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    try:
        out = model(**inputs)
    except Exception as err:
        raise ValueError(f"{type(model).__name__} fails on a probe batch of shape "
                         f"{tuple(next(iter(inputs.values())).shape)}: {err}") from err
    name = "logits" if getattr(out, "logits", None) is not None else "last_hidden_state"
    return getattr(out, name).float().cpu().numpy(), name
