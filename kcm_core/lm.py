"""Causal language models: text as fixed-length token blocks, and the label-free measures of a pruned
LM against the unpruned one on the same blocks.

- ``split_blocks`` turns documents into disjoint calibration and evaluation blocks of ``block_size``
  tokens (documents joined by the end-of-text token, the remainder dropped), so calibration never
  sees an evaluation token.
- ``evaluate_lm`` measures held-out **perplexity** (exp of the token-weighted mean negative
  log-likelihood of the next token), and with a reference model the **agreement** (share of positions
  where both predict the same next token, top-1) and the **mean KL divergence** KL(reference || model)
  of the next-token distributions. Intervals resample blocks (percentile bootstrap, seeded); the
  pruned-minus-unpruned comparison is paired over the same blocks (``paired_perplexity``).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import TextData
from .runtime import Batch, Progress, check_finite, eval_mode, model_device, tell

DEFAULT_BLOCK_SIZE = 256
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx")


def context_length(config) -> int | None:
    """How many positions the model takes (None when its config sets no limit)."""
    for name in POSITION_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_block_size(config, block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block size must be an integer of at least 2 tokens, got {block_size!r}")
    limit = context_length(config)
    if limit is not None and block_size > limit:
        raise ValueError(f"block size {block_size} is longer than the model's context of {limit} "
                         f"positions; choose --block-size {limit} or less")


def token_stream(data: TextData, tokenizer) -> list[int]:
    """All documents' tokens, each document followed by the end-of-text token (when there is one)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for text in data.texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
    return ids


def blocks_of(ids: Sequence[int], block_size: int, batch_size: int = 8,
              max_blocks: int | None = None) -> list[Batch]:
    """Consecutive blocks of ``block_size`` tokens (the remainder dropped), batched: ``input_ids`` and
    an all-ones ``attention_mask`` of shape (B, block_size)."""
    count = len(ids) // block_size
    if max_blocks is not None:
        count = min(count, max_blocks)
    if count == 0:
        raise ValueError(f"the text holds {len(ids)} tokens, fewer than one block of {block_size}; "
                         "give more text or a smaller --block-size")
    blocks = torch.tensor(list(ids[:count * block_size]), dtype=torch.long).view(count, block_size)
    return [{"input_ids": blocks[i:i + batch_size], "attention_mask": torch.ones_like(blocks[i:i + batch_size])}
            for i in range(0, count, batch_size)]


def split_blocks(calibration: TextData, evaluation: TextData, tokenizer, block_size: int, *,
                 calibration_blocks: int | None = None, evaluation_blocks: int | None = None,
                 batch_size: int = 8) -> tuple[list[Batch], list[Batch]]:
    """Calibration and evaluation blocks from two disjoint sets of documents. When both are the same
    data, its documents are split in two halves first (the first for calibration), so no token is
    in both."""
    held_out = ""
    if calibration is evaluation:
        half = len(calibration) // 2
        if half == 0:
            raise ValueError("one document cannot be split into calibration and evaluation text; give "
                             "more documents or a separate evaluation source")
        held_out = (f"the held-out half of the documents ({half + 1}-{len(calibration)} of {len(calibration)}; "
                    "the split is by document, not by length)")
        calibration, evaluation = calibration.subset(range(half)), calibration.subset(range(half, len(calibration)))
    cal = blocks_of(token_stream(calibration, tokenizer), block_size, batch_size, calibration_blocks)
    try:
        ev = blocks_of(token_stream(evaluation, tokenizer), block_size, batch_size, evaluation_blocks)
    except ValueError as err:
        if not held_out:
            raise
        raise ValueError(f"{held_out}: {err}; give more documents, or a separate evaluation source "
                         "(--eval-data)") from None
    return cal, ev


def check_token_ids(batches: Sequence[Batch], config) -> None:
    """``ValueError`` when the tokenizer produced ids the model has no embedding for."""
    vocab = getattr(config, "vocab_size", None)
    top = max((int(b["input_ids"].max()) for b in batches), default=-1)
    if isinstance(vocab, int) and top >= vocab:
        raise ValueError(f"the tokenizer produced token id {top}, but the model's vocabulary has {vocab} "
                         "entries: the tokenizer does not belong to this model")


# --------------------------------------------------------------------------- evaluation

@dataclass(frozen=True)
class BlockStats:
    """Per evaluation block: summed next-token NLL, predicted tokens, and (with a reference) the
    positions where both models agree and the summed KL(reference || model)."""

    nll: np.ndarray          # (blocks,)
    tokens: np.ndarray       # (blocks,)
    agree: np.ndarray | None
    kl: np.ndarray | None


@dataclass(frozen=True)
class LMMetric:
    value: float
    low: float
    high: float
    n: int                   # blocks

    def to_dict(self) -> dict:
        return {"value": self.value, "ci95": [self.low, self.high], "n": self.n}


@dataclass(frozen=True)
class LMEval:
    perplexity: LMMetric
    agreement: LMMetric | None
    kl: LMMetric | None
    stats: BlockStats

    def to_dict(self) -> dict:
        out = {"perplexity": self.perplexity.to_dict()}
        if self.agreement is not None:
            out["agreement"] = self.agreement.to_dict()
        if self.kl is not None:
            out["kl"] = self.kl.to_dict()
        return out


RESAMPLES = 1000


def _block_bootstrap(num: np.ndarray, den: np.ndarray, transform, seed: int) -> tuple[float, float]:
    """Percentile interval of ``transform(sum(num) / sum(den))`` over blocks resampled with replacement."""
    n = len(num)
    if n < 2:
        value = transform(num.sum() / den.sum())
        return value, value
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(RESAMPLES, n))
    ratios = num[idx].sum(1) / den[idx].sum(1)
    values = transform(ratios)
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def _metric(num: np.ndarray, den: np.ndarray, transform, seed: int) -> LMMetric:
    low, high = _block_bootstrap(num, den, transform, seed)
    return LMMetric(float(transform(num.sum() / den.sum())), low, high, int(len(num)))


@torch.no_grad()
def block_stats(model: nn.Module, batches: Sequence[Batch], reference: nn.Module | None = None,
                progress: Progress | None = None) -> BlockStats:
    """Run every block through ``model`` (and ``reference``) and sum the per-block statistics."""
    check_finite(model)
    device = model_device(model)
    nll, tokens, agree, kl = [], [], [], []
    with eval_mode(model), (eval_mode(reference) if reference is not None else contextlib.nullcontext()):
        for step, batch in enumerate(batches):
            ids = batch["input_ids"].to(device)                       # (B, T)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()   # (B, T-1, V)
            target, valid = ids[:, 1:], mask[:, 1:].bool()
            logp = F.log_softmax(logits, dim=-1)
            token_nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)             # (B, T-1)
            nll.append((token_nll * valid).sum(1).double().cpu())
            tokens.append(valid.sum(1).double().cpu())
            if reference is not None:
                ref_device = model_device(reference)
                ref = reference(input_ids=ids.to(ref_device),
                                attention_mask=mask.to(ref_device)).logits[:, :-1].float().to(device)
                ref_logp = F.log_softmax(ref, dim=-1)
                agree.append(((ref.argmax(-1) == logits.argmax(-1)) & valid).sum(1).double().cpu())
                token_kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)                   # (B, T-1)
                kl.append((token_kl * valid).sum(1).double().cpu())
            tell(progress, f"evaluating: block batch {step + 1}/{len(batches)}", (step + 1) / len(batches))
    if not nll:
        raise ValueError("no evaluation blocks: the evaluation text is empty")

    def cat(parts: list[torch.Tensor]) -> np.ndarray | None:
        return torch.cat(parts).numpy() if parts else None
    return BlockStats(cat(nll), cat(tokens), cat(agree), cat(kl))


def evaluate_lm(model: nn.Module, batches: Sequence[Batch], reference: nn.Module | None = None,
                seed: int = 0, progress: Progress | None = None) -> LMEval:
    """Perplexity of ``model`` on the blocks; with ``reference``, agreement and KL against it."""
    return summarise(block_stats(model, batches, reference, progress), seed)


def summarise(stats: BlockStats, seed: int = 0) -> LMEval:
    """The metrics of per-block statistics (the same numbers for the same stats and seed: a stored
    evaluation is rebuilt from its blocks)."""
    perplexity = _metric(stats.nll, stats.tokens, np.exp, seed)
    agreement = kl = None
    if stats.agree is not None:
        agreement = _metric(stats.agree, stats.tokens, lambda x: x, seed)
        kl = _metric(stats.kl, stats.tokens, lambda x: x, seed)
    return LMEval(perplexity, agreement, kl, stats)


@dataclass(frozen=True)
class PairedPerplexity:
    """Pruned against unpruned on the same blocks: the perplexity ratio with a paired interval.

    ``p_value`` tests "ratio = 1" by the same draws: twice the smaller share of draws on either side
    of 1, counted as ``(k + 1) / (RESAMPLES + 1)`` so it is never 0 (its floor is about 0.002 with
    1000 draws; report "p < 0.002" rather than a smaller number). None for a single block.
    """

    ratio: float             # perplexity(after) / perplexity(before)
    low: float
    high: float
    n: int
    p_value: float | None = None

    def to_dict(self) -> dict:
        return {"ratio": self.ratio, "ci95": [self.low, self.high], "n": self.n, "p_value": self.p_value}


def paired_perplexity(after: BlockStats, before: BlockStats, seed: int = 0) -> PairedPerplexity:
    """Resample blocks once for both models (the pairing): ratio of their perplexities per draw."""
    if len(after.nll) != len(before.nll) or not np.array_equal(after.tokens, before.tokens):
        raise ValueError("the two evaluations did not use the same blocks; compare them on the same text")
    n = len(after.nll)
    ratio = math.exp((after.nll.sum() - before.nll.sum()) / after.tokens.sum())
    if n < 2:
        return PairedPerplexity(ratio, ratio, ratio, n)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(RESAMPLES, n))
    draws = np.exp((after.nll[idx].sum(1) - before.nll[idx].sum(1)) / after.tokens[idx].sum(1))
    low, high = np.percentile(draws, [2.5, 97.5])
    return PairedPerplexity(ratio, float(low), float(high), n, bootstrap_p(draws, 1.0))


def bootstrap_p(draws: np.ndarray, null: float) -> float:
    """Two-sided bootstrap p of ``null`` from the draws of a statistic: twice the smaller share of
    draws at or beyond it on either side, with the +1 correction so it is never 0."""
    side = min(int((draws <= null).sum()), int((draws >= null).sum()))
    return min(1.0, 2 * (side + 1) / (len(draws) + 1))


def bootstrap_p_text(p: float, draws: int = RESAMPLES) -> str:
    """A bootstrap p for people: at its floor 2 / (draws + 1) it says "< 0.002", not a false digit."""
    floor = 2 / (draws + 1)
    return f"< {floor:.3f}" if p <= floor + 1e-12 else f"{p:.3g}"


def fit_generation(config, prompt_tokens: int, new_tokens: int) -> tuple[int, int]:
    """(prompt tokens to keep, the last ones; new tokens) that fit the model's positions together."""
    from .models import max_positions
    limit = max_positions(config)
    if limit is None or prompt_tokens + new_tokens <= limit:
        return prompt_tokens, new_tokens
    # the new tokens keep the room the prompt leaves, at least half the positions (then the prompt is cut)
    new = max(1, min(new_tokens, max(limit - prompt_tokens, limit // 2)))
    return min(prompt_tokens, max(1, limit - new)), new


def generation_note(model: nn.Module, tokenizer, prompt: str, new_tokens: int) -> str | None:
    """What ``generate`` leaves out of ``prompt`` to fit the model's positions, for people; None when all fits."""
    from .models import max_positions
    tokens = len(tokenizer(prompt)["input_ids"])
    kept, new = fit_generation(model.config, tokens, new_tokens)
    if (kept, new) == (tokens, new_tokens):
        return None
    fewer = f" and write {new} new tokens, not {new_tokens}" if new < new_tokens else ""
    return (f"The prompt ({tokens} tokens) and {new_tokens} new tokens exceed this model's "
            f"{max_positions(model.config)} positions: both models read only its last {kept} tokens{fewer}.")


def token_reporter(progress: Progress | None, prompt_tokens: int, new_tokens: int):
    """A ``transformers`` stopping criterion that never stops generation but reports each new token to
    ``progress`` ("new token 3/30"): a progress callback that raises (an abandoned job) ends the
    generation between two tokens."""
    from transformers import StoppingCriteria

    class TokenReporter(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            done = int(input_ids.shape[1]) - prompt_tokens
            tell(progress, f"new token {done}/{new_tokens}", done / max(new_tokens, 1))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    return TokenReporter()


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 40,
             progress: Progress | None = None) -> str:
    """Greedy continuation of ``prompt`` (deterministic): what a demo audience reads side by side.
    ``progress`` hears of every new token (``token_reporter``), and may stop the generation there by
    raising."""
    if not prompt.strip():
        raise ValueError("the prompt is empty; type a few words to continue")
    device = model_device(model)
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    # only what a causal LM takes (a BERT-style tokenizer adds token_type_ids, which generate refuses)
    enc = {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}
    # past the position table a GPT-2 fails with an IndexError: keep the prompt's last tokens that fit
    kept, max_new_tokens = fit_generation(model.config, int(enc["input_ids"].shape[1]), max_new_tokens)
    enc = {k: v[:, -kept:] for k, v in enc.items()}
    pad = getattr(tokenizer, "pad_token_id", None) or getattr(tokenizer, "eos_token_id", None)
    extra = {}
    if progress is not None:
        from transformers import StoppingCriteriaList
        extra["stopping_criteria"] = StoppingCriteriaList(
            [token_reporter(progress, int(enc["input_ids"].shape[1]), max_new_tokens)])
    with eval_mode(model):
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, **extra)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
