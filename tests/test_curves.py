"""The curve allocation: each layer's refit-error curve against a direct solve, the counts against a
brute-force search, the average with the standardised counts, and the allocation through select,
prune, the streamed mode and a bad call."""
import itertools

import pytest
import torch

from kcm_core import PruneConfig, compute_scores, make_plan, model_shape, prune
from kcm_core.arch import ffn_blocks, transformer_layers
from kcm_core.runtime import model_inputs, token_mask
from kcm_core.curves import curve, curve_counts, error_curves, halfway, layer_order
from kcm_core.flops import keep_count, relative_flops
from kcm_core.pipeline import resolve_seq_len
from kcm_core.select import select, select_top_k, standardised


def direct_error(h, a, w, keep, damp):
    """The augmented, token-weighted, centred ridge error of refitting rows ``keep``, solved and summed
    term by term (not through the Cholesky of ``curve``)."""
    mean = (a[:, None] * h).sum(0) / a.sum()
    hc = h - mean
    g = (a[:, None] * hc).t() @ hc
    lam = damp * float(g.diagonal().mean())
    s = torch.tensor(keep, dtype=torch.long)
    dropped = torch.tensor([i for i in range(h.shape[1]) if i not in keep], dtype=torch.long)
    target = hc @ w
    if len(keep):
        fitted = torch.linalg.solve(g[s][:, s] + lam * torch.eye(len(keep), dtype=h.dtype),
                                    g[s] @ w + lam * w[s])
        residual = hc[:, s] @ fitted - target
        penalty = lam * ((fitted - w[s]) ** 2).sum()
    else:
        residual, penalty = -target, 0.0
    return float((a[:, None] * residual ** 2).sum() + penalty + lam * (w[dropped] ** 2).sum())


@pytest.mark.parametrize("damp", [1.0, 0.05])
def test_every_point_of_the_curve_is_the_refit_error_of_that_prefix(damp):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(40, 6, generator=gen, dtype=torch.float64) + 0.5
    h[:, 5] = 2 * h[:, 1] - h[:, 3] + 0.1                      # one neuron the others can stand in for
    a = torch.rand(40, generator=gen, dtype=torch.float64) + 0.1
    w = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    order = torch.tensor([2, 0, 5, 1, 4, 3])
    gram, h_sum = (a[:, None] * h).t() @ h, (a[:, None] * h).sum(0)
    values = curve(gram, h_sum, float(a.sum()), w, order, damp)
    assert values.shape == (7,)
    for k in range(7):
        expected = direct_error(h, a, w, sorted(order[:k].tolist()), damp)
        assert values[k].item() == pytest.approx(expected, rel=1e-8, abs=1e-9)
    assert (values[1:] <= values[:-1] + 1e-9).all()             # keeping more never costs more
    assert values[-1].item() == pytest.approx(0.0, abs=1e-9)    # everything kept: nothing to repair


def convex_curve(gen, width, scale):
    gains = torch.sort(torch.rand(width, generator=gen, dtype=torch.float64), descending=True).values * scale
    return torch.cat([gains.sum().reshape(1), gains.sum() - gains.cumsum(0)])


@pytest.mark.parametrize("k,floors", [(0, (0, 0, 0)), (5, (0, 0, 0)), (9, (2, 0, 1)), (13, (0, 0, 0)),
                                      (7, (3, 3, 1))])
def test_the_counts_minimise_the_summed_error_like_a_brute_force_search(k, floors):
    gen = torch.Generator().manual_seed(1)
    curves = [convex_curve(gen, 4, 1.0), convex_curve(gen, 5, 3.0), convex_curve(gen, 4, 0.2)]
    counts = curve_counts(curves, k, floors)
    assert sum(counts) == k and all(f <= c <= cv.numel() - 1 for c, f, cv in zip(counts, floors, curves))
    best = min(sum(float(cv[c]) for cv, c in zip(curves, combo))
               for combo in itertools.product(*(range(f, cv.numel()) for f, cv in zip(floors, curves)))
               if sum(combo) == k)
    assert sum(float(cv[c]) for cv, c in zip(curves, counts)) == pytest.approx(best, rel=1e-12)


def test_counts_that_cannot_be_kept_are_refused():
    curves = [torch.zeros(4), torch.zeros(3)]
    with pytest.raises(ValueError, match="cannot keep 6 neurons"):
        curve_counts(curves, 6, (0, 0))
    with pytest.raises(ValueError, match="at least"):
        curve_counts(curves, 2, (2, 1))


def test_halfway_keeps_the_total_and_sends_odd_halves_up_in_the_lower_layers():
    assert halfway([10, 0, 5], [0, 10, 5]) == [5, 5, 5]
    assert halfway([3, 0, 2], [0, 3, 2]) == [2, 1, 2]
    with pytest.raises(ValueError, match="cannot be averaged"):
        halfway([1, 2], [1, 1])


def test_select_averages_the_standardised_counts_with_the_curve_counts(tiny_model):
    shape = model_shape(tiny_model("bert", layers=3).config)
    gen = torch.Generator().manual_seed(2)
    widths = list(shape.ffn_width)
    scores = [torch.rand(w, generator=gen) * (i + 1) for i, w in enumerate(widths)]
    curves = [convex_curve(gen, w, s) for w, s in zip(widths, (1.0, 10.0, 0.1))]
    seq = 9.0
    k = keep_count(shape, seq, 0.8)
    plan = select(scores, shape, 0.8, seq, allocation="curve", curves=curves)
    expected = halfway(select_top_k(standardised(scores), k).kept_counts, curve_counts(curves, k, [0] * 3))
    assert plan.kept_counts == expected and plan.info.allocation == "curve"
    for layer, score, count in zip(plan.layers, scores, expected):       # within a layer: its best neurons
        assert list(layer.keep_idx) == sorted(layer_order(score)[:count].tolist())
    assert relative_flops(shape, seq, plan.kept_counts) <= 0.8
    floored = select(scores, shape, 0.8, seq, allocation="curve", curves=curves, min_per_layer=12)
    assert min(floored.kept_counts) >= 12 and floored.total_kept == k
    rounded = select(scores, shape, 0.8, seq, allocation="curve", curves=curves, multiple=8)
    assert all(c % 8 == 0 or c == w for c, w in zip(rounded.kept_counts, widths))
    with pytest.raises(ValueError, match="refit-error curve"):
        select(scores, shape, 0.8, seq, allocation="curve")


def test_error_curves_on_a_model_leave_it_unchanged_and_cover_every_layer(tiny_model, tiny_batches):
    model = tiny_model("llama", task="causal-lm")
    batches = tiny_batches(model, labels=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = [torch.arange(b, dtype=torch.float32) for b in model_shape(model.config).ffn_width]
    curves = error_curves(model, scores, batches, damp=1.0)
    assert len(curves) == len(scores) and all(c.numel() == s.numel() + 1 for c, s in zip(curves, scores))
    assert all((c[1:] <= c[:-1] + 1e-6 * c[0]).all() and c[-1] <= 1e-6 * c[0] for c in curves)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("family, task", [("bert", "classification"), ("mpnet", "classification"),
                                          ("distilbert", "classification"), ("llama", "causal-lm"),
                                          ("gpt2", "causal-lm")])
def test_each_token_is_weighted_by_what_the_next_norm_divides(tiny_model, tiny_batches, family, task):
    """Post-LN (BERT, MPNet, DistilBERT): the centred input of the layer's own LayerNorm, FFN output plus
    residual; pre-LN (LLaMA, GPT-2): the residual stream the layer hands on. Recomputed here from hooks
    on the modules named directly, then the curve of those sums."""
    model = tiny_model(family, task=task)
    batches = tiny_batches(model, labels=False)
    blocks = ffn_blocks(model)
    _, layers = transformer_layers(model)
    norms = {"bert": lambda l: l.output.LayerNorm, "mpnet": lambda l: l.output.LayerNorm,
             "distilbert": lambda l: l.output_layer_norm}.get(family)
    seen = {i: {"h": [], "x": []} for i in range(len(blocks))}
    handles = []
    for i, (block, layer) in enumerate(zip(blocks, layers)):
        handles.append(block.down.register_forward_pre_hook(lambda m, a, i=i: seen[i]["h"].append(a[0])))
        if norms is not None:
            handles.append(norms(layer).register_forward_pre_hook(
                lambda m, a, i=i: seen[i]["x"].append(a[0] - a[0].mean(-1, keepdim=True))))
        else:
            handles.append(layer.register_forward_hook(
                lambda m, a, out, i=i: seen[i]["x"].append(out[0] if isinstance(out, tuple) else out)))
    with torch.no_grad():
        for batch in batches:
            model(**model_inputs(batch, torch.device("cpu")))
    for h in handles:
        h.remove()
    scores = [torch.randn(b.width, generator=torch.Generator().manual_seed(i)) for i, b in enumerate(blocks)]
    curves = error_curves(model, scores, batches, damp=1.0)
    for i, block in enumerate(blocks):
        masks = [token_mask(b, x.shape, x.device) for b, x in zip(batches, seen[i]["x"])]
        h = torch.cat([x[m] for x, m in zip(seen[i]["h"], masks)]).double()
        x = torch.cat([x[m] for x, m in zip(seen[i]["x"], masks)]).double()
        a = 1.0 / (x * x).sum(1)
        expected = curve((h * a[:, None]).t() @ h, (h * a[:, None]).sum(0), float(a.sum()),
                         block.down_rows().detach(), layer_order(scores[i]), 1.0)
        assert torch.allclose(curves[i], expected, rtol=1e-4, atol=1e-6 * float(expected[0])), (family, i)


def test_the_curve_method_prunes_deterministically_within_the_budget(tiny_model, tiny_batches):
    model = tiny_model("llama", task="causal-lm")
    batches = tiny_batches(model, labels=False, n_batches=3)
    config = PruneConfig(method="fluct-refit-curve", budget=0.7)
    first, second = prune(model, config, batches), prune(model, config, batches)
    assert first.plan.info.allocation == "curve" and first.plan.info.repair == "refit"
    assert first.plan.layers == second.plan.layers
    assert "curves" in first.seconds
    shape = model_shape(model.config)
    assert relative_flops(shape, first.seq_len, first.plan.kept_counts) <= 0.7
    # the allocation is an option for any method with data: the paper's KCM, allocated by curve
    kcm = PruneConfig(method="kcm", budget=0.7, allocation="curve")
    scored = compute_scores(model, kcm, batches)
    assert scored.curves is not None
    plan = make_plan(model, scored, kcm, resolve_seq_len(shape, batches, None))
    assert plan.info.allocation == "curve"


def test_the_curve_allocation_without_data_says_what_is_missing(tiny_model):
    model = tiny_model("llama", task="causal-lm")
    with pytest.raises(ValueError, match="unlabeled data"):
        compute_scores(model, PruneConfig(method="weight-magnitude", allocation="curve"), [])
