"""The command line's streamed path: ``prune --stream`` prunes a model folder one layer at a time
(``kcm_core.streamed``), for models that do not fit in memory.

The same options and the same calibration data as the in-memory ``prune`` (so the same plan, scales
and output folder); the model is read from its safetensors files, never loaded whole, so the pruned
model is not evaluated (that would need it whole): the report says so, and ``evaluate`` on the output
folder measures it where it fits.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

NOT_EVALUATED = ("not evaluated: --stream never holds the whole model; run `python -m kcm_core evaluate` "
                 "on the output folder where it fits in memory")


class _ConfigOnly:
    """What the data helpers read from a model: its config (the weights stay on disk)."""

    def __init__(self, config):
        self.config = config


def prune_streamed_command(args, config, out_dir: Path, progress) -> dict:
    """``prune --stream``: the same data path as ``cmd_prune``, then ``stream.prune_streamed``."""
    from .. import data as D
    from ..arch import model_shape
    from .common import (classifier_config, export_formats, limit, load_data, model_batches,
                         resolve_model_path, run_report, sample_record, source_paths)
    from .lm import blocks, blocks_record, lm_config
    from ..models import fit_max_len, load_config, load_processor
    from ..select import check_multiple
    from ..streamed.passes import check_streamable, prune_streamed

    times: dict[str, float] = {}
    start = time.perf_counter()
    check_streamable(config.spec)                                  # before any data work
    if export_formats(args) != ("hf",):
        raise ValueError(f"--stream writes the hf format only, not {args.format!r}; add ONNX afterwards with "
                         "`python -m kcm_core export` where the pruned model fits in memory")
    model_path = resolve_model_path(args.model, progress)
    if not Path(model_path).is_dir():
        raise ValueError(f"--stream reads the safetensors files of a local model folder; {args.model!r} "
                         "is not one (download it first, e.g. with `hf download`)")
    model_config = load_config(model_path)
    shape = model_shape(model_config)
    check_multiple(args.multiple, shape.ffn_width)
    tokenizer = load_processor(model_path, {"local_files_only": True}, vision=shape.vision)
    holder = _ConfigOnly(model_config)
    if shape.head == "lm":
        config = lm_config(config, args)
        batches, _ = blocks(args, holder, tokenizer, progress)
        data = blocks_record(args, batches)
    else:
        args.max_len = fit_max_len(args.max_len, model_config, option="--max-len")
        config = classifier_config(config, args, shape.vision)
        sample = D.labels_for_model(limit(load_data(args, progress, "train", images=shape.vision),
                                           args.samples, args.seed), model_config)
        batches = model_batches(sample, tokenizer, holder, args, with_labels=False, progress=progress)
        data = sample_record(args, sample)
    times["load"] = time.perf_counter() - start

    def report(result, skeleton):
        return run_report(args, skeleton.model, model_path, config, result, data=data,
                          params_before=result.params_before, params_after=result.params_after,
                          evaluation=None, seconds={**times, **result.seconds})

    result = prune_streamed(model_path, config, batches, out_dir, tokenizer=tokenizer,
                            overwrite=args.overwrite, progress=progress, protected=source_paths(args),
                            report=report)
    from ..export import REPORT_FILE
    written = json.loads((out_dir / REPORT_FILE).read_text())
    export = {"out_dir": str(out_dir), "formats": ["hf"], "streamed": True,
              "max_abs_diff": {"hf": result.max_abs_diff}, "tolerance": result.tolerance,
              "loader": result.loader, "files": list(result.files)}
    return {**written, "evaluation_note": NOT_EVALUATED, "export": export, "out": str(out_dir)}
