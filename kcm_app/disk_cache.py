"""Results that outlive the server process: the slow score components (kernel hull fits, activation
statistics, Fisher gradients), UMAP projections, and a classifier's evaluations (the unpruned model's
predictions, each evaluated budget: ``kcm_app.engine.evaluations``), kept on disk so a restarted app
shows them at once.

Keys are content, never names: the SHA-256 of the model's weights (``weights_hash``), the scoring
sample's fingerprint (``Workspace.data_key``) and the options (a frozen config's ``repr``). Files live
in a versioned folder under the user cache dir (``$KCM_CACHE_DIR`` or ``~/.cache/kcm-explorer``,
``app-cache/v1``); bump ``VERSION`` when a stored layout or a computation changes meaning.

Several sessions and several server processes may share the folder: a file is written to a
temporary sibling and renamed into place (a reader sees a whole file or none; two writers of one key
write the same bytes), and a file that cannot be read is treated as absent and computed again. Files
hold plain tensors, numbers and strings only, read with ``torch.load(weights_only=True)``. The cache
is optional: a failed write (full disk, read-only folder) is logged and the result is still returned.

The serialisation lives here, not in the records: the engine hands over and gets back its typed
results (hull fits, activation statistics, gradients, UMAP coordinates, a ``ClassifierEval``, a
``BudgetResult`` with the library's ``Rate`` / ``LMMetric`` / ``PairedPerplexity``), and the
``encode_*`` / ``decode_*`` pairs below say what each kind's file holds.
A file of an older layout decodes when it can and is otherwise treated as absent (never an error).
No Streamlit here.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from torch import nn

from kcm_core.activations import NeuronStats
from kcm_core.atomic import remove, temporary_sibling
from kcm_core.demos.classifier import cache_root
from kcm_core.evaluate import ClassifierEval, Rate
from kcm_core.hull import HullFit
from kcm_core.lm import BlockStats, LMMetric, PairedPerplexity, summarise
from kcm_core.methods import ScoreDetails
from kcm_core.plan import KeepPlan

from .live import log
from .records import BudgetResult

T = TypeVar("T")
VERSION = 1
# What a decoder raises on a file of another layout (a missing key, a dict where a string was, a number
# that is not one): the file is then treated as absent and the result computed again.
LAYOUT_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError)


def root() -> Path:
    """The versioned folder (nothing is created here)."""
    return cache_root() / "app-cache" / f"v{VERSION}"


def weights_hash(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def checkpoint_hash(folder: str | os.PathLike) -> str:
    """A model folder opened layer by layer, without reading its weights (which may not fit in memory,
    and hashing them all would read every byte): SHA-256 over each safetensors file's name, size,
    modification time and header (the tensor names, dtypes, shapes and offsets), and ``config.json``.
    Saving the weights again changes the modification time, so the key changes with them."""
    h = hashlib.sha256(b"layer-by-layer|")
    folder = Path(folder)
    for path in sorted(folder.glob("*.safetensors")) + [folder / "config.json"]:
        info = path.stat()
        h.update(f"{path.name}|{info.st_size}|{info.st_mtime_ns}|".encode())
        with path.open("rb") as f:
            if path.suffix == ".safetensors":
                length = int.from_bytes(f.read(8), "little")
                h.update(f.read(min(length, 100 * 2**20)))
            else:
                h.update(f.read())
    return h.hexdigest()


def path_for(kind: str, parts: tuple) -> Path:
    """Where the result of ``kind`` for ``parts`` (hashable, with a stable ``repr``) is kept."""
    digest = hashlib.sha256(repr((VERSION, kind) + tuple(parts)).encode()).hexdigest()[:32]
    return root() / kind / f"{digest}.pt"


def read(kind: str, parts: tuple) -> Any | None:
    """The stored payload, or None when absent or unreadable (then it is computed again)."""
    path = path_for(kind, parts)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:            # damaged, truncated or from another layout: recompute
        log.warning("ignoring unreadable cache file %s (%s)", path, err)
        return None


def write(kind: str, parts: tuple, payload: Any) -> None:
    """Store ``payload`` atomically (temporary sibling, then a rename); a failure is only logged."""
    path = path_for(kind, parts)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(path)
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not write the cache file %s (%s); the result is kept in memory only", path, err)
        if tmp is not None:
            remove(tmp)


def cached(kind: str, parts: tuple, compute: Callable[[], T], encode: Callable[[T], Any],
           decode: Callable[[Any], T]) -> T:
    """The stored result of ``kind`` for ``parts``, else ``compute()`` stored for next time.

    ``parts[0]`` is the model's ``weights_hash``; without one (a workspace built without hashing its
    weights) nothing is read or written: two such models would share one key."""
    if not parts or not parts[0]:
        return compute()
    payload = read(kind, parts)
    if payload is not None:
        try:
            value = decode(payload)
            log.info("read %s from disk", kind)
            return value
        except LAYOUT_ERRORS as err:
            log.warning("ignoring a %s cache file of another layout (%s)", kind, err)
    value = compute()
    log.info("computed %s", kind)
    write(kind, parts, encode(value))
    return value


def usage() -> tuple[int, int]:
    """(files, bytes) under the cache folder, every version."""
    files = size = 0
    base = root().parent
    if base.is_dir():
        for path in base.rglob("*.pt"):
            files += 1
            size += path.stat().st_size
    return files, size


def clear_all() -> int:
    """Remove every cached result (all versions); returns how many files there were."""
    files, _ = usage()
    shutil.rmtree(root().parent, ignore_errors=True)
    return files


# --------------------------------------------------------------------------- what each kind's file holds

def encode_fits(value: tuple[list[torch.Tensor], list[HullFit]]) -> dict:
    """R2's kernel hull fits, one per layer (kind ``r2``); the scores are each fit's own."""
    return {"fits": [asdict(fit) for fit in value[1]]}


def decode_fits(payload: dict) -> tuple[list[torch.Tensor], list[HullFit]]:
    fits = [HullFit(**fit) for fit in payload["fits"]]
    return [fit.scores for fit in fits], fits


def encode_stats(stats: NeuronStats) -> dict:
    """Every neuron's activation statistics (kind ``stats``): its fields, tuples as lists."""
    return {f.name: list(v) if isinstance(v, tuple) else v
            for f in fields(NeuronStats) for v in [getattr(stats, f.name)]}


def decode_stats(payload: dict) -> NeuronStats:
    return NeuronStats(**{name: tuple(v) if isinstance(v, list) else v for name, v in payload.items()})


def encode_grads(grads: list[torch.Tensor]) -> dict:
    """Fisher importance per layer (kind ``grads``)."""
    return {"grads": list(grads)}


def decode_grads(payload: dict) -> list[torch.Tensor]:
    return list(payload["grads"])


def encode_coords(coords: np.ndarray) -> dict:
    """A layer's 2-D UMAP coordinates (kind ``umap``)."""
    return {"coords": torch.from_numpy(np.ascontiguousarray(coords))}


def decode_coords(payload: dict) -> np.ndarray:
    return payload["coords"].numpy()


def _estimate_fields(estimate: Rate | LMMetric | None) -> dict | None:
    """A measured value with its 95% interval: ``{"value", "ci95": [low, high], "n"}`` (None stays None)."""
    if estimate is None:
        return None
    return {"value": estimate.value, "ci95": [estimate.low, estimate.high], "n": estimate.n}


def _estimate(stored: dict | None, record: type[Rate] | type[LMMetric]) -> Rate | LMMetric | None:
    if stored is None:
        return None
    low, high = stored["ci95"]
    return record(float(stored["value"]), float(low), float(high), int(stored["n"]))


def encode_reference(value: tuple[ClassifierEval, float]) -> dict:
    """The unpruned classifier's evaluation and its wall time (kind ``dense``)."""
    result, seconds = value
    rates = {"accuracy": _estimate_fields(result.accuracy), "agreement": _estimate_fields(result.agreement)}
    return {"predictions": result.predictions, "hits": result.hits, "rates": json.dumps(rates), "seconds": seconds}


def decode_reference(payload: dict) -> tuple[ClassifierEval, float]:
    rates = json.loads(payload["rates"])
    return (ClassifierEval(accuracy=_estimate(rates["accuracy"], Rate), agreement=_estimate(rates["agreement"], Rate),
                           predictions=payload["predictions"], hits=payload["hits"]), float(payload["seconds"]))


def encode_budget(result: BudgetResult) -> dict:
    """One evaluated budget (kinds ``budget`` and ``budget-lm``). A language model's per-block statistics
    are kept, and its metrics rebuilt from them on reading (``kcm_core.lm.summarise``, the same seed)."""
    paired = result.paired
    return {"method": result.method, "budget": result.budget, "seed": result.seed, "plan": result.plan.to_json(),
            "relative_flops": result.relative_flops, "params_after": result.params_after,
            "accuracy": json.dumps(_estimate_fields(result.accuracy)),
            "agreement": json.dumps(_estimate_fields(result.agreement)),
            "seconds": json.dumps(result.seconds), "details": json.dumps(result.details.to_dict()),
            "predictions": result.predictions,
            "perplexity": json.dumps(_estimate_fields(result.perplexity)), "kl": json.dumps(_estimate_fields(result.kl)),
            "lm_stats": None if result.lm is None else {
                k: None if v is None else torch.from_numpy(v) for k, v in vars(result.lm.stats).items()},
            "paired": None if paired is None else json.dumps(
                {"ratio": paired.ratio, "ci95": [paired.low, paired.high], "n": paired.n, "p_value": paired.p_value}),
            # a refitted plan's rows (kcm_core.repair) are tensors, not JSON: kept beside it
            "rows": [layer.rows for layer in result.plan.layers] if result.plan.has_rows else None}


def decode_budget(payload: dict, seed: int = 0) -> BudgetResult:
    """``encode_budget``'s payload back as a ``BudgetResult``; ``seed`` is the one the language model's
    intervals were drawn with (part of the file's key)."""
    details = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(payload["details"]).items()}
    common = dict(method=payload["method"], budget=float(payload["budget"]), seed=int(payload["seed"]),
                  plan=_plan_with_rows(KeepPlan.from_json(payload["plan"]), payload.get("rows")),
                  relative_flops=float(payload["relative_flops"]), params_after=int(payload["params_after"]),
                  seconds=json.loads(payload["seconds"]), details=ScoreDetails(**details),
                  predictions=payload["predictions"])
    if payload.get("lm_stats") is None:
        return BudgetResult(accuracy=_estimate(json.loads(payload["accuracy"]), Rate),
                            agreement=_estimate(json.loads(payload["agreement"]), Rate), **common)
    stats = BlockStats(**{k: None if v is None else v.numpy() for k, v in payload["lm_stats"].items()})
    lm = summarise(stats, seed)
    stored = json.loads(payload["paired"])
    low, high = stored["ci95"]
    paired = PairedPerplexity(float(stored["ratio"]), float(low), float(high), int(stored["n"]), stored["p_value"])
    return BudgetResult(accuracy=None, agreement=lm.agreement, perplexity=lm.perplexity, kl=lm.kl, lm=lm,
                        paired=paired, **common)


def _plan_with_rows(plan: KeepPlan, rows: list | None) -> KeepPlan:
    if not rows:
        return plan
    return replace(plan, layers=tuple(replace(layer, rows=r) for layer, r in zip(plan.layers, rows)))
