"""ONNX export: the dynamo exporter with dynamic batch and sequence axes; the legacy TorchScript
exporter only as a fallback, since with torch 2.13 it bakes part of the attention-mask computation in
at trace time (outputs on other inputs differ by up to 0.08 on BERT, DistilBERT and GPT-2): the
fresh-process verification decides whether its file is right."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..atomic import remove
from ..runtime import model_device
from .probe import TRACE_BATCH, TRACE_SEQ, IOSpec, float_dtype, probe_inputs


class _OnnxWrapper(nn.Module):
    """Named tensor inputs in, one tensor out: the graph ONNX sees."""

    def __init__(self, model: nn.Module, output: str):
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, pixel_values=None):
        given = dict(input_ids=input_ids, attention_mask=attention_mask,
                     token_type_ids=token_type_ids, pixel_values=pixel_values)
        return getattr(self.model(**{k: v for k, v in given.items() if v is not None}), self.output)


def write_onnx(model: nn.Module, spec: IOSpec, path: Path) -> str:
    """Export to ``path``; returns which exporter produced it ("dynamo", else "legacy")."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as err:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install onnx onnxscript") from err
    device, dtype = model_device(model), float_dtype(model)
    example = {k: torch.from_numpy(v).to(device) for k, v in
               probe_inputs(model, spec, TRACE_BATCH, TRACE_SEQ, seed=1).items()}
    example = {k: v.to(dtype) if v.is_floating_point() else v for k, v in example.items()}
    wrapper = _OnnxWrapper(model, spec.output).eval()
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1_800_000_000
    try:
        batch = torch.export.Dim("batch")
        if spec.vision:
            dynamic = {"pixel_values": {0: batch}}
        else:
            seq = torch.export.Dim("sequence", max=spec.max_positions) if spec.max_positions > TRACE_SEQ \
                else torch.export.Dim("sequence")
            dynamic = {name: {0: batch, 1: seq} for name in spec.inputs}
        program = torch.onnx.export(wrapper, (), kwargs=example, output_names=[spec.output],
                                    dynamic_shapes=dynamic, dynamo=True, verbose=False,
                                    external_data=big)
        program.save(str(path), external_data=big)
        return "dynamo"
    except Exception as dynamo_error:        # the verification below decides whether legacy is right
        remove(path)
        axes = {name: ({0: "batch"} if spec.vision else {0: "batch", 1: "sequence"}) for name in spec.inputs}
        axes[spec.output] = {0: "batch"}
        try:
            torch.onnx.export(wrapper, tuple(example[name] for name in spec.inputs), str(path),
                              input_names=list(spec.inputs), output_names=[spec.output],
                              dynamic_axes=axes, dynamo=False, opset_version=17)
        except Exception as legacy_error:
            raise ValueError(f"ONNX export failed: dynamo exporter: {dynamo_error}; "
                             f"legacy exporter: {legacy_error}") from legacy_error
        return "legacy"
