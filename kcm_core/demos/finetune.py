"""Fine-tune a sequence classifier on labeled ``TextData``: a plain, seeded AdamW loop.

Used to build the embedded demo and to give users a classifier to prune. Everything random is fixed
by ``FinetuneConfig.seed``: the new head's initialisation and dropout (``torch.manual_seed``) and the
shuffling (its own ``torch.Generator``). The result is written atomically: a temporary sibling folder
is filled and renamed into place, so an interrupted run never leaves a half-written model folder.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from ..atomic import atomic_folder, check_protected, check_replaceable, check_writable, disk_errors
from ..data import TextData, check_labels_for_model, labels_for_classes, make_batches, training_classes
from ..evaluate import labels_of, predict
from ..runtime import Progress, default_device, model_inputs, tell

# What makes a folder recognisably an earlier fine-tune output, the only thing ``overwrite`` replaces.
FINETUNE_MARKERS = ("finetune.json", "config.json")


@dataclass(frozen=True)
class FinetuneConfig:
    """Training hyper-parameters. The schedule is linear warm-up then linear decay to zero."""

    epochs: int = 2
    lr: float = 5e-5
    batch_size: int = 32
    max_len: int = 64
    seed: int = 0
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not _finite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not _finite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not _finite(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def finetune(model_path: str | os.PathLike, train: TextData, out_dir: str | os.PathLike,
             config: FinetuneConfig = FinetuneConfig(), eval_data: TextData | None = None,
             progress: Progress | None = None, *, overwrite: bool = False,
             protected: Sequence[str | os.PathLike] = ()) -> dict:
    """Train a ``num_labels = train.num_classes`` classifier from ``model_path``; save it to ``out_dir``.

    ``model_path`` is a model folder or hub id (a base encoder gets a fresh head; a classifier with a
    different label count has its head replaced). The label names of ``train`` become the model's
    ``id2label``. ``eval_data`` (labeled, same label names) is scored after training. ``out_dir`` is
    refused if it exists, unless ``overwrite`` and it is an earlier fine-tune output (holds
    ``finetune.json`` and ``config.json``); never a file, a link, or ``model_path`` and the
    ``protected`` paths (the data files), nor a folder inside or around them. Returns a JSON-ready summary.
    """
    from ..models import load_model
    if not isinstance(config, FinetuneConfig):
        raise ValueError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    if not train.has_labels:
        raise ValueError(f"{train.source or 'the training data'} has no labels; fine-tuning needs a "
                         "label column")
    # The training labels define the fresh head's classes (labels 1, 2 become classes "1", "2");
    # from here on their positions are the head's class ids.
    train = replace(training_classes(train), labels_by_name=False)
    num_labels = train.num_classes
    check_labels_for_model(train, num_labels)
    names = train.label_names or tuple(f"LABEL_{i}" for i in range(num_labels))
    if eval_data is not None:
        if not eval_data.has_labels:
            raise ValueError(f"{eval_data.source or 'the evaluation data'} has no labels to score against")
        # Matched to the new head exactly as a later `evaluate` of the saved model will match them.
        eval_data = labels_for_classes(eval_data, dict(enumerate(names)))
    out_dir = Path(out_dir).expanduser()
    check_output(out_dir, overwrite, [model_path, *protected])

    start = time.perf_counter()
    tell(progress, "fine-tune: loading model", 0.0)
    torch.manual_seed(config.seed)                # the new head's initialisation, then dropout
    model, tokenizer = load_model(
        model_path, task="sequence-classification", device=default_device(),
        config_updates={"num_labels": num_labels, "id2label": dict(enumerate(names)),
                        "label2id": {n: i for i, n in enumerate(names)}},
        allow_new_head=True)      # a fresh (or resized) head is the point of fine-tuning
    device = next(model.parameters()).device
    losses = _train(model, tokenizer, train, config, device, progress)

    accuracy = None
    if eval_data is not None:
        tell(progress, "fine-tune: evaluating", 0.95)
        accuracy = accuracy_of(model, make_batches(eval_data, tokenizer, max_len=config.max_len,
                                                   batch_size=config.batch_size))
    summary = {
        "out_dir": str(out_dir),
        "model_path": os.fspath(model_path),
        "train_examples": len(train),
        "train_source": train.source,
        "eval_examples": len(eval_data) if eval_data is not None else None,
        "eval_source": eval_data.source if eval_data is not None else None,
        "num_labels": num_labels,
        "label_names": list(names),
        "test_accuracy": accuracy,
        "final_loss": losses[-1] if losses else None,
        "device": str(device),
        "config": asdict(config),
    }
    tell(progress, "fine-tune: saving", 0.98)
    summary["wall_seconds"] = round(time.perf_counter() - start, 2)
    save_atomically(out_dir, lambda tmp: _save(model, tokenizer, summary, tmp), overwrite=overwrite)
    tell(progress, "fine-tune: done", 1.0)
    return summary


def _train(model, tokenizer, train: TextData, config: FinetuneConfig, device: torch.device,
           progress: Progress | None) -> list[float]:
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr)
    warmup = int(round(config.warmup_ratio * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, warmup, total))
    gen = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    model.train()
    step = 0
    for epoch in range(config.epochs):
        # A fresh order of every example each epoch, from one generator: a shuffle, not a subset
        # (subsets of n examples are drawn with TextData.sample).
        order = torch.randperm(len(train), generator=gen).tolist()
        batches = make_batches(train.subset(order), tokenizer, max_len=config.max_len,
                               batch_size=config.batch_size)
        for batch in batches:
            out = model(**model_inputs(batch, device), labels=batch["labels"].to(device))
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            losses.append(float(out.loss.detach()))
            tell(progress, f"fine-tune: epoch {epoch + 1}/{config.epochs}, step {step}/{total}, "
                           f"loss {losses[-1]:.3f}", 0.9 * step / total)
    model.eval()
    return losses


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Biases and normalisation weights get no weight decay (the usual BERT recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def accuracy_of(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Fraction of correct argmax predictions of a classifier over labeled ``batches``."""
    labels = labels_of(batches)
    if labels is None or labels.numel() == 0:
        raise ValueError("no labeled sequences to score")
    return int((predict(model, batches) == labels).sum()) / labels.numel()      # exact, as before


def _save(model, tokenizer, summary: dict, folder: Path) -> None:
    from ..runtime import quiet_transformers
    with quiet_transformers():
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    # Without out_dir: the folder may be renamed (the demo builds in a temporary folder).
    saved = {k: v for k, v in summary.items() if k != "out_dir"}
    (folder / "finetune.json").write_text(json.dumps(saved, indent=2) + "\n")


def check_output(out_dir: Path, overwrite: bool, protected: Sequence[str | os.PathLike] = ()) -> None:
    """Refuse, before training, an ``out_dir`` that overlaps what the run reads, exists (without
    ``overwrite``), is not an earlier fine-tune output, or cannot be written."""
    check_protected(out_dir, protected)
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise ValueError(f"output folder {out_dir} already exists; choose another or pass "
                             "overwrite=True")
        check_replaceable(out_dir, FINETUNE_MARKERS, kind="fine-tune output")
    check_writable(out_dir)


def save_atomically(out_dir: Path, write, *, overwrite: bool = False) -> None:
    """Call ``write(tmp)`` on a fresh temporary sibling of ``out_dir``, then rename it into place
    (``kcm_core.atomic.atomic_folder``: on any failure nothing is left and ``out_dir`` is untouched;
    a full disk becomes one ``ValueError``; overwrite replaces only an earlier fine-tune output)."""
    with disk_errors(out_dir), atomic_folder(out_dir, overwrite=overwrite,
                                             markers=FINETUNE_MARKERS) as tmp:
        write(tmp)
