"""The loaded model and data as one immutable value, and the session-private copy rule."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import nn

from kcm_core.arch import ModelShape
from kcm_core.flops import flops_floor
from kcm_core.runtime import Batch


@dataclass(frozen=True)
class Workspace:
    """Everything one view needs about the loaded model and data. Built by ``kcm_app.resources``.

    ``model`` is shared by every session: read it, never change it (see ``kcm_app.engine``).
    """

    model_key: str
    model: nn.Module
    tokenizer: Any
    shape: ModelShape
    data_key: str                      # fingerprint of the samples, max_len and batching
    unlabeled: tuple[Batch, ...]       # the scoring sample, without labels
    labeled: tuple[Batch, ...] | None  # the same sample with labels (label-using methods)
    eval_batches: tuple[Batch, ...] | None
    seq_len: float                     # mean real tokens per sequence of the scoring sample
    info: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def has_labels(self) -> bool:
        return self.labeled is not None and self.eval_batches is not None

    @property
    def widths(self) -> list[int]:
        return list(self.shape.ffn_width)

    @property
    def floor(self) -> float:
        return flops_floor(self.shape, self.seq_len)


def private_copy(model: nn.Module) -> nn.Module:
    """A session-private deep copy, for core calls that register hooks."""
    return copy.deepcopy(model)


def take(batches: Sequence[Batch], sequences: int) -> list[Batch]:
    """The first batches holding at least ``sequences`` sequences (whole batches)."""
    out, n = [], 0
    for batch in batches:
        if n >= sequences:
            break
        out.append(batch)
        n += int(batch["input_ids"].shape[0])
    return out
