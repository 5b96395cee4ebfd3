"""kcm_core.demos.finetune: a tiny BERT learns an easy task; the write is atomic; bad input is refused."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from transformers import AutoConfig

from conftest import save_tiny_encoder

import kcm_core.demos.finetune as F
from kcm_core.data import TextData
from kcm_core.demos.finetune import FinetuneConfig, finetune

WORDS = "good great fun bad awful dull film movie plot acting very not".split()
POS = ["good film", "great fun movie", "very good acting", "fun plot"] * 5
NEG = ["bad film", "awful dull movie", "very dull acting", "not good plot"] * 5
TRAIN = TextData(texts=tuple(POS + NEG), labels=(1,) * 20 + (0,) * 20, label_names=("neg", "pos"),
                 source="toy reviews")
# 40 steps at a high rate: enough for the tiny model to separate the two word sets.
FAST = FinetuneConfig(epochs=8, lr=3e-3, batch_size=8, max_len=16)


@pytest.fixture
def encoder(tmp_path: Path) -> Path:
    """A saved tiny base encoder (no head: finetune must add one) with its own tokenizer."""
    return save_tiny_encoder(tmp_path / "encoder", WORDS)


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir())


def test_finetune_learns_and_saves(encoder, tmp_path):
    out = tmp_path / "clf"
    seen: list[float] = []
    start = time.perf_counter()
    summary = finetune(str(encoder), TRAIN, out, FAST, eval_data=TRAIN,
                       progress=lambda message, fraction: seen.append(fraction))
    elapsed = time.perf_counter() - start
    assert summary["test_accuracy"] == 1.0
    assert summary["train_examples"] == 40 and summary["num_labels"] == 2
    assert summary["out_dir"] == str(out) and summary["config"]["epochs"] == 8
    assert 0 < summary["wall_seconds"] <= elapsed + 0.005          # this call's own time (rounded to 0.01)
    assert seen == sorted(seen) and seen[-1] == 1.0
    config = AutoConfig.from_pretrained(out)
    assert config.architectures == ["BertForSequenceClassification"]
    assert config.id2label == {0: "neg", 1: "pos"} and config.label2id == {"neg": 0, "pos": 1}
    assert {"config.json", "model.safetensors", "tokenizer.json", "finetune.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "finetune.json").read_text())["test_accuracy"] == 1.0
    assert siblings(out) == ["clf", "encoder", "vocab.txt"]          # no temporary folder left


def test_same_seed_same_model(encoder, tmp_path):
    cfg = FinetuneConfig(epochs=1, lr=1e-3, batch_size=8, max_len=16, seed=3)
    a = finetune(str(encoder), TRAIN, tmp_path / "a", cfg)
    b = finetune(str(encoder), TRAIN, tmp_path / "b", cfg)
    assert a["final_loss"] == b["final_loss"] and a["test_accuracy"] is None


def test_refuses_existing_folder_unless_overwrite(encoder, tmp_path):
    # overwrite replaces an earlier fine-tune output only: someone's folder is never touched
    out = tmp_path / "clf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cfg = FinetuneConfig(epochs=1, batch_size=16, max_len=16)
    with pytest.raises(ValueError, match="already exists; choose another or pass overwrite=True"):
        finetune(str(encoder), TRAIN, out, cfg)
    with pytest.raises(ValueError, match="is not an earlier fine-tune output"):
        finetune(str(encoder), TRAIN, out, cfg, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    done = tmp_path / "done"
    finetune(str(encoder), TRAIN, done, cfg)
    (done / "stale.txt").write_text("from the first run")
    finetune(str(encoder), TRAIN, done, cfg, overwrite=True)
    assert not (done / "stale.txt").exists() and (done / "finetune.json").is_file()
    assert siblings(out) == ["clf", "done", "encoder", "vocab.txt"]


def test_failed_save_leaves_nothing(encoder, tmp_path, monkeypatch):
    def broken(model, tokenizer, summary, folder):
        (folder / "partial.bin").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(F, "_save", broken)
    out = tmp_path / "clf"
    with pytest.raises(OSError, match="disk full"):
        finetune(str(encoder), TRAIN, out, FinetuneConfig(epochs=1, batch_size=16, max_len=16))
    assert siblings(out) == ["encoder", "vocab.txt"]


def test_eval_labels_are_aligned_by_name(encoder, tmp_path):
    only_pos = TextData(texts=("good film", "great fun"), labels=(0, 0), label_names=("pos",))
    summary = finetune(str(encoder), TRAIN, tmp_path / "clf", FAST, eval_data=only_pos)
    assert summary["test_accuracy"] == 1.0          # "pos" is label 1 of the model, not 0


@pytest.mark.parametrize("data, message", [
    (TextData(texts=("a", "b")), "has no labels"),
    (TextData(texts=("a", "b"), labels=(1, 1), label_names=("neg", "pos")), "at least two classes"),
])
def test_needs_two_labeled_classes(encoder, tmp_path, data, message):
    with pytest.raises(ValueError, match=message):
        finetune(str(encoder), data, tmp_path / "clf")
    assert not (tmp_path / "clf").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, "epochs must be a positive integer, got 0"),
    ({"batch_size": 2.5}, "batch_size must be a positive integer, got 2.5"),
    ({"max_len": True}, "max_len must be a positive integer, got True"),
    ({"lr": 0}, "lr must be a positive number, got 0"),
    ({"lr": float("nan")}, "lr must be a positive number"),
    ({"weight_decay": -0.1}, r"weight_decay must be >= 0, got -0.1"),
    ({"warmup_ratio": 1.0}, r"warmup_ratio must be in \[0, 1\), got 1.0"),
    ({"seed": "0"}, "seed must be an integer"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(**kwargs)


def test_warmup_then_linear_decay():
    assert [F._lr_factor(s, 2, 10) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
