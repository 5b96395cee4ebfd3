"""The loaded model and data as one immutable value, and the session-private copy rule."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from kcm_core.arch import ModelShape
from kcm_core.flops import flops_floor
from kcm_core.methods import default_method
from kcm_core.runtime import Batch


@dataclass(frozen=True)
class WorkspaceInfo:
    """Where the loaded model and data came from, in words and counts (what the pages and the report
    show)."""

    model_path: str = ""          # the sidebar's model choice (a key: "demo:...", "local:<path>", ...)
    model_name: str = ""          # for people: "the embedded demo", a folder, a hub id
    data: str = ""                # the data choice, described
    data_source: str = ""         # the file or dataset the examples were read from
    sample: int = 0               # unlabeled sequences in the scoring sample
    eval_examples: int = 0        # labeled evaluation examples (0: no accuracy)
    eval_source: str = ""         # where the evaluation examples came from
    max_len: int = 0
    seed: int = 0
    labels: bool = False          # whether the scoring sample has labels
    asked: int = 0                # the sample size asked for (sequences or blocks); 0: not recorded


@dataclass(frozen=True)
class Workspace:
    """Everything one view needs about the loaded model and data. Built by ``kcm_app.resources``.

    ``model`` is shared by every session: read it, never change it (see ``kcm_app.engine``). A model
    opened layer by layer (``stream_dir`` set: for a model larger than memory) is the empty skeleton of
    ``kcm_core.streamed.skeleton``: its parameters are on the ``meta`` device, so it gives shapes and counts,
    and every computation reads its layers from ``stream_dir`` one at a time (``skeleton``).
    """

    model_key: str
    model: nn.Module
    tokenizer: Any
    shape: ModelShape
    data_key: str                      # fingerprint of the samples, max_len and batching
    unlabeled: tuple[Batch, ...]       # the scoring sample, without labels (an LM: calibration blocks)
    labeled: tuple[Batch, ...] | None  # the same sample with labels (label-using methods)
    eval_batches: tuple[Batch, ...] | None   # labeled test batches (an LM: held-out blocks)
    seq_len: float                     # mean real tokens per sequence of the scoring sample (an LM: block size)
    info: WorkspaceInfo = field(default_factory=WorkspaceInfo, compare=False, hash=False)
    weights_hash: str = ""             # SHA-256 of the weights: the disk cache's model key (kcm_app.disk_cache)
    stream_dir: str = ""               # the folder read layer by layer; "" when the model is in memory

    @property
    def streamed(self) -> bool:
        """Opened layer by layer: scores, projections and the export read one layer at a time; nothing
        runs the whole model (no accuracy, perplexity, timing or generation)."""
        return bool(self.stream_dir)

    @property
    def is_lm(self) -> bool:
        """A causal language model: blocks instead of sentences, perplexity instead of accuracy."""
        return self.shape.head == "lm"

    @property
    def default_method(self) -> str:
        """The model kind's default method (``kcm_core.methods.default_method``)."""
        return default_method(self.is_lm, self.shape.vision)

    @property
    def has_labels(self) -> bool:
        return self.labeled is not None and self.eval_batches is not None

    @property
    def widths(self) -> list[int]:
        return list(self.shape.ffn_width)

    @property
    def floor(self) -> float:
        return flops_floor(self.shape, self.seq_len)


def skeleton(ws: Workspace):
    """A fresh ``kcm_core.streamed.skeleton.Skeleton`` of a streamed workspace's folder, private to the caller
    (filling a layer changes the skeleton, so a shared one would let two sessions' layers collide)."""
    from kcm_core.streamed.skeleton import Skeleton
    from kcm_core.runtime import default_device
    if not ws.streamed:
        raise ValueError("this model is in memory, not opened layer by layer")
    return Skeleton(ws.stream_dir, default_device())


def not_streamed(ws: Workspace, what: str) -> None:
    """Refuse ``what`` (a computation that runs the whole model) on a model opened layer by layer."""
    if ws.streamed:
        raise ValueError(f"{what} needs the whole model in memory, and this one is opened layer by layer "
                         "(larger than memory); export it and run `python -m kcm_core evaluate` on the "
                         "pruned folder where it fits")


def private_copy(model: nn.Module) -> nn.Module:
    """A session-private deep copy, for core calls that register hooks."""
    return copy.deepcopy(model)
