"""Measured speed of a sliced plan against the unpruned model, on this machine, stored per budget.

Kept apart from the accuracy evaluation so the Prune page can show accuracy first and time after."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from kcm_core.pipeline import PruneConfig
from kcm_core.realise import slice_model
from kcm_core.runtime import Progress, model_inputs, tell

from ..store import SharedStore
from .evaluations import budget_key, evaluate_budget
from .workspace import Workspace, not_streamed

TIMING_BATCH = 16          # sequences per timed forward pass (measured speedup)
# blocks per timed pass for a causal LM: its logits alone take B x block x vocabulary floats
# (4 x 256 x 49,152 x 4 bytes = 200 MB on the LM demo; 16 blocks would be 800 MB per pass)
LM_TIMING_BATCH = 4
TIMING_REPEATS = 3


@dataclass(frozen=True)
class SpeedResult:
    """Forward time of the unpruned and the sliced model on the same batch (seconds, medians)."""

    dense_seconds: float
    pruned_seconds: float
    timed_on: str                    # what was timed, in words

    @property
    def measured_speedup(self) -> float:
        return self.dense_seconds / self.pruned_seconds if self.pruned_seconds else float("nan")


def timing_batch(ws: Workspace, length: int | None = None) -> dict[str, torch.Tensor]:
    """A fixed batch of ``TIMING_BATCH`` sequences (``LM_TIMING_BATCH`` blocks for a causal LM) of
    ``length`` tokens (default: the sample's mean)."""
    length = max(2, round(ws.seq_len if length is None else length))
    gen = torch.Generator().manual_seed(0)
    if ws.shape.vision:                  # images: the size the model was configured for (patches + 1 tokens)
        config = ws.model.config
        size = int(config.image_size)
        return {"pixel_values": torch.randn(TIMING_BATCH, int(getattr(config, "num_channels", 3)), size, size,
                                            generator=gen)}
    vocab = max(ws.shape.vocab_size, 2)
    ids = torch.randint(1, vocab, (LM_TIMING_BATCH if ws.is_lm else TIMING_BATCH, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def paired_seconds(dense: nn.Module, pruned: nn.Module, batch: dict[str, torch.Tensor],
                   repeats: int = TIMING_REPEATS, progress: Progress | None = None) -> tuple[float, float]:
    """Median forward time of each model, timed alternately so that a change in machine load
    (another session computing) hits both alike. ``progress`` hears before every forward pass (a
    warm-up pass each, then ``repeats`` rounds of two): a callback that raises (an abandoned job) stops
    the timing between two passes, not after all of them."""
    inputs = model_inputs(batch, next(dense.parameters()).device)
    times: dict[int, list[float]] = {0: [], 1: []}
    passes = 2 * (repeats + 1)
    with torch.inference_mode():
        for i, model in enumerate((dense, pruned)):
            tell(progress, f"warm-up pass {i + 1}/{passes}", i / passes)
            model(**inputs)
        for r in range(repeats):
            for i, model in enumerate((dense, pruned)):
                done = 2 + 2 * r + i
                tell(progress, f"pass {done + 1}/{passes}", done / passes)
                start = time.perf_counter()
                model(**inputs)
                times[i].append(time.perf_counter() - start)
    tell(progress, f"{passes} passes timed", 1.0)
    return statistics.median(times[0]), statistics.median(times[1])


def is_timed(ws: Workspace, config: PruneConfig, store: SharedStore) -> bool:
    return speed_key(ws, config) in store


def speed_key(ws: Workspace, config: PruneConfig) -> tuple:
    return ("speed",) + budget_key(ws, config)


def measure_speed(ws: Workspace, config: PruneConfig, store: SharedStore,
                  progress: Progress | None = None) -> SpeedResult:
    """Time the plan of ``config`` (evaluated first if it is not stored yet), sliced again from the
    shared model, against the unpruned model. ``progress`` hears of every timed pass; a callback that
    raises stops the timing there, and nothing is stored."""
    not_streamed(ws, "timing")

    def compute() -> SpeedResult:
        result = evaluate_budget(ws, config, store, progress)
        batch = timing_batch(ws)
        dense, pruned = paired_seconds(ws.model, slice_model(ws.model, result.plan), batch, progress=progress)
        shape = (batch["pixel_values"].shape[0], ws.shape.image_tokens) if ws.shape.vision else batch["input_ids"].shape
        timed_on = (f"a batch of {shape[0]} x {shape[1]} {'patch tokens' if ws.shape.vision else 'tokens'}, the two "
                    f"models timed alternately, median of {TIMING_REPEATS}")
        return SpeedResult(dense, pruned, timed_on)
    return store.get_or_compute(speed_key(ws, config), compute, progress)
