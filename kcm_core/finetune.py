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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .atomic import atomic_folder
from .data import TextData, align_labels, check_labels_for_model, make_batches
from .evaluate import labels_of, predict
from .runtime import Progress, default_device, model_inputs, tell


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
             progress: Progress | None = None, *, overwrite: bool = False) -> dict:
    """Train a ``num_labels = train.num_classes`` classifier from ``model_path``; save it to ``out_dir``.

    ``model_path`` is a model folder or hub id (a base encoder gets a fresh head; a classifier with a
    different label count has its head replaced). The label names of ``train`` become the model's
    ``id2label``. ``eval_data`` (labeled, same label names) is scored after training. ``out_dir`` is
    refused if it exists, unless ``overwrite``. Returns a JSON-ready summary.
    """
    from .models import load_model
    if not isinstance(config, FinetuneConfig):
        raise ValueError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    if not train.has_labels:
        raise ValueError(f"{train.source or 'the training data'} has no labels; fine-tuning needs a "
                         "label column")
    num_labels = train.num_classes
    check_labels_for_model(train, num_labels)
    if eval_data is not None:
        if not eval_data.has_labels:
            raise ValueError(f"{eval_data.source or 'the evaluation data'} has no labels to score against")
        eval_data = align_labels(eval_data, train.label_names)
        if eval_data.num_classes > num_labels:
            raise ValueError(f"{eval_data.source or 'the evaluation data'} has {eval_data.num_classes} "
                             f"classes but the training data has {num_labels}")
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not overwrite:
        raise ValueError(f"output folder {out_dir} already exists; choose another or pass overwrite=True")

    start = time.perf_counter()
    tell(progress, "fine-tune: loading model", 0.0)
    names = train.label_names or tuple(f"LABEL_{i}" for i in range(num_labels))
    torch.manual_seed(config.seed)                # the new head's initialisation, then dropout
    model, tokenizer = load_model(
        model_path, task="sequence-classification", device=default_device(),
        config_updates={"num_labels": num_labels, "id2label": dict(enumerate(names)),
                        "label2id": {n: i for i, n in enumerate(names)}},
        ignore_mismatched_sizes=True)
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
    from .models import quiet_transformers
    with quiet_transformers():
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    # Without out_dir: the folder may be renamed (the demo builds in a temporary folder).
    saved = {k: v for k, v in summary.items() if k != "out_dir"}
    (folder / "finetune.json").write_text(json.dumps(saved, indent=2) + "\n")


def save_atomically(out_dir: Path, write, *, overwrite: bool = False) -> None:
    """Call ``write(tmp)`` on a fresh temporary sibling of ``out_dir``, then rename it into place
    (``kcm_core.atomic.atomic_folder``: on any failure nothing is left and ``out_dir`` is untouched)."""
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        write(tmp)
