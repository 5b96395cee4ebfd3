"""Reload an export in a fresh Python process and compare it with the in-memory model on the probe."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping

import numpy as np

from . import reload_check
from .files import PROBE_FILE, PROBE_OUT_FILE
from .probe import IOSpec

VERIFY_TIMEOUT_S = 900           # one fresh process loads and runs every format of one export
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def verify(folder: Path, formats: tuple[str, ...], loader: str, spec: IOSpec,
           probe: Mapping[str, np.ndarray], expected: np.ndarray, tolerance: float) -> dict[str, float]:
    """Max absolute difference per format; ``ValueError`` when a reload fails or exceeds ``tolerance``."""
    np.savez(folder / PROBE_FILE, **probe)
    jobs = [(fmt, loader if fmt == "hf" else "onnxruntime", spec.output) for fmt in formats]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "KCM_VERIFY_PARENT": str(os.getpid())}   # the child dies with us
    command = [sys.executable, "-I", reload_check.__file__, str(folder), json.dumps(jobs), str(PROJECT_ROOT)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=VERIFY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ValueError(f"reloading the export in a fresh process took over {VERIFY_TIMEOUT_S} s; "
                         "nothing was written") from None
    if done.returncode != 0:
        raise ValueError(f"the export in {folder.name} failed to reload in a fresh process:\n"
                         f"{done.stderr.strip()[-2000:]}")
    notes = json.loads(done.stdout.strip().splitlines()[-1] or "{}")
    if notes.get("project_code_imported"):
        raise ValueError("loading the uniform-width export with stock transformers imported kcm_core")
    got = dict(np.load(folder / PROBE_OUT_FILE))
    diffs: dict[str, float] = {}
    for fmt in formats:
        if got[fmt].shape != expected.shape:
            raise ValueError(f"{fmt} export: reloaded output has shape {got[fmt].shape}, "
                             f"the in-memory model gives {expected.shape}")
        diffs[fmt] = float(np.abs(got[fmt].astype(np.float64) - expected.astype(np.float64)).max()) \
            if expected.size else 0.0
        if not diffs[fmt] <= tolerance:
            raise ValueError(f"{fmt} export differs from the in-memory model by {diffs[fmt]:.3g} "
                             f"(max abs on the probe; tolerance {tolerance:g}); nothing was written")
    return diffs
