"""Export a pruned model so that it loads anywhere, and prove it before calling it done.

``save_pruned`` writes a physically sliced model (``kcm_core.realise.slice_model``) as

- ``"hf"``: safetensors weights, ``config.json`` and the tokenizer via ``save_pretrained``, plus the plan
  (``kcm_plan.json``), the run's report (``report.json``, ``report.md``; ``kcm_core.report``) and
  ``export.json`` (what was verified, and how to load it). When every layer keeps the same width, the
  config's stock width field holds it and plain ``transformers`` loads the folder with no project code.
  When widths differ per layer (or a GPT-2 ``Conv1D`` layer is emptied, which stock code cannot run),
  the config also records ``kcm_ffn_widths`` and ``load_pruned(folder)`` loads it.
- ``"onnx"``: ``model.onnx`` with dynamic batch and sequence axes (``export.onnx``).

Every export is written into a temporary sibling folder (``kcm_core.atomic``), reloaded in a fresh Python
process (``export.verify`` runs ``export/reload_check.py``), run on a fixed probe input (``export.probe``)
and compared with the in-memory model; only then is the folder renamed into place.

Modules: ``saving`` (save_pruned), ``loading`` (load_pruned), ``onnx``, ``probe``, ``verify`` and
``reload_check`` (the fresh-process side), ``files`` (the names in an export folder).
"""
from .files import EXPORT_FILE, FORMATS, ONNX_FILE, PLAN_FILE, REPORT_FILE, REPORT_MD
from .loading import load_pruned
from .probe import TOLERANCE
from .saving import ExportResult, save_pruned

__all__ = ["EXPORT_FILE", "FORMATS", "ONNX_FILE", "PLAN_FILE", "REPORT_FILE", "REPORT_MD", "TOLERANCE",
           "ExportResult", "load_pruned", "save_pruned"]
