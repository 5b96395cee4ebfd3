"""The fresh-process side of an export's verification: load each format the way a user would and run
it on the probe that ``export.verify`` left in the folder.

Run by path in isolated mode, ``python -I <this file> FOLDER JOBS ROOT`` (no current folder, no
PYTHONPATH), never as ``python -m kcm_core.export.reload_check``: ``-m`` would import the ``kcm_core``
package first, and the point of the stock job is to show that plain ``transformers`` loads a
uniform-width export with no project code. The stock job runs first and reports whether any project
module got imported; only the per-layer-widths job puts ROOT on the path and uses ``load_pruned``.
This file therefore imports nothing from the project at module level.
"""
import json
import sys


def run_job(folder: str, fmt: str, loader: str, output: str, root: str, probe: dict, notes: dict):
    """The output of one format on the probe, as float32 numpy."""
    import numpy as np
    if fmt == "onnx":
        import onnxruntime as ort
        session = ort.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"])
        feeds = {i.name: probe[i.name] for i in session.get_inputs()}
        return session.run(None, feeds)[0].astype(np.float32)
    import torch
    import transformers
    if loader == "transformers":
        cfg = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        model = getattr(transformers, cfg.architectures[0]).from_pretrained(folder, local_files_only=True)
        notes["project_code_imported"] = any(m.split(".")[0] == "kcm_core" for m in sys.modules)
    else:
        sys.path.insert(0, root)
        from kcm_core.export.loading import load_pruned
        model = load_pruned(folder)
    model.eval()
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    inputs = {k: torch.from_numpy(v) for k, v in probe.items()}
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        return getattr(model(**inputs), output).float().numpy()


def exit_with_parent() -> None:
    """End this process when the export that started it ends (``kill -9``, SIGTERM): otherwise it would
    keep a second copy of the model in memory while the next export deletes its folder. Linux's
    parent-death signal where it exists, and on any system a thread that watches the parent's pid
    (``KCM_VERIFY_PARENT``, set by ``export.verify``; read before anything slow)."""
    import os
    import threading
    import time
    parent = int(os.environ.get("KCM_VERIFY_PARENT") or os.getppid())
    try:
        import ctypes
        import signal
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))      # PR_SET_PDEATHSIG
    except (OSError, AttributeError, TypeError):
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def main(argv: list) -> None:
    exit_with_parent()
    import numpy as np
    folder, jobs, root = argv[0], json.loads(argv[1]), argv[2]
    probe = dict(np.load(folder + "/.kcm_probe.npz"))
    results, notes = {}, {}
    for fmt, loader, output in jobs:
        results[fmt] = run_job(folder, fmt, loader, output, root, probe, notes)
    np.savez(folder + "/.kcm_probe_out.npz", **results)
    print(json.dumps(notes))


if __name__ == "__main__":
    main(sys.argv[1:])
