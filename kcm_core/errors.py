"""Errors for people: what a failure to load or write is called, in one sentence.

Loading a model (``kcm_core.models``), a pruned folder (``kcm_core.export.loading``) or one layer of a
checkpoint (``kcm_core.streamed``) fails in the same few ways: a damaged or refused weights file, weights
that do not fit the config, a missing head. These helpers word them once; ``clear_error_types`` and
``one_line`` are how the CLI and the app tell bad input (one line) from a bug (a traceback).
"""
from __future__ import annotations

import errno
import os
import pickle
import re
from typing import Any, Mapping, Sequence

import torch

# Parts of a backbone that belong with a task head: a classifier trains them, masked-LM checkpoints
# lack them, so a fresh one is part of a new head (BERT's pooler).
HEAD_PARTS_IN_BASE = ("pooler",)
_KEYS_SHOWN = 3   # keys named in a loading error; the rest are counted


# --------------------------------------------------------------------------- errors for people

def clear_error_types() -> tuple[type[BaseException], ...]:
    """What bad input, a damaged or refused file, or a full or read-only disk raise. The CLI prints
    them as one line (exit 2), the app as ``st.error``; anything else is a bug and keeps its traceback."""
    from safetensors import SafetensorError
    return ValueError, OSError, SafetensorError, pickle.UnpicklingError


def one_line(err: BaseException) -> str:
    """``err`` as one line for a person: a full disk names the file being written, an OS error its
    path, a damaged weights file is worded as ``weights_error`` does (never torch's advice to unpickle
    with ``weights_only=False``), anything else its message on one line."""
    from safetensors import SafetensorError
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        where = err.filename or "the output"
        return f"no space left on device writing {where}; free some space or write elsewhere"
    if isinstance(err, OSError) and err.strerror and err.filename:      # raised by the OS itself
        return f"{err.strerror}: {err.filename}"
    if isinstance(err, (SafetensorError, pickle.UnpicklingError)):
        return str(weights_error("the model", err))
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return " ".join(lines) if isinstance(err, ValueError) else lines[0]


# --------------------------------------------------------------------------- what was loaded

def weights_error_types() -> tuple[type[BaseException], ...]:
    """What reading a damaged, refused or ill-fitting weights file raises (``weights_error`` words it).

    ``SafetensorError``: a truncated or corrupt ``model.safetensors``; ``UnpicklingError``: a
    ``pytorch_model.bin`` that ``torch.load(weights_only=True)`` refuses (damaged, or holding Python
    objects whose unpickling could run code); ``RuntimeError``: ``load_state_dict`` rejecting a tensor.
    """
    from safetensors import SafetensorError
    return SafetensorError, pickle.UnpicklingError, RuntimeError


def weights_error(location: str | os.PathLike, err: BaseException) -> ValueError:
    """One sentence for an exception of ``weights_error_types`` (never the 40-line original)."""
    from safetensors import SafetensorError
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if isinstance(err, SafetensorError):
        return ValueError(f"the weights file of {location} is damaged or incomplete (safetensors: "
                          f"{lines[0] if lines else 'unreadable'}); copy or download the model again")
    if isinstance(err, pickle.UnpicklingError):
        # torch's text advises weights_only=False or allowlisting the object, i.e. running the file's
        # code: never echo it, name only what the file asked for
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        detail = (f"it calls for the Python object {found.group(1)}" if found else
                  next((line for line in lines if line.startswith("Unsupported operand")),
                       "it is not a plain tensor file"))
        return ValueError(f"refused to load the pickled weights (pytorch_model.bin) of {location}: "
                          f"{detail.rstrip('.')}; it is damaged or holds Python objects whose loading could "
                          "run code, so use a trusted copy saved as model.safetensors")
    summary = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else "")
    return ValueError(f"the weights of {location} do not fit the model its config describes "
                      f"({type(err).__name__}: {summary[:300]}); fix config.json or save the model again")


def check_loading_info(model: torch.nn.Module, info: Mapping[str, Any], location: str | os.PathLike, *,
                       allow_new_head: bool = False, saved_as: str | None = None) -> None:
    """Refuse a model whose weights did not all come from its checkpoint (``output_loading_info``).

    Missing, unexpected or mismatched weights of the body (embeddings, layers) are always an error: a
    config with more layers than the weights, or edited sizes. Missing or mismatched *head* weights
    (``is_head_key``) are an error unless ``allow_new_head`` (a bare backbone may lack only its
    pooler, which nothing here reads). A head the checkpoint has and the model does not use is dropped
    only when the model is another class than ``saved_as`` (config.architectures: a masked-LM
    checkpoint loaded as its backbone, or a task asked for explicitly).
    """
    mismatched = sorted(info.get("mismatched_keys") or ())      # (key, file shape, model shape)
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    name = type(model).__name__
    _check_body(location, name,
                mismatched=[m for m in mismatched if not (allow_new_head and is_head_key(model, m[0]))],
                missing=[k for k in missing if not is_head_key(model, k)],
                unexpected=[k for k in unexpected if not is_head_key(model, k)])
    if allow_new_head:
        return
    if getattr(model, "base_model", model) is model:
        missing = [k for k in missing if k.split(".")[0] not in HEAD_PARTS_IN_BASE]
    if missing:
        raise _no_head_error(location, name, missing, saved_as)
    if unexpected and name == saved_as:
        raise ValueError(f"{location} holds head weights that {name} does not use ({_some(unexpected)}): "
                         "config.json names another class than the weights were saved as; restore it or ask "
                         "for the task explicitly")


def _check_body(location, name: str, *, mismatched: Sequence[tuple], missing: Sequence[str],
                unexpected: Sequence[str]) -> None:
    """The backbone's weights must match the config exactly: anything else would be random or lost."""
    if mismatched:
        key, saved, wanted = mismatched[0]
        raise ValueError(f"the weights of {location} do not have the shapes its config describes "
                         f"({len(mismatched)} tensors, e.g. {key}: {tuple(saved)} in the file, "
                         f"{tuple(wanted)} in {name}); restore the config.json saved with these weights")
    if missing:
        raise ValueError(f"{location} lacks weights that {name} needs ({_some(missing)}): its config "
                         "describes more than the checkpoint holds (more layers or other parts), so they "
                         "would be random; restore the config.json saved with these weights")
    if unexpected:
        raise ValueError(f"{location} holds weights that {name} does not use ({_some(unexpected)}): its "
                         "config describes less than the checkpoint holds (fewer layers or another "
                         "architecture); restore the config.json saved with these weights")


def _no_head_error(location, name: str, missing: Sequence[str], saved_as: str | None) -> ValueError:
    what = f"{location} has no weights for the head of {name} ({_some(missing)}), so it would be random"
    if saved_as and saved_as != name:
        return ValueError(f"{what}: load it as what it was saved as ({saved_as}, no task given), or pass "
                          "allow_new_head=True to add an untrained head for fine-tuning")
    return ValueError(f"{what}: its config.json names {name} but the checkpoint holds no such head; "
                      "restore the config saved with the weights, or fine-tune a head first "
                      "(python -m kcm_core finetune)")


def is_head_key(model: torch.nn.Module, key: str) -> bool:
    """True when ``key`` names a weight of a task head (``classifier.*``, ``score.*``, ``lm_head.*``,
    a pooler), not of the backbone: outside the base model's prefix, or in no module of the base model.
    """
    base = getattr(model, "base_model", model)
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    if base is not model:
        if not key.startswith(prefix):
            return True
        key = key[len(prefix):]
    elif key.startswith(prefix) and prefix != ".":
        key = key[len(prefix):]                   # a head checkpoint's key seen by its bare backbone
    first = key.split(".")[0]
    body = {n for n, _ in base.named_children()} | {n for n, _ in base.named_parameters(recurse=False)}
    return first in HEAD_PARTS_IN_BASE or first not in body


def _some(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_KEYS_SHOWN])
    return f"{shown} and {len(keys) - _KEYS_SHOWN} more" if len(keys) > _KEYS_SHOWN else shown
