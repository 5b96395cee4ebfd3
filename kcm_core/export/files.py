"""The names of what an export folder holds (one place, read by saving, loading and verification)."""

FORMATS = ("hf", "onnx")
ONNX_FILE = "model.onnx"
PLAN_FILE = "kcm_plan.json"
REPORT_FILE = "report.json"
REPORT_MD = "report.md"
EXPORT_FILE = "export.json"
PROBE_FILE = ".kcm_probe.npz"           # written for the reload check, removed before the rename
PROBE_OUT_FILE = ".kcm_probe_out.npz"
