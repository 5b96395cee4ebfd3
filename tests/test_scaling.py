"""Scaling: fitted scales bring the pruned model closer to the unpruned one on the same data; the ridge
pulls toward 1; the bound stops scaling and the plan says where."""
import pytest
import torch

from conftest import WIDTH, same_state, state_snapshot
from kcm_core import KeepPlan, LayerKeep, ScaleConfig, fit_scales, mask_copy
from kcm_core.arch import ffn_blocks
from kcm_core.scaling import teacher_targets
from kcm_core.scores import random_scores
from kcm_core.select import select_top_k


def half_plan(seed: int = 0, layers: int = 3) -> KeepPlan:
    return select_top_k(random_scores([WIDTH] * layers, seed=seed), 50)


def last_hidden_mse(model, reference, batches) -> float:
    """Mean squared difference of the last hidden states over the real tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            inputs = {k: v for k, v in b.items() if k != "labels"}
            a = model(**inputs, output_hidden_states=True).hidden_states[-1]
            r = reference(**inputs, output_hidden_states=True).hidden_states[-1]
            diff = (a - r)[b["attention_mask"].bool()]                     # (tokens, d)
            total += float(diff.pow(2).sum())
            count += diff.numel()
    return total / count


def ffn_output(model, batches, layer: int) -> torch.Tensor:
    """Layer ``layer``'s FFN output minus bias on the real tokens, (tokens, d)."""
    return teacher_targets(model, batches)[layer]


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_fitted_scales_reduce_the_error_against_the_unpruned_model(tiny_model, tiny_batches, family):
    # A larger init than the default 0.02 makes the FFNs matter, so pruning does visible damage.
    model = tiny_model(family, layers=3, initializer_range=0.1)
    batches = tiny_batches(model, n_batches=3, batch_size=8, seq_len=11)
    snapshot = state_snapshot(model)
    plan = half_plan()
    fitted = fit_scales(model, plan, batches)
    assert fitted.info.scaled_layers == 3 and fitted.info.scaling_stopped_at is None
    assert fitted.info.scale_ridge == 1.0
    assert [layer.keep_idx for layer in fitted.layers] == [layer.keep_idx for layer in plan.layers]
    assert all(len(layer.scales) == layer.kept for layer in fitted.layers)
    assert max(abs(s - 1) for layer in fitted.layers for s in layer.scales) > 1e-3
    unscaled, scaled = mask_copy(model, plan), mask_copy(model, fitted)
    assert last_hidden_mse(scaled, model, batches) < last_hidden_mse(unscaled, model, batches)
    # Layer 0 sees the same inputs in all three models, and its scales minimise the ridge objective,
    # so its FFN output error cannot be worse than with scales of 1.
    target = ffn_output(model, batches, 0)
    err_scaled = (ffn_output(scaled, batches, 0) - target).pow(2).sum()
    err_unscaled = (ffn_output(unscaled, batches, 0) - target).pow(2).sum()
    assert err_scaled < err_unscaled
    # fit_scales used a copy: the caller's model is untouched.
    assert same_state(model, snapshot)


def test_keep_all_plan_gets_scales_of_one(tiny_model, tiny_batches):
    """Nothing pruned: the pruned layer already reproduces the teacher, so s = 1 solves it exactly."""
    model = tiny_model("bert", layers=2)
    fitted = fit_scales(model, KeepPlan.keep_all([WIDTH, WIDTH]), tiny_batches(model),
                        ScaleConfig(ridge=0.0))
    scales = torch.tensor([s for layer in fitted.layers for s in layer.scales])
    assert scales.shape == (2 * WIDTH,)
    assert torch.allclose(scales, torch.ones_like(scales), atol=1e-3)


def test_huge_ridge_keeps_scales_at_one(tiny_model, tiny_batches):
    model = tiny_model("llama", layers=3)
    fitted = fit_scales(model, half_plan(), tiny_batches(model), ScaleConfig(ridge=1e9))
    assert fitted.info.scaled_layers == 3
    assert max(abs(s - 1) for layer in fitted.layers for s in layer.scales) < 1e-6
    free = fit_scales(model, half_plan(), tiny_batches(model), ScaleConfig(ridge=1e-6))
    assert max(abs(s - 1) for layer in free.layers for s in layer.scales) > 1e-2


def test_tiny_bound_stops_scaling_and_says_where(tiny_model, tiny_batches):
    model = tiny_model("bert", layers=3)
    batches = tiny_batches(model)
    stopped = fit_scales(model, half_plan(), batches, ScaleConfig(bound=1e-3))
    assert stopped.info.scaled_layers == 0 and stopped.info.scaling_stopped_at == 0
    assert [layer.scales for layer in stopped.layers] == [None, None, None]
    # An emptied layer 0 needs no scales; the stop then happens at layer 1.
    plan = KeepPlan((LayerKeep((), WIDTH),) + half_plan().layers[1:])
    stopped = fit_scales(model, plan, batches, ScaleConfig(bound=1e-3))
    assert stopped.info.scaled_layers == 1 < 3
    assert stopped.info.scaling_stopped_at == 1
    assert [layer.scales for layer in stopped.layers] == [(), None, None]


def test_passing_precomputed_targets_gives_the_same_scales(tiny_model, tiny_batches):
    model = tiny_model("gpt2", layers=3)
    batches = tiny_batches(model)
    targets = teacher_targets(model, batches)
    assert [tuple(t.shape) for t in targets] == [(36 - 8 + 36 - 8, 32)] * 3
    a = fit_scales(model, half_plan(), batches)
    b = fit_scales(model, half_plan(), batches, targets=targets)
    assert [layer.scales for layer in a.layers] == [layer.scales for layer in b.layers]


def test_scaling_an_emptied_layer_and_reports_progress(tiny_model, tiny_batches):
    model = tiny_model("vit", layers=3)
    plan = KeepPlan((LayerKeep(tuple(range(0, WIDTH, 3)), WIDTH), LayerKeep((), WIDTH),
                     LayerKeep(tuple(range(20)), WIDTH)))
    calls = []
    fitted = fit_scales(model, plan, tiny_batches(model), progress=lambda m, f: calls.append(f))
    assert fitted.info.scaled_layers == 3 and fitted.layers[1].scales == ()
    assert calls[-1] == 1.0 and all(0.0 <= f <= 1.0 for f in calls)
    assert calls == sorted(calls)


def test_fit_scales_needs_data(tiny_model):
    with pytest.raises(ValueError, match="empty"):
        fit_scales(tiny_model("bert"), half_plan(layers=2), [])


@pytest.mark.parametrize("kwargs,word", [({"ridge": -1.0}, "ridge"), ({"ridge": float("nan")}, "ridge"),
                                         ({"bound": 0.0}, "bound"), ({"bound": -2.0}, "bound")])
def test_scale_config_validation(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ScaleConfig(**kwargs)


def test_scales_are_folded_into_the_down_projection_columns(tiny_model, tiny_batches):
    model = tiny_model("bert", layers=2)
    fitted = fit_scales(model, half_plan(layers=2), tiny_batches(model))
    masked = mask_copy(model, fitted)
    for old, new, layer in zip(ffn_blocks(model), ffn_blocks(masked), fitted.layers):
        expected = old.down.weight.detach() * layer.scale_vector().float()[None, :]
        assert torch.allclose(new.down.weight, expected)


def test_a_calibration_batch_the_model_cannot_run_is_a_clear_value_error(tiny_model, tiny_batches):
    """Sequences longer than the model's positions used to escape as torch's RuntimeError."""
    model = tiny_model("bert", layers=2, max_position_embeddings=8)
    batches = tiny_batches(model, seq_len=12, labels=False)
    with pytest.raises(ValueError, match="scaling: the model fails on the calibration data"):
        fit_scales(model, half_plan(layers=2), batches)
