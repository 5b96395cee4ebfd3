"""Selection: global top-k under the FLOPs budget, stable ties, per-layer floors, rounding, uniform
widths, emptied layers, the label refinement, and determinism by seed."""
import pytest
import torch

from conftest import WIDTH
from kcm_core import PruneConfig, compute_scores, make_plan, model_shape
from kcm_core.flops import flops_floor, keep_count, relative_flops
from kcm_core.scores import random_scores
from kcm_core.select import refine_with_gradients, select, select_top_k

SEQ = 9.0


@pytest.fixture
def shape(tiny_model):
    return model_shape(tiny_model("bert", layers=3).config)


def kept_idx(plan):
    return [list(layer.keep_idx) for layer in plan.layers]


def test_global_top_k_with_ties_to_the_lower_index():
    scores = [torch.tensor([0.5, 0.9, 0.5, 0.1]), torch.tensor([0.9, 0.5, 0.2])]
    assert kept_idx(select_top_k(scores, 1)) == [[1], []]
    assert kept_idx(select_top_k(scores, 2)) == [[1], [0]]        # 0.9 tie: layer 0 first
    assert kept_idx(select_top_k(scores, 3)) == [[0, 1], [0]]     # 0.5 ties: lowest layer, index
    assert kept_idx(select_top_k(scores, 4)) == [[0, 1, 2], [0]]
    assert kept_idx(select_top_k(scores, 5)) == [[0, 1, 2], [0, 1]]
    assert kept_idx(select_top_k(scores, 7)) == [[0, 1, 2, 3], [0, 1, 2]]
    assert kept_idx(select_top_k(scores, 0)) == [[], []]
    flat = [torch.ones(4), torch.ones(3)]
    assert kept_idx(select_top_k(flat, 5)) == [[0, 1, 2, 3], [0]]


def test_no_per_layer_quota_the_global_ranking_decides(shape):
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(WIDTH, generator=gen) + 2, torch.rand(WIDTH, generator=gen),
              torch.rand(WIDTH, generator=gen) + 1]
    k = keep_count(shape, SEQ, 0.8)
    assert WIDTH < k < 2 * WIDTH
    plan = select(scores, shape, 0.8, SEQ)
    assert plan.kept_counts == [WIDTH, 0, k - WIDTH]       # layer 1 emptied completely
    assert kept_idx(plan)[2] == sorted(torch.topk(scores[2], k - WIDTH).indices.tolist())


@pytest.mark.parametrize("budget", [1.0, 0.97, 0.9, 0.8, 0.75, 0.7, "floor"])
def test_budget_holds_and_one_more_neuron_would_exceed_it(shape, budget):
    budget = flops_floor(shape, SEQ) + 1e-9 if budget == "floor" else budget
    plan = select(random_scores(shape.ffn_width, seed=4), shape, budget, SEQ, method="random")
    counts = plan.kept_counts
    assert plan.total_kept == keep_count(shape, SEQ, budget)
    assert relative_flops(shape, SEQ, counts) <= budget
    if plan.total_kept < sum(shape.ffn_width):
        more = list(counts)
        more[next(i for i, c in enumerate(counts) if c < WIDTH)] += 1
        assert relative_flops(shape, SEQ, more) > budget
    assert plan.method == "random" and plan.info.k == plan.total_kept


def test_min_per_layer_keeps_each_layers_best(shape):
    scores = [torch.arange(WIDTH, dtype=torch.float32) + 100, torch.linspace(1, 0, WIDTH),
              torch.arange(WIDTH, dtype=torch.float32) + 100]
    budget = 0.8
    k = keep_count(shape, SEQ, budget)
    assert select(scores, shape, budget, SEQ).kept_counts[1] == 0
    plan = select(scores, shape, budget, SEQ, min_per_layer=3)
    assert kept_idx(plan)[1] == [0, 1, 2]                 # layer 1's three best
    assert plan.total_kept == k and relative_flops(shape, SEQ, plan.kept_counts) <= budget
    with pytest.raises(ValueError, match="min_per_layer"):
        select(scores, shape, flops_floor(shape, SEQ) + 1e-3, SEQ, min_per_layer=WIDTH)


@pytest.mark.parametrize("multiple", [2, 4, 8, 16, 32])
@pytest.mark.parametrize("budget", [0.98, 0.9, 0.8, 0.72, 0.68])
def test_rounded_widths_are_multiples_or_full_and_within_budget(shape, multiple, budget):
    scores = random_scores(shape.ffn_width, seed=11)
    k = keep_count(shape, SEQ, budget)
    if k < multiple:      # not one group fits: refused (it used to return an empty model)
        with pytest.raises(ValueError, match=f"multiple {multiple} empties every layer"):
            select(scores, shape, budget, SEQ, multiple=multiple)
        return
    plan = select(scores, shape, budget, SEQ, multiple=multiple)
    counts = plan.kept_counts
    assert all(c % multiple == 0 or c == WIDTH for c in counts)
    assert sum(counts) <= k and relative_flops(shape, SEQ, counts) <= budget
    # Greedy fill: no layer can take one more group without breaking the budget.
    for c in counts:
        if c < WIDTH:
            assert sum(counts) + min(multiple, WIDTH - c) > k
    # Each layer keeps its best-scored neurons.
    for layer, s in zip(plan.layers, scores):
        assert list(layer.keep_idx) == sorted(torch.topk(s, layer.kept).indices.tolist())


def test_rounding_respects_min_per_layer(shape):
    scores = [torch.ones(WIDTH) * 3, torch.zeros(WIDTH), torch.ones(WIDTH) * 2]
    plan = select(scores, shape, 0.8, SEQ, multiple=8, min_per_layer=5)
    assert plan.kept_counts[1] == 8
    assert all(c % 8 == 0 or c == WIDTH for c in plan.kept_counts)
    assert relative_flops(shape, SEQ, plan.kept_counts) <= 0.8


@pytest.mark.parametrize("multiple", [1, 8])
def test_uniform_plan(shape, multiple):
    scores = random_scores(shape.ffn_width, seed=2)
    k = keep_count(shape, SEQ, 0.85)
    plan = select(scores, shape, 0.85, SEQ, uniform=True, multiple=multiple)
    counts = plan.kept_counts
    expected = (k // 3) - (k // 3) % multiple
    assert counts == [expected] * 3 and expected > 0
    assert relative_flops(shape, SEQ, counts) <= 0.85
    for layer, s in zip(plan.layers, scores):
        assert list(layer.keep_idx) == sorted(torch.topk(s, expected).indices.tolist())


@pytest.mark.parametrize("kwargs,word", [({"multiple": 0}, "multiple"), ({"multiple": 2.0}, "multiple"),
                                         ({"min_per_layer": -1}, "min_per_layer")])
def test_select_validates_options(shape, kwargs, word):
    with pytest.raises(ValueError, match=word):
        select(random_scores(shape.ffn_width, 0), shape, 0.8, SEQ, **kwargs)


def test_select_validates_scores(shape):
    good = random_scores(shape.ffn_width, 0)
    with pytest.raises(ValueError, match="2 score vectors for 3 layers"):
        select(good[:2], shape, 0.8, SEQ)
    with pytest.raises(ValueError, match="layer 1: 36 scores for 37 neurons"):
        select([good[0], good[1][:36], good[2]], shape, 0.8, SEQ)
    bad = [g.clone() for g in good]
    bad[2][4] = float("nan")
    with pytest.raises(ValueError, match="layer 2: scores contain NaN"):
        select(bad, shape, 0.8, SEQ)
    with pytest.raises(ValueError, match="budget"):
        select(good, shape, 1.5, SEQ)


def test_refine_with_gradients_keeps_the_count_and_raises_the_gradient_score():
    gen = torch.Generator().manual_seed(0)
    base = [torch.rand(WIDTH, generator=gen) for _ in range(3)]
    grads = [torch.rand(WIDTH, generator=gen) for _ in range(3)]
    plan = select_top_k(base, 50, method="kcm")

    def grad_total(p):
        return sum(float(g[list(layer.keep_idx)].sum()) for g, layer in zip(grads, p.layers))

    refined = refine_with_gradients(plan, base, grads)
    assert refined.total_kept == plan.total_kept
    assert grad_total(refined) > grad_total(plan)
    assert refined.info.label_swaps > 0 and refined.method == "kcm"
    # Only the kept sets changed, and only by swaps that each raised the gradient score.
    out_in = [(set(a.keep_idx) - set(b.keep_idx), set(b.keep_idx) - set(a.keep_idx))
              for a, b in zip(plan.layers, refined.layers)]
    assert sum(len(o) for o, _ in out_in) == refined.info.label_swaps
    within = refine_with_gradients(plan, base, grads, within_layer=True)
    assert within.kept_counts == plan.kept_counts
    assert grad_total(within) > grad_total(plan) and within.info.label_swaps > 0
    # Gradients that already agree with the plan change nothing.
    same = refine_with_gradients(plan, base, base)
    assert kept_idx(same) == kept_idx(plan) and same.info.label_swaps == 0


def test_same_seed_same_plan_random(shape):
    a = select(random_scores(shape.ffn_width, seed=5), shape, 0.8, SEQ)
    b = select(random_scores(shape.ffn_width, seed=5), shape, 0.8, SEQ)
    c = select(random_scores(shape.ffn_width, seed=6), shape, 0.8, SEQ)
    assert a == b and kept_idx(a) == kept_idx(b)
    assert kept_idx(a) != kept_idx(c)


def test_same_data_same_plan_kcm(tiny_model, tiny_batches):
    model = tiny_model("bert")
    batches = tiny_batches(model)
    config = PruneConfig(method="kcm", budget=0.8, seed=3)
    plans = [make_plan(model, compute_scores(model, config, batches), config, SEQ) for _ in range(2)]
    assert plans[0] == plans[1]
    assert plans[0].total_kept == keep_count(model_shape(model.config), SEQ, 0.8)
