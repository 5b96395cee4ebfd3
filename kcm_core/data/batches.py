"""Batches: ``TextData`` tokenized with dynamic padding into the ``dict[str, Tensor]`` batches every other
module consumes (``make_batches``), and their average real length (``mean_length``).

Texts are cut to ``MAX_CHARS_PER_TEXT`` characters before the tokenizer sees them, and both sides of a
pair to what its truncation would keep (a fast tokenizer's own pair truncation is quadratic).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch

from ..runtime import Batch
from .readers import MAX_CHARS_PER_TEXT
from .text_data import TextData


def make_batches(data: TextData, tokenizer, *, max_len: int = 128, batch_size: int = 32,
                 with_labels: bool = True) -> list[dict[str, torch.Tensor]]:
    """Tokenize ``data`` in order into batches padded to each batch's longest sequence.

    Keys are whatever the tokenizer returns (``input_ids``, ``attention_mask``, ``token_type_ids``)
    plus ``labels`` (int64) when ``with_labels`` and the data has labels: class ids, so labels that
    only number their names (``labels_by_name``) are refused until ``labels_for_model`` has mapped
    them. Texts are cut to ``MAX_CHARS_PER_TEXT`` characters before tokenising. A tokenizer without a
    pad token (GPT-2) is copied and given its end-of-text token as pad; the caller's is never changed.
    """
    for name, value in (("max_len", max_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if len(data) == 0:
        raise ValueError("no texts to tokenize: the data is empty")
    if with_labels and data.labels_by_name:
        raise ValueError(f"the labels of {data.source or 'the data'} are names "
                         f"({', '.join(data.label_names[:5])}), not a model's class ids; map them with "
                         "kcm_core.data.labels_for_model(data, model.config) first")
    tokenizer = _with_pad_token(tokenizer)
    batches = []
    for start in range(0, len(data), batch_size):
        stop = start + batch_size
        pairs = list(data.text_pairs[start:stop]) if data.text_pairs is not None else None
        # Cut before tokenising: the tokenizer would otherwise split a huge text whole (MAX_CHARS_PER_TEXT).
        texts = [t[:MAX_CHARS_PER_TEXT] for t in data.texts[start:stop]]
        if pairs is not None:
            texts, pairs = _fit_pairs(tokenizer, texts, [t[:MAX_CHARS_PER_TEXT] for t in pairs], max_len)
        enc = tokenizer(texts, pairs, padding="longest", truncation=True, max_length=max_len,
                        return_tensors="pt")
        batch = {k: v for k, v in enc.items()}
        if with_labels and data.labels is not None:
            batch["labels"] = torch.tensor(data.labels[start:stop], dtype=torch.long)  # (B,)
        batches.append(batch)
    return batches


def _fit_pairs(tokenizer, texts: list[str], pairs: list[str], max_len: int) -> tuple[list[str], list[str]]:
    """Both sides of each pair cut to what the tokenizer's ``longest_first`` truncation keeps of them.

    Why: a fast tokenizer truncating a pair itself builds an overflow piece for every token it
    removes, so time and memory grow with the square of the length (two 100,000-character texts took
    over 20 GB). Cut here first, it removes at most a token at a boundary, and the result is the same.
    Slow tokenizers (no offsets) are left to truncate as they always have.
    """
    budget = max_len - tokenizer.num_special_tokens_to_add(pair=True)
    if not getattr(tokenizer, "is_fast", False) or budget < 2:
        return texts, pairs
    first, second = _token_ends(tokenizer, texts, max_len), _token_ends(tokenizer, pairs, max_len)
    cut_texts, cut_pairs = [], []
    for text, pair, ends_a, ends_b in zip(texts, pairs, first, second):
        keep_a, keep_b = _longest_first(len(ends_a), len(ends_b), budget)
        cut_texts.append(_cut_at(text, ends_a, keep_a, max_len))
        cut_pairs.append(_cut_at(pair, ends_b, keep_b, max_len))
    return cut_texts, cut_pairs


def _token_ends(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    """Character end of each of the first ``max_len`` tokens of every text (one sequence at a time,
    which truncates cheaply; lengths capped at ``max_len`` decide the pair rule just as well)."""
    enc = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_len,
                    return_offsets_mapping=True)
    return [[end for _, end in offsets] for offsets in enc["offset_mapping"]]


def _longest_first(a: int, b: int, budget: int) -> tuple[int, int]:
    """Tokens kept of a pair of ``a`` and ``b`` tokens under ``longest_first`` (the rule of Hugging
    Face ``tokenizers``: the shorter side whole if it fits in half, else both cut to about half)."""
    n1, n2, swap = (b, a, True) if a > b else (a, b, False)
    n2 = n1 if n1 > budget else max(n1, budget - n1)
    if n1 + n2 > budget:
        n1 = budget // 2
        n2 = n1 + budget % 2
    if swap:
        n1, n2 = n2, n1
    return min(a, n1), min(b, n2)


def _cut_at(text: str, ends: list[int], keep: int, max_len: int) -> str:
    if keep >= len(ends) and len(ends) < max_len:     # all of its tokens are kept
        return text
    return text[:ends[keep - 1]] if keep > 0 else ""


def _with_pad_token(tokenizer):
    if getattr(tokenizer, "pad_token", None) is not None:
        return tokenizer
    eos = getattr(tokenizer, "eos_token", None)
    if eos is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither a pad token nor an end-of-text token "
                         "to pad with; set tokenizer.pad_token first")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = eos
    return tokenizer


def mean_length(batches: Sequence[Batch]) -> float:
    """Average number of real tokens per sequence: the attention mask's ones, or every position of
    ``input_ids`` when a batch has no mask (as ``token_mask`` counts them); 0.0 for images."""
    tokens = sequences = 0
    for batch in batches:
        mask = batch.get("attention_mask")
        if mask is None:
            mask = batch.get("input_ids")
            if mask is None:
                return 0.0
            mask = torch.ones_like(mask)
        tokens += int(mask.sum())
        sequences += int(mask.shape[0])
    return tokens / sequences if sequences else 0.0
