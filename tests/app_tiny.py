"""A tiny model folder and CSV for the app tests (never the network, never the real demo).

A ``BertForSequenceClassification`` with the suite's odd sizes (hidden 32, FFN 37, 2 layers, 4
heads) and a WordPiece tokenizer over a 99-entry vocabulary written here, plus a labeled CSV.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
import transformers as T

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
GOOD = ["good", "great", "fine", "lovely", "warm", "bright", "fun", "clever", "sharp", "moving"]
BAD = ["bad", "dull", "poor", "cold", "flat", "boring", "weak", "messy", "slow", "silly"]
OTHER = ["the", "a", "film", "movie", "plot", "cast", "story", "was", "is", "very", "quite", "and",
         "but", "not", "it", "this", "acting", "music", "script", "ending", "scenes", "of", "too"]


def vocabulary() -> list[str]:
    letters = list("abcdefghijklmnopqrstuvwxyz")
    pieces = ["##" + c for c in letters]
    words = SPECIAL + GOOD + BAD + OTHER + [".", ",", "!"] + letters + pieces
    words = list(dict.fromkeys(words))
    return words[:99]


def sentences(n: int, seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        pool = GOOD if label else BAD
        words = [rng.choice(OTHER) for _ in range(rng.randint(2, 9))] + [rng.choice(pool)]
        rng.shuffle(words)
        rows.append((" ".join(words) + " .", label))
    return rows


def write_tiny(folder: Path, rows: int = 96) -> tuple[Path, Path]:
    """Write ``folder/model`` (config, weights, tokenizer) and ``folder/data.csv``; return both."""
    model_dir, csv = folder / "model", folder / "data.csv"
    model_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(vocabulary()) + "\n")
    # transformers 5 takes the vocabulary as ``vocab=`` (``vocab_file=`` is silently ignored)
    tokenizer = T.BertTokenizerFast(vocab=str(vocab_file), do_lower_case=True)
    config = T.BertConfig(vocab_size=len(vocabulary()), hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
                          num_labels=2)
    torch.manual_seed(0)
    model = T.BertForSequenceClassification(config).eval()
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    lines = ["text,label"] + [f"{text},{label}" for text, label in sentences(rows)]
    csv.write_text("\n".join(lines) + "\n")
    return model_dir, csv
