"""``save_pruned``: write a sliced model, its plan and report, verified in a fresh process, atomically."""
from __future__ import annotations

import copy
import inspect
import json
import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..arch import family_for_model, ffn_blocks
from ..atomic import atomic_folder, check_protected, check_replaceable, check_writable, disk_errors
from ..bias_carrier import carrier_note
from ..plan import KeepPlan
from ..realise import record_widths
from ..report import Environment, PruneReport, render_markdown
from ..runtime import Progress, eval_mode, tell
from .files import (EXPORT_FILE, FORMATS, ONNX_FILE, PLAN_FILE, PROBE_FILE, PROBE_OUT_FILE,
                    REPORT_FILE, REPORT_MD)
from .onnx import write_onnx
from .probe import PROBE_BATCH, PROBE_SEQ, IOSpec, io_spec, probe_inputs, run_torch, tolerance
from .verify import verify as verify_reload

# What makes a folder recognisably an earlier export, the only thing ``overwrite`` may replace.
EXPORT_MARKERS = (EXPORT_FILE, "config.json")

_target_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


@dataclass
class ExportResult:
    """What ``save_pruned`` wrote and how well the fresh-process reload matched."""

    out_dir: Path
    formats: tuple[str, ...]
    max_abs_diff: dict[str, float] = field(default_factory=dict)   # per format; empty if not verified
    reloaded_ok: bool = False
    loader: str = ""                        # "transformers" (stock) or "kcm_core.load_pruned"
    onnx_exporter: str | None = None        # "dynamo" or "legacy"
    tolerance: float | None = None
    files: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "formats": list(self.formats),
                "max_abs_diff": dict(self.max_abs_diff), "reloaded_ok": self.reloaded_ok,
                "loader": self.loader, "onnx_exporter": self.onnx_exporter, "tolerance": self.tolerance,
                "files": list(self.files)}


def save_pruned(model: nn.Module, out_dir: str | os.PathLike, *, plan: KeepPlan | None = None,
                report: PruneReport | None = None, tokenizer=None,
                formats: Sequence[str] = ("hf",), overwrite: bool = False, verify: bool = True,
                progress: Progress | None = None,
                protected: Sequence[str | os.PathLike] = ()) -> ExportResult:
    """Write ``model`` (a sliced model) to ``out_dir`` in ``formats``, verified and atomically.

    formats: any of ``"hf"`` (safetensors + config + tokenizer; stock-loadable when widths are uniform)
        and ``"onnx"`` (``model.onnx``, dynamic batch and sequence axes). The plan, the report
        (``kcm_core.report``) and ``export.json`` are written in every case.
    verify: reload every format in a fresh process and compare with ``model`` on a fixed probe; a
        difference above ``TOLERANCE`` (1e-4 for fp32) raises ``ValueError`` and leaves nothing.
    overwrite: replace an existing ``out_dir`` only if it is an earlier export (holds ``export.json``
        and ``config.json``); a file, a link or any other folder is refused, whatever ``overwrite``.
    protected: paths this run reads (model folder, data file); ``out_dir`` may not be, lie inside or
        contain one. The folder ``model`` was loaded from (``config.name_or_path``) is always protected.
    The model is not modified. Raises ``ValueError`` for a refused ``out_dir`` (before any work), and
    for a full disk or a refused write during it (leaving nothing).
    """
    formats = check_formats(formats)
    out_dir = Path(out_dir).expanduser()
    family_for_model(model)                  # unsupported models fail at the door
    _check_target(out_dir, overwrite, [*protected, _loaded_from(model)])
    lock = _lock_for(out_dir)
    if not lock.acquire(blocking=False):
        raise ValueError(f"another export to {out_dir} is running in this process")
    try:
        with disk_errors(out_dir), atomic_folder(out_dir, overwrite=overwrite,
                                                 markers=EXPORT_MARKERS) as tmp:
            result = _write(model, tmp, out_dir, plan, report, tokenizer, formats, verify, progress)
    finally:
        lock.release()
    tell(progress, "export: done", 1.0)
    return result


def _check_target(out_dir: Path, overwrite: bool, protected: Sequence) -> None:
    """Everything about ``out_dir`` that can be refused before the work starts."""
    check_protected(out_dir, protected)
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise ValueError(f"{out_dir} already exists; pass overwrite=True (CLI: --overwrite)")
        check_replaceable(out_dir, EXPORT_MARKERS, kind="export")
    check_writable(out_dir)


def _loaded_from(model: nn.Module) -> str:
    """The local folder ``model`` came from, if any (``from_pretrained`` records it in the config)."""
    path = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    return path if path and Path(path).expanduser().is_dir() else ""


def _write(model, tmp: Path, out_dir: Path, plan, report, tokenizer, formats, verify,
           progress) -> ExportResult:
    config, loader = _export_config(model)
    result = ExportResult(out_dir=out_dir, formats=formats, loader=loader)
    with eval_mode(model), torch.no_grad():
        tell(progress, "export: preparing the probe input", 0.02)
        spec = io_spec(model)
        probe = probe_inputs(model, spec, PROBE_BATCH, PROBE_SEQ, seed=0)
        expected, output = run_torch(model, probe)
        spec = replace(spec, output=output)
        if "hf" in formats:
            tell(progress, "export: writing safetensors and config", 0.1)
            _write_hf(model, config, tmp, uniform_stock=loader == "transformers")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if "onnx" in formats:
            tell(progress, "export: exporting ONNX", 0.3)
            result.onnx_exporter = write_onnx(model, spec, tmp / ONNX_FILE)
    if verify:
        tell(progress, "export: reloading in a fresh process", 0.6)
        result.tolerance = tolerance(model)
        result.max_abs_diff = verify_reload(tmp, formats, loader, spec, probe, expected, result.tolerance)
        result.reloaded_ok = True
    tell(progress, "export: writing the report", 0.9)
    for name in (PROBE_FILE, PROBE_OUT_FILE):
        (tmp / name).unlink(missing_ok=True)
    _write_reports(tmp, model, plan, report, result, spec)
    result.files = tuple(sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()))
    return result


def check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = (formats,)
    formats = tuple(dict.fromkeys(str(f).strip().lower() for f in formats))
    if not formats:
        raise ValueError(f"choose at least one export format of {', '.join(FORMATS)}")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown export format {unknown[0]!r}; choose from {', '.join(FORMATS)}")
    return formats


def _lock_for(out_dir: Path) -> threading.Lock:
    key = str(out_dir.resolve())
    with _locks_guard:
        return _target_locks.setdefault(key, threading.Lock())


def _export_config(model: nn.Module):
    """A copy of the model's config with the real per-layer widths, and the loader it will need."""
    family = family_for_model(model)
    widths = [block.width for block in ffn_blocks(model)]
    config = copy.deepcopy(model.config)
    record_widths(config, family, widths)
    # realise.py swaps in its own module class for emptied GPT-2 Conv1D layers: stock code cannot run them.
    custom = any(type(m).__module__.startswith("kcm_core.") for m in model.modules())
    if custom and not getattr(config, "kcm_ffn_widths", None):
        config.kcm_ffn_widths = list(widths)
    loader = "kcm_core.load_pruned" if getattr(config, "kcm_ffn_widths", None) else "transformers"
    config.architectures = [type(model).__name__]
    return config, loader


def _write_hf(model: nn.Module, config, folder: Path, *, uniform_stock: bool) -> None:
    # A shallow copy shares every tensor; only its ``config`` attribute differs, so saving never
    # touches the caller's model or config (save_pretrained writes into the config it saves).
    twin = copy.copy(model)
    twin.config = config
    from ..runtime import quiet_transformers

    # Stock loaders may expect the checkpoint's original key names; load_pruned reads the model's own.
    options = {}
    if "save_original_format" in inspect.signature(twin.save_pretrained).parameters:   # transformers 5
        options["save_original_format"] = uniform_stock
    with quiet_transformers():               # no "Writing model shards" bar on the caller's stderr
        twin.save_pretrained(str(folder), **options)


# --------------------------------------------------------------------------- what is written beside the weights

def _write_reports(folder: Path, model: nn.Module, plan: KeepPlan | None, report: PruneReport | None,
                   result: ExportResult, spec: IOSpec) -> None:
    """``kcm_plan.json``, ``report.json`` + ``report.md`` (when a report is given) and ``export.json``."""
    if plan is not None:
        (folder / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=1) + "\n")
    summary = {
        "formats": list(result.formats),
        "loader": result.loader,
        "onnx_exporter": result.onnx_exporter,
        "onnx_inputs": list(spec.inputs) if "onnx" in result.formats else None,
        "onnx_output": spec.output if "onnx" in result.formats else None,
        "verified_in_fresh_process": result.reloaded_ok,
        "max_abs_diff": result.max_abs_diff,
        "tolerance": result.tolerance,
        "probe_shape": [PROBE_BATCH] + ([*spec.image] if spec.vision else [PROBE_SEQ]),
        "kept_widths": [block.width for block in ffn_blocks(model)],
        "class_note": carrier_note(model.config),
        "environment": Environment.here().__dict__,
    }
    (folder / EXPORT_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    lines = [render_markdown(report) if report is not None
             else f"# Pruned {type(model).__name__}\n\nNo run report was given to save_pruned.\n"]
    lines += _loading_markdown(summary)
    (folder / REPORT_MD).write_text("\n".join(lines))
    if report is not None:
        (folder / REPORT_FILE).write_text(report.to_json() + "\n")


def _loading_markdown(summary: dict[str, Any]) -> list[str]:
    lines = ["## Loading", ""]
    if summary.get("class_note"):
        lines += [summary["class_note"], ""]
    if "hf" in summary["formats"]:
        if summary["loader"] == "transformers":
            lines += ["Every layer has the same width: plain `transformers` loads this folder.", "",
                      "```python", "import transformers",
                      "cfg = transformers.AutoConfig.from_pretrained(folder)",
                      "model = getattr(transformers, cfg.architectures[0]).from_pretrained(folder)", "```"]
        else:
            lines += ["The FFN widths are recorded in `kcm_ffn_widths` (`config.json`), which stock `transformers` "
                      "does not read (layers of different widths, or a width the stock config cannot state, as "
                      "DINOv2's integer `mlp_ratio`); load with:", "",
                      "```python", "from kcm_core import load_pruned", "model = load_pruned(folder)", "```"]
    if "onnx" in summary["formats"]:
        lines += ["", f"`{ONNX_FILE}` ({summary['onnx_exporter']} exporter): inputs "
                  f"{', '.join(f'`{n}`' for n in summary['onnx_inputs'])} with dynamic batch"
                  + ("" if summary["onnx_inputs"] == ["pixel_values"] else " and sequence")
                  + f" axes; output `{summary['onnx_output']}`.", "",
                  "```python", "import onnxruntime as ort",
                  f"session = ort.InferenceSession(folder + '/{ONNX_FILE}', providers=['CPUExecutionProvider'])",
                  "```"]
    lines += ["", "## Verification", ""]
    if summary["verified_in_fresh_process"]:
        diffs = ", ".join(f"{k}: {v:.2e}" for k, v in summary["max_abs_diff"].items())
        lines.append(f"Reloaded in a fresh process and compared with the in-memory model on a probe "
                     f"of shape {summary['probe_shape']}: max abs difference {diffs} "
                     f"(tolerance {summary['tolerance']:g}).")
    else:
        lines.append("Not verified (verify=False).")
    return lines + [""]
