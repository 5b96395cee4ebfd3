"""An evaluated budget is a typed record end to end (``kcm_app.records.BudgetResult`` holds the library's
``Rate`` / ``LMMetric`` / ``PairedPerplexity``), and the disk cache is the one place that turns it into a
file and back (``kcm_app.disk_cache``): a round trip gives equal records, and a file of the dict layout
the app wrote before decodes, while one that does not fit is a miss (computed again), never an error."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kcm_app import disk_cache
from kcm_app.records import BudgetResult
from kcm_core.evaluate import ClassifierEval, Rate
from kcm_core.lm import BlockStats, LMMetric, paired_perplexity, summarise
from kcm_core.methods import ScoreDetails
from kcm_core.plan import KeepPlan, LayerKeep, PlanInfo

PARTS = ("weights", "data", 0, "options")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KCM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def never() -> BudgetResult:
    raise AssertionError("computed again: the stored file was not read")


def round_trip(kind: str, result: BudgetResult, seed: int = 0) -> BudgetResult:
    """``result`` stored under ``kind``, then read back (a second call that may not compute)."""
    decode = lambda payload: disk_cache.decode_budget(payload, seed)   # noqa: E731
    assert disk_cache.cached(kind, PARTS, lambda: result, disk_cache.encode_budget, decode) is result
    return disk_cache.cached(kind, PARTS, never, disk_cache.encode_budget, decode)


def classifier_result() -> BudgetResult:
    plan = KeepPlan((LayerKeep((0, 2, 5), 7, scales=(1.25, 0.5, 1.0)), LayerKeep((1,), 7, bias_shift=(0.5, -1.0))),
                    method="kcm", info=PlanInfo(budget=0.6, k=4, scaled_layers=2, repair="scales"))
    return BudgetResult(method="kcm", budget=0.6, seed=3, plan=plan, relative_flops=0.61, params_after=1234,
                        accuracy=Rate(0.75, 0.5, 0.875, 8), agreement=Rate(0.625, 0.375, 0.875, 8),
                        seconds={"scores": 0.5, "evaluate": 0.25},
                        details=ScoreDetails(r2_iterations=(3, 4), r2_converged=True, tokens=90, sequences=12),
                        predictions=torch.tensor([0, 1, 1, 0, 2, 1, 0, 0]))


def lm_result(seed: int) -> BudgetResult:
    rng = np.random.default_rng(0)
    tokens = np.full(5, 31.0)
    after = BlockStats(nll=rng.uniform(60, 90, 5), tokens=tokens, agree=rng.integers(10, 31, 5).astype(float),
                       kl=rng.uniform(0, 3, 5))
    before = BlockStats(nll=rng.uniform(50, 80, 5), tokens=tokens, agree=None, kl=None)
    lm = summarise(after, seed)
    rows = torch.randn(2, 11)                       # a refitted layer's rows live beside the plan's JSON
    plan = KeepPlan((LayerKeep((3, 8), 13, rows=rows), LayerKeep((0, 1, 2), 13)), method="fluct",
                    info=PlanInfo(budget=0.9, repair="refit", repair_target="local"))
    return BudgetResult(method="fluct", budget=0.9, seed=0, plan=plan, relative_flops=0.9, params_after=99,
                        accuracy=None, agreement=lm.agreement, seconds={"evaluate": 1.5},
                        perplexity=lm.perplexity, kl=lm.kl, lm=lm,
                        paired=paired_perplexity(after, before, seed))


def test_a_classifiers_budget_comes_back_from_the_disk_as_the_same_typed_record(cache_dir):
    result = classifier_result()
    back = round_trip("budget", result)
    assert isinstance(back.accuracy, Rate) and isinstance(back.agreement, Rate)
    assert (back.accuracy, back.agreement) == (result.accuracy, result.agreement)
    assert back.perplexity is back.kl is back.lm is back.paired is None
    assert (back.method, back.budget, back.seed, back.relative_flops, back.params_after, back.seconds) == (
        "kcm", 0.6, 3, 0.61, 1234, {"scores": 0.5, "evaluate": 0.25})
    assert back.plan == result.plan and back.plan.info == result.plan.info
    assert back.details == result.details
    assert torch.equal(back.predictions, result.predictions)


def test_a_language_models_budget_comes_back_with_its_blocks_rows_and_metrics(cache_dir):
    result = lm_result(seed=4)
    back = round_trip("budget-lm", result, seed=4)
    assert all(isinstance(m, LMMetric) for m in (back.perplexity, back.agreement, back.kl))
    assert (back.perplexity, back.agreement, back.kl) == (result.perplexity, result.agreement, result.kl)
    assert back.accuracy is None and back.paired == result.paired
    for name in ("nll", "tokens", "agree", "kl"):
        assert np.array_equal(getattr(back.lm.stats, name), getattr(result.lm.stats, name))
    assert back.plan == result.plan and back.plan.info == result.plan.info
    assert torch.equal(back.plan.layers[0].rows, result.plan.layers[0].rows) and back.plan.layers[1].rows is None


def test_the_unpruned_classifiers_evaluation_comes_back_typed(cache_dir):
    value = (ClassifierEval(Rate(0.5, 0.25, 0.75, 4), None, torch.tensor([1, 0, 1, 1]),
                            torch.tensor([True, False, False, True])), 0.125)
    disk_cache.cached("dense", PARTS, lambda: value, disk_cache.encode_reference, disk_cache.decode_reference)
    back, seconds = disk_cache.cached("dense", PARTS, never, disk_cache.encode_reference, disk_cache.decode_reference)
    assert back.accuracy == Rate(0.5, 0.25, 0.75, 4) and back.agreement is None and seconds == 0.125
    assert torch.equal(back.predictions, value[0].predictions) and torch.equal(back.hits, value[0].hits)


def old_dict_payload() -> dict:
    """A classifier's budget as the app wrote it when ``BudgetResult`` held ``Rate.to_dict()`` dicts: each
    metric that dict as JSON, no perplexity or KL keys at all (the oldest files)."""
    plan = KeepPlan((LayerKeep((0, 1), 4),), method="d2")
    return {"method": "d2", "budget": 0.7, "seed": 0, "plan": plan.to_json(), "relative_flops": 0.72,
            "params_after": 10, "accuracy": json.dumps({"value": 0.8, "ci95": [0.6, 0.9], "n": 10}),
            "agreement": json.dumps({"value": 0.9, "ci95": [0.7, 1.0], "n": 10}),
            "seconds": json.dumps({"scores": 0.1}), "details": json.dumps({"tokens": 40}),
            "predictions": torch.tensor([1, 0]), "lm_stats": None, "paired": None, "rows": None}


def test_a_file_of_the_old_dict_layout_decodes_into_typed_records(cache_dir):
    disk_cache.write("budget", PARTS, old_dict_payload())
    back = disk_cache.cached("budget", PARTS, never, disk_cache.encode_budget, disk_cache.decode_budget)
    assert back.accuracy == Rate(0.8, 0.6, 0.9, 10) and back.agreement == Rate(0.9, 0.7, 1.0, 10)
    assert back.perplexity is None and back.kl is None and back.details == ScoreDetails(tokens=40)


@pytest.mark.parametrize("damage", [
    lambda p: p.pop("plan"),                                                   # a key missing
    lambda p: p.update(accuracy={"value": 0.8, "ci95": [0.6, 0.9], "n": 10}),  # a dict, not its JSON
    lambda p: p.update(accuracy=json.dumps({"value": 0.8, "ci95": [0.6], "n": 10})),   # half an interval
    lambda p: p.update(agreement=json.dumps([0.9, 0.7, 1.0])),                # a list where a record was
    lambda p: p.update(details="not json"),
    lambda p: p.update(lm_stats={"nll": torch.ones(2)}),                       # an LM's file, cut short
], ids=["missing-key", "dict-not-json", "half-interval", "list", "bad-json", "lm-cut-short"])
def test_a_file_that_does_not_decode_is_a_miss_not_an_error(cache_dir, damage):
    payload = old_dict_payload()
    damage(payload)
    disk_cache.write("budget", PARTS, payload)
    fresh = classifier_result()
    assert disk_cache.cached("budget", PARTS, lambda: fresh, disk_cache.encode_budget,
                             disk_cache.decode_budget) is fresh
    back = disk_cache.cached("budget", PARTS, never, disk_cache.encode_budget, disk_cache.decode_budget)
    assert back.accuracy == fresh.accuracy                 # the recomputed result replaced the file
