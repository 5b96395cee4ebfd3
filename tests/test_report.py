"""The report's paired comparison of after with before: known answers for the difference, its
interval and McNemar's exact p, and the lines report.md shows."""
import pytest
import torch

from kcm_core.evaluate import ClassifierEval, Rate
from kcm_core.report import Evaluation, _paired_lines


def result(hits: list[int]) -> ClassifierEval:
    hits_t = torch.tensor(hits).bool()
    return ClassifierEval(Rate.of(hits_t), None, torch.zeros(len(hits), dtype=torch.long), hits_t)


def test_identical_predictions_give_difference_zero_and_mcnemar_one():
    same = [1, 0, 1, 1, 0, 1, 1, 0]
    ev = Evaluation.of_classifier("toy", 8, result(same), result(same), seed=3)
    assert ev.paired["accuracy_difference"] == {"value": 0.0, "ci95": [0.0, 0.0], "n": 8,
                                                "a_only": 0, "b_only": 0, "mcnemar_p": 1.0}


def test_a_constructed_discordant_table_gives_the_exact_binomial_p():
    # before right on 12, after right on 12 + 2 of the 8 before missed, wrong on 6 before had right:
    # discordant 2 (only after) against 6 (only before): p = 2 * P(X <= 2), X ~ Binomial(8, 1/2)
    before = [1] * 12 + [1] * 6 + [0] * 2 + [0] * 4
    after = [1] * 12 + [0] * 6 + [1] * 2 + [0] * 4
    diff = Evaluation.of_classifier("toy", 24, result(before), result(after)).paired["accuracy_difference"]
    assert (diff["a_only"], diff["b_only"], diff["n"]) == (2, 6, 24)
    assert diff["value"] == pytest.approx((14 - 18) / 24)
    assert diff["mcnemar_p"] == pytest.approx(2 * (1 + 8 + 28) / 256)
    assert diff["ci95"][0] < diff["value"] < diff["ci95"][1]


def test_the_interval_is_seeded_and_paired():
    before = [1] * 40 + [0] * 10 + [1] * 10
    after = [1] * 40 + [0] * 10 + [0] * 10          # loses 10, gains none: no draw can favour after
    one = Evaluation.of_classifier("toy", 60, result(before), result(after), seed=1).paired
    assert one == Evaluation.of_classifier("toy", 60, result(before), result(after), seed=1).paired
    low, high = one["accuracy_difference"]["ci95"]
    assert low < -10 / 60 < high <= 0.0


def test_no_labels_means_no_paired_accuracy():
    unlabeled = ClassifierEval(None, None, torch.zeros(4, dtype=torch.long), None)
    assert Evaluation.of_classifier("toy", 4, unlabeled, unlabeled).paired == {}


def test_report_lines_say_after_minus_before_with_interval_and_p():
    lines = _paired_lines({
        "accuracy_difference": {"value": -0.0125, "ci95": [-0.03, 0.005], "n": 800, "a_only": 10,
                                "b_only": 20, "mcnemar_p": 0.0987},
        "perplexity_ratio": {"ratio": 1.5, "ci95": [1.25, 1.75], "n": 8, "p_value": 2 / 1001}})
    assert lines == [
        "- Accuracy after minus before (paired over the same 800 examples): -1.2 points (95% CI -3.0 "
        "to +0.5); McNemar exact p = 0.0987 (20 examples only the unpruned model gets right, 10 only "
        "the pruned one)",
        "- Perplexity after / before (paired over the same 8 blocks): 1.500 (95% CI 1.250 to 1.750; "
        "bootstrap p < 0.002)"]
    assert _paired_lines({}) == []
    ratio = {"ratio": 1.1, "ci95": [0.9, 1.3], "n": 8, "p_value": 0.4116}
    assert _paired_lines({"perplexity_ratio": ratio})[0].endswith("(95% CI 0.900 to 1.300; bootstrap p 0.412)")
