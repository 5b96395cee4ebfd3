"""Small shared helpers: devices, batches, forward calls, progress callbacks, eval mode."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

Batch = Mapping[str, torch.Tensor]
# progress(message, fraction in [0, 1]); the library never prints, callers decide how to show it.
Progress = Callable[[str, float], None]

LABEL_KEYS = ("labels", "label")


def default_device() -> torch.device:
    """A GPU when one exists, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_inputs(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    """The batch without its labels, moved to ``device``."""
    return {k: v.to(device) for k, v in batch.items() if k not in LABEL_KEYS}


def token_mask(batch: Batch, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """(B, T) boolean mask of real tokens: the attention mask, or all True (images)."""
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones(shape[0], shape[1], dtype=torch.bool, device=device)
    return mask.to(device=device, dtype=torch.bool)


def check_finite(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the first parameter that holds NaN or infinite values."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(
                f"the model has NaN or infinite weights in {name!r}; it cannot be scored or pruned. "
                "Check the checkpoint (a failed training run or a bad conversion leaves such weights)."
            )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore its training flags afterwards."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


@contextlib.contextmanager
def hooks(handles: list) -> Iterator[None]:
    """Remove every hook handle in ``handles`` when the block ends, whatever happens in it."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        handles.clear()


def take_sequences(batches: Sequence[Batch] | None, sequences: int | None) -> list[Batch]:
    """The first whole batches that hold at least ``sequences`` sequences (all of them for None)."""
    if batches is None:
        return []
    if sequences is None:
        return list(batches)
    out, n = [], 0
    for batch in batches:
        if n >= sequences:
            break
        out.append(batch)
        n += int(next(iter(batch.values())).shape[0])
    return out


def tell(progress: Progress | None, message: str, fraction: float) -> None:
    if progress is not None:
        progress(message, max(0.0, min(1.0, fraction)))


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' progress bars and warnings for the block, then restore the caller's settings.

    The library reports through ``progress`` callbacks; "Loading weights" bars and the notice that a
    new classification head was initialised would otherwise land on the caller's stderr.
    """
    from transformers.utils import logging as hf_logging
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
