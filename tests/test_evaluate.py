"""Evaluation: accuracy and agreement on a stub model with known predictions, the bootstrap interval,
and perplexity against a manual negative log-likelihood."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kcm_core.evaluate import (Rate, bootstrap_interval, evaluate_classifier, labels_of,
                               paired_difference, perplexity, predict)


class Echo(nn.Module):
    """Predicts the class stored in the first token: logits are one-hot of ``input_ids[:, 0]``."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.classes = classes
        self.anchor = nn.Parameter(torch.zeros(1))      # gives the stub a device

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=F.one_hot(input_ids[:, 0], self.classes).float() + self.anchor)


def batch(first_tokens, labels=None):
    ids = torch.tensor(first_tokens)[:, None].repeat(1, 4)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labels is not None:
        out["labels"] = torch.tensor(labels)
    return out


def test_accuracy_and_agreement_known_answers():
    batches = [batch([0, 1, 2, 2], [0, 1, 1, 2]), batch([1, 0, 0], [1, 0, 2])]
    preds = predict(Echo(), batches)
    assert preds.tolist() == [0, 1, 2, 2, 1, 0, 0]
    assert labels_of(batches).tolist() == [0, 1, 1, 2, 1, 0, 2]
    reference = torch.tensor([0, 1, 2, 0, 0, 0, 0])
    result = evaluate_classifier(Echo(), batches, reference=reference, seed=1)
    assert result.accuracy.value == pytest.approx(5 / 7) and result.accuracy.n == 7
    assert result.agreement.value == pytest.approx(5 / 7)
    assert torch.equal(result.predictions, preds)
    assert result.accuracy.low <= 5 / 7 <= result.accuracy.high
    data = result.to_dict()
    assert data["accuracy"]["n"] == 7 and len(data["accuracy"]["ci95"]) == 2


def test_no_labels_means_no_accuracy_and_no_reference_means_no_agreement():
    result = evaluate_classifier(Echo(), [batch([0, 1])])
    assert result.accuracy is None and result.agreement is None
    assert result.to_dict() == {"accuracy": None, "agreement": None}
    assert labels_of([batch([0], [0]), batch([1])]) is None


def test_bootstrap_interval_contains_the_mean_and_is_seeded():
    hits = (torch.arange(200) % 10 < 7).float()               # mean 0.7
    lo, hi = bootstrap_interval(hits, seed=3)
    assert lo < 0.7 < hi and 0.0 <= lo and hi <= 1.0
    assert 0.05 < hi - lo < 0.2                               # about 4 standard errors of 0.032
    assert bootstrap_interval(hits, seed=3) == (lo, hi)
    assert bootstrap_interval(hits, seed=4) != (lo, hi)
    narrow = bootstrap_interval(hits, seed=3, level=0.5)
    assert lo < narrow[0] < 0.7 < narrow[1] < hi
    assert bootstrap_interval(torch.ones(50), seed=0) == (1.0, 1.0)
    empty = bootstrap_interval(torch.zeros(0))
    assert math.isnan(empty[0]) and math.isnan(empty[1])


def test_rate_of_hits():
    rate = Rate.of(torch.tensor([True, False, True, True]), seed=0)
    assert rate.value == 0.75 and rate.n == 4 and rate.low <= 0.75 <= rate.high
    assert rate.to_dict() == {"value": 0.75, "ci95": [rate.low, rate.high], "n": 4}


def test_bootstrap_interval_edge_cases_and_inputs():
    assert bootstrap_interval(torch.tensor([1.0])) == (1.0, 1.0)    # one example: no spread
    hits = [1, 0, 1, 1, 0, 1, 1, 1]
    assert bootstrap_interval(hits, seed=5) == bootstrap_interval(torch.tensor(hits).bool(), seed=5)


def correctness(both_right: int, a_only: int, b_only: int, both_wrong: int):
    a = [1] * both_right + [1] * a_only + [0] * b_only + [0] * both_wrong
    b = [1] * both_right + [0] * a_only + [1] * b_only + [0] * both_wrong
    return torch.tensor(a), torch.tensor(b)


def test_paired_difference_mcnemar_known_answers():
    a, b = correctness(5, 10, 0, 5)
    diff = paired_difference(a, b, seed=0)
    assert (diff.a_only, diff.b_only, diff.n) == (10, 0, 20)
    assert diff.value == pytest.approx(0.5)
    assert diff.p_value == pytest.approx(2 * 0.5 ** 10)                # exact: both tails of 10 heads
    assert diff.low <= 0.5 <= diff.high and diff.low > 0
    swapped = paired_difference(b, a, seed=0)
    assert swapped.value == pytest.approx(-0.5) and swapped.p_value == pytest.approx(diff.p_value)
    # 7 against 2 discordant: 2 * P(X <= 2), X ~ Binomial(9, 1/2) = 2 * (1 + 9 + 36) / 512
    assert paired_difference(*correctness(3, 7, 2, 0)).p_value == pytest.approx(92 / 512)
    assert paired_difference(*correctness(4, 5, 5, 4)).p_value == pytest.approx(1.0)
    same = paired_difference([1, 0, 1, 1], [1, 0, 1, 1], seed=2)
    assert (same.value, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert same.to_dict() == {"value": 0.0, "ci95": [0.0, 0.0], "n": 4, "a_only": 0, "b_only": 0,
                              "mcnemar_p": 1.0}


def test_paired_difference_interval_is_paired_and_seeded():
    # B is right wherever A is, plus on 8 more: no resample can have A ahead, so the interval ends at
    # or below 0; resampling the examples independently for each model would not guarantee that.
    a, b = correctness(60, 0, 8, 32)
    diff = paired_difference(a, b, seed=1)
    assert diff.value == pytest.approx(-0.08)
    assert diff.low < -0.08 < diff.high <= 0.0
    assert paired_difference(a, b, seed=1) == diff
    assert paired_difference(a, b, seed=2) != diff


def test_paired_difference_rejects_bad_input():
    with pytest.raises(ValueError, match="a_correct has 3 examples but b_correct has 2"):
        paired_difference([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="only 0/1"):
        paired_difference([1, 2], [1, 0])


def manual_nll(model, batches) -> tuple[float, int]:
    """Sum of -log p(token | prefix) over every real target token, one sequence at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            for ids, mask in zip(b["input_ids"], b["attention_mask"]):
                n = int(mask.sum())                           # right padding: the first n are real
                logp = torch.log_softmax(model(input_ids=ids[None, :n]).logits[0].double(), -1)
                for t in range(1, n):
                    total -= float(logp[t - 1, ids[t]])
                    count += 1
    return total, count


def test_perplexity_equals_exp_of_the_manual_mean_nll(tiny_model, tiny_batches):
    model = tiny_model("gpt2", "causal-lm")
    batches = tiny_batches(model, labels=False)
    total, count = manual_nll(model, batches)
    assert count == 2 * (36 - 8) - 8
    assert perplexity(model, batches) == pytest.approx(math.exp(total / count), rel=1e-5)
    # An unpadded batch agrees with the model's own loss too.
    ids = batches[0]["input_ids"][:1, :]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert perplexity(model, [{"input_ids": ids}]) == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_perplexity_without_tokens_raises(tiny_model):
    model = tiny_model("gpt2", "causal-lm")
    empty = {"input_ids": torch.ones(2, 3, dtype=torch.long),
             "attention_mask": torch.zeros(2, 3, dtype=torch.long)}
    with pytest.raises(ValueError, match="no tokens"):
        perplexity(model, [empty])
    with pytest.raises(ValueError, match="no tokens"):
        perplexity(model, [])
