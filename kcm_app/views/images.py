"""Image classifiers on the pages: test images with the unpruned and the pruned prediction (the ones whose
prediction changed first and marked), and a few sample images with their labels. The pictures are the
evaluation batches themselves, turned back from the model's normalisation into pixels, so what is shown is
exactly what the model read."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import streamlit as st
import torch

GRID_IMAGES = 24
COLUMNS = 8


def to_pixels(pixel_values: torch.Tensor, processor: Any) -> np.ndarray:
    """``(B, C, H, W)`` normalised model input back to ``(B, H, W, C)`` uint8 pixels (``(B, H, W)`` for one
    channel), undoing the image processor's mean / std and rescale."""
    mean = torch.tensor(getattr(processor, "image_mean", None) or [0.0] * pixel_values.shape[1])
    std = torch.tensor(getattr(processor, "image_std", None) or [1.0] * pixel_values.shape[1])
    x = pixel_values.float() * std[None, :, None, None] + mean[None, :, None, None]    # (B, C, H, W) in [0, 1]
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()      # (B, H, W, C)
    return x[..., 0] if x.shape[-1] == 1 else x


def eval_images(batches: Sequence[dict[str, torch.Tensor]], processor: Any) -> tuple[np.ndarray, torch.Tensor | None]:
    """All evaluation images as pixels, and their labels (None without)."""
    pixels = np.concatenate([to_pixels(b["pixel_values"], processor) for b in batches])
    labels = torch.cat([b["labels"] for b in batches]) if all("labels" in b for b in batches) else None
    return pixels, labels


def grid_order(dense: torch.Tensor, pruned: torch.Tensor, limit: int = GRID_IMAGES) -> list[int]:
    """Indices to show: every image whose prediction changed (in test order), then unchanged ones, up to
    ``limit``."""
    changed = torch.nonzero(dense != pruned).flatten().tolist()
    same = torch.nonzero(dense == pruned).flatten().tolist()
    return (changed + same)[:limit]


def _name(id2label: dict, k: int) -> str:
    return str(id2label.get(k, id2label.get(str(k), k)))


def prediction_grid(ws, dense: torch.Tensor, pruned: torch.Tensor, budget: float) -> None:
    """The grid on the Prune page: each test image with the unpruned and the pruned prediction; a changed
    prediction is marked (red caption), a wrong one says so."""
    pixels, labels = eval_images(ws.eval_batches, ws.tokenizer)
    id2label = dict(ws.model.config.id2label or {})
    changed = int((dense != pruned).sum())
    st.subheader("Test images: unpruned vs pruned prediction")
    st.caption(f"At {budget:.2f} relative FLOPs the pruned model changes its prediction on {changed} of "
               f"{len(pruned)} test images; those come first, marked in red.")
    order = grid_order(dense, pruned)
    for row in range(0, len(order), COLUMNS):
        cols = st.columns(COLUMNS)
        for col, i in zip(cols, order[row:row + COLUMNS]):
            d, p = int(dense[i]), int(pruned[i])
            truth = f"true: {_name(id2label, int(labels[i]))}  \n" if labels is not None else ""
            text = f"{truth}unpruned: {_name(id2label, d)}  \npruned: {_name(id2label, p)}"
            col.image(pixels[i], width="stretch")
            col.caption(f":red[**changed**]  \n{text}" if d != p else text)


def sample_images(ws, count: int = 8) -> None:
    """A few evaluation images with their labels (the Model page)."""
    pixels, labels = eval_images(ws.eval_batches[:1], ws.tokenizer)
    id2label = dict(ws.model.config.id2label or {})
    cols = st.columns(count)
    for i, col in enumerate(cols[:len(pixels)]):
        col.image(pixels[i], width="stretch")
        if labels is not None:
            col.caption(_name(id2label, int(labels[i])))
