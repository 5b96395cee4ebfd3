"""The verbs chained: every method end to end on a tiny BERT, the errors a user can hit, and the
promises of the pipeline (the caller's model untouched, the same seed gives the same result)."""
import pytest
import torch

from conftest import WIDTH, same_state, state_snapshot
from kcm_core import METHODS, PruneConfig, compute_scores, make_plan, model_shape, prune
from kcm_core.arch import ffn_blocks
from kcm_core.flops import relative_flops
from kcm_core.data import mean_length
from kcm_core.pipeline import resolve_seq_len

BUDGET = 0.8


def logits(model, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits
                          for b in batches])


@pytest.fixture
def bert_and_data(tiny_model, tiny_batches):
    model = tiny_model("bert", layers=3)
    return model, tiny_batches(model, n_batches=2), tiny_batches(model, n_batches=2, seed=1)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_end_to_end(bert_and_data, name):
    model, unlabeled, labeled = bert_and_data
    spec = METHODS[name]
    snapshot = state_snapshot(model)
    config = PruneConfig(method=name, budget=BUDGET, scale_samples=8, label_samples=8)
    messages = []
    result = prune(model, config, unlabeled, labeled=labeled if spec.uses_labels else None,
                   progress=lambda m, f: messages.append((m, f)))
    shape = model_shape(model.config)
    assert result.seq_len == mean_length(unlabeled) == (36 - 8) / 4
    assert result.plan.method == name and result.plan.info.seq_len == result.seq_len
    assert relative_flops(shape, result.seq_len, result.plan.kept_counts) <= BUDGET
    assert 0 < result.plan.total_kept < 3 * WIDTH
    assert [b.width for b in ffn_blocks(result.model)] == result.plan.kept_counts
    assert result.plan.has_scales == spec.scaled
    if spec.scaled:
        assert result.plan.info.scaled_layers == 3
    out = logits(result.model, unlabeled)
    assert out.shape == (8, 2) and bool(torch.isfinite(out).all())
    assert "selection" in result.seconds and "slicing" in result.seconds
    assert all(0.0 <= f <= 1.0 for _, f in messages)
    assert same_state(model, snapshot)
    # only the label-refined method reports its swap count (0 is a valid count); the others report none
    assert isinstance(result.plan.info.label_swaps, int) == (name == "kcm-labels")
    if name in ("kcm", "r2"):
        assert len(result.details.r2_iterations) == 3


@pytest.mark.parametrize("name", sorted(n for n, m in METHODS.items() if m.uses_labels))
def test_label_methods_without_labels_explain_what_is_missing(bert_and_data, tiny_batches, name):
    model, unlabeled, _ = bert_and_data
    with pytest.raises(ValueError) as err:
        prune(model, PruneConfig(method=name, budget=BUDGET), unlabeled)
    assert "labeled data" in str(err.value) and name in str(err.value)
    assert "kcm" in str(err.value)          # points at a label-free method
    no_labels = tiny_batches(model, labels=False)
    with pytest.raises(ValueError, match="no labels"):
        prune(model, PruneConfig(method=name, budget=BUDGET), no_labels, labeled=no_labels)


def test_unknown_method_is_refused_with_the_choices():
    with pytest.raises(ValueError) as err:
        PruneConfig(method="magic")
    assert "'magic'" in str(err.value)
    for name in METHODS:
        assert name in str(err.value)


@pytest.mark.parametrize("kwargs,word", [
    ({"budget": 1.7}, "1.7"), ({"budget": 0.0}, "budget"), ({"seq_len": -1.0}, "seq_len"),
    ({"scale_samples": 0}, "scale_samples"), ({"label_samples": 0}, "label_samples"),
])
def test_prune_config_validation(kwargs, word):
    with pytest.raises(ValueError, match=word):
        PruneConfig(**kwargs)


def test_nan_weights_are_refused_naming_the_parameter(bert_and_data):
    model, unlabeled, _ = bert_and_data
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.weight[3, 4] = float("nan")
    for name in ("kcm", "weight-magnitude", "random"):
        with pytest.raises(ValueError) as err:
            prune(model, PruneConfig(method=name, budget=BUDGET), unlabeled)
        assert "bert.encoder.layer.1.output.dense.weight" in str(err.value)


def test_empty_data_is_refused(bert_and_data):
    model, _, _ = bert_and_data
    with pytest.raises(ValueError, match="unlabeled"):
        prune(model, PruneConfig(method="kcm", budget=BUDGET), [])
    with pytest.raises(ValueError, match="needs unlabeled data"):
        prune(model, PruneConfig(method="kcm", budget=BUDGET, seq_len=9), [])
    # Data-free methods only need the sequence length.
    result = prune(model, PruneConfig(method="weight-magnitude", budget=BUDGET, seq_len=9), [])
    assert relative_flops(model_shape(model.config), 9, result.plan.kept_counts) <= BUDGET


def test_all_padding_data_is_refused(bert_and_data):
    model, unlabeled, _ = bert_and_data
    padding = [{**b, "attention_mask": torch.zeros_like(b["attention_mask"])} for b in unlabeled]
    with pytest.raises(ValueError, match="no real tokens"):
        prune(model, PruneConfig(method="kcm", budget=BUDGET), padding)
    with pytest.raises(ValueError, match="no real tokens"):
        prune(model, PruneConfig(method="d2", budget=BUDGET, seq_len=9), padding)


def test_vision_models_use_the_image_token_count(tiny_model, tiny_batches):
    model = tiny_model("vit", layers=3)
    shape = model_shape(model.config)
    assert resolve_seq_len(shape, tiny_batches(model), None) == 17
    result = prune(model, PruneConfig(method="kcm", budget=0.9), tiny_batches(model))
    assert result.seq_len == 17
    assert relative_flops(shape, 17, result.plan.kept_counts) <= 0.9


def test_caller_model_is_unchanged_by_prune(bert_and_data):
    model, unlabeled, labeled = bert_and_data
    model.train()
    snapshot = state_snapshot(model)
    ids = [id(p) for p in model.parameters()]
    config_before = model.config.to_dict()
    before = logits(model.eval(), unlabeled)
    model.train()
    prune(model, PruneConfig(method="kcm-labels", budget=BUDGET), unlabeled, labeled=labeled)
    assert model.training and all(m.training for m in model.modules())
    assert [id(p) for p in model.parameters()] == ids
    assert same_state(model, snapshot) and model.config.to_dict() == config_before
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(logits(model.eval(), unlabeled), before)


@pytest.mark.parametrize("name", ["kcm", "random"])
def test_same_seed_same_plan_and_logits(bert_and_data, name):
    model, unlabeled, _ = bert_and_data
    a = prune(model, PruneConfig(method=name, budget=BUDGET, seed=3), unlabeled)
    b = prune(model, PruneConfig(method=name, budget=BUDGET, seed=3), unlabeled)
    assert a.plan == b.plan
    assert [layer.scales for layer in a.plan.layers] == [layer.scales for layer in b.plan.layers]
    assert torch.equal(logits(a.model, unlabeled), logits(b.model, unlabeled))
    if name == "random":
        c = prune(model, PruneConfig(method=name, budget=BUDGET, seed=4), unlabeled)
        assert [layer.keep_idx for layer in c.plan.layers] != [layer.keep_idx for layer in a.plan.layers]


def test_scores_are_reused_across_budgets(bert_and_data):
    model, unlabeled, _ = bert_and_data
    config = PruneConfig(method="kcm", budget=0.9)
    scores = compute_scores(model, config, unlabeled)
    assert [s.shape[0] for s in scores.scores] == [WIDTH] * 3
    assert scores.details.tokens == 2 * (36 - 8) and scores.details.sequences == 8
    seq = mean_length(unlabeled)
    kept = [make_plan(model, scores, PruneConfig(method="kcm", budget=b), seq).total_kept
            for b in (0.95, 0.9, 0.8, 0.7)]
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1]
    reused = prune(model, config, unlabeled, method_scores=scores)
    fresh = prune(model, config, unlabeled)
    assert reused.plan == fresh.plan


def test_score_components_are_shared_across_methods_without_changing_any_scores(bert_and_data):
    model, unlabeled, labeled = bert_and_data
    names = ["kcm", "r2", "d2", "output-magnitude", "mask-tuning", "kcm-labels"]
    alone = {n: compute_scores(model, PruneConfig(method=n), unlabeled, labeled) for n in names}
    shared: dict = {}
    together = {n: compute_scores(model, PruneConfig(method=n), unlabeled, labeled, shared=shared)
                for n in names}
    assert set(shared) == {"r2", "stats", "grads"}
    for n in names:
        assert all(torch.equal(a, b) for a, b in zip(alone[n].scores, together[n].scores)), n
        assert together[n].details == alone[n].details, n
    # the first method paid for R2 and the statistics, the later ones reused them
    assert {"r2", "d2"} <= set(together["kcm"].seconds) and "r2" not in together["r2"].seconds
    assert "d2" not in together["d2"].seconds and "gradients" in together["mask-tuning"].seconds
    assert "gradients" not in together["kcm-labels"].seconds


def test_batches_without_an_attention_mask_count_every_token(bert_and_data):
    """No mask means no padding (as the activation statistics treat it), not an empty sample."""
    model, _, _ = bert_and_data
    unmasked = [{"input_ids": torch.randint(2, 99, (4, 9), generator=torch.Generator().manual_seed(0))}]
    assert mean_length(unmasked) == 9.0
    result = prune(model, PruneConfig(method="kcm", budget=BUDGET), unmasked)
    assert result.seq_len == 9.0
    assert relative_flops(model_shape(model.config), 9.0, result.plan.kept_counts) <= BUDGET
    assert mean_length([{"pixel_values": torch.zeros(2, 3, 16, 16)}]) == 0.0


def test_an_unreachable_budget_is_refused_before_any_scoring(bert_and_data):
    model, unlabeled, _ = bert_and_data
    calls = []
    with pytest.raises(ValueError, match="below what FFN-only pruning can reach"):
        prune(model, PruneConfig(method="kcm", budget=0.3), unlabeled,
              progress=lambda m, f: calls.append(m))
    assert calls == []


def test_kcm_prunes_a_tiny_mpnet_within_budget(tiny_model, tiny_batches):
    """MPNet (BERT layout, relative-position bias outside the layers) through score, select, scale, slice."""
    model = tiny_model("mpnet", layers=3)
    unlabeled = tiny_batches(model, n_batches=2)
    snapshot = state_snapshot(model)
    result = prune(model, PruneConfig(method="kcm", budget=BUDGET, scale_samples=8), unlabeled)
    shape = model_shape(model.config)
    assert shape.family == "bert" and shape.model_type == "mpnet"
    assert relative_flops(shape, result.seq_len, result.plan.kept_counts) <= BUDGET
    assert [b.width for b in ffn_blocks(result.model)] == result.plan.kept_counts
    assert 0 < result.plan.total_kept < 3 * WIDTH and result.plan.info.scaled_layers == 3
    out = logits(result.model, unlabeled)
    assert out.shape == (8, 2) and bool(torch.isfinite(out).all())
    assert same_state(model, snapshot)
