"""The analytic cost model, checked against PyTorch's own FLOP counter and docs/method.md's known answer."""
import math

import pytest
import torch
import transformers as T
from torch.utils.flop_counter import FlopCounterMode

from conftest import HIDDEN, WIDTH
from kcm_core import count_params, keep_count, model_shape, relative_flops, slice_model
from kcm_core.arch import ffn_blocks, transformer_layers
from kcm_core.flops import (cost_report, encoder_macs, estimate_layer_params, flops_floor,
                            layer_costs, mac_per_head, mac_per_neuron)
from kcm_core.plan import KeepPlan, LayerKeep

SEQ = 11


def measured_layer_flops(model, inputs) -> list[int]:
    """FLOPs that ``FlopCounterMode`` attributes to each transformer layer for one forward pass."""
    prefix, layers = transformer_layers(model)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    return [sum(counts.get(f"{root}.{prefix}.{i}", {}).values()) for i in range(len(layers))]


def one_sequence(model) -> tuple[dict, int]:
    """One unpadded sequence and its length in tokens (patches + CLS for ViT)."""
    gen = torch.Generator().manual_seed(0)
    if model.config.model_type == "vit":
        size = model.config.image_size
        tokens = (size // model.config.patch_size) ** 2 + 1
        return {"pixel_values": torch.randn(1, 3, size, size, generator=gen)}, tokens
    return {"input_ids": torch.randint(2, 99, (1, SEQ), generator=gen)}, SEQ


def mixed_plan(widths, seed=0) -> KeepPlan:
    """Layer 0 emptied, the others keep a random 40% / 70% ..., with scales."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for i, w in enumerate(widths):
        kept = 0 if i == 0 else int(w * (0.3 + 0.4 * i / len(widths)))
        keep = sorted(torch.randperm(w, generator=gen)[:kept].tolist())
        layers.append(LayerKeep(tuple(keep), w, tuple(1.0 + 0.1 * j for j in range(kept))))
    return KeepPlan(tuple(layers))


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "llama", "vit"])
def test_analytic_macs_match_flop_counter_before_and_after_slicing(tiny_model, family):
    model = tiny_model(family, layers=3, attn="eager")
    assert model.config._attn_implementation == "eager"
    inputs, s = one_sequence(model)
    shape = model_shape(model.config)

    dense = measured_layer_flops(model, inputs)
    analytic = [2 * row.total for row in layer_costs(shape, s)]
    assert dense == [pytest.approx(a, rel=1e-12) for a in analytic]
    assert sum(dense) == pytest.approx(2 * encoder_macs(shape, s), rel=1e-12)

    plan = mixed_plan(shape.ffn_width)
    sliced = slice_model(model, plan)
    assert [b.width for b in ffn_blocks(sliced)] == plan.kept_counts
    pruned = measured_layer_flops(sliced, inputs)
    assert pruned[0] < dense[0]     # the emptied layer still runs its attention
    assert pruned == [pytest.approx(2 * row.total, rel=1e-12)
                      for row in layer_costs(shape, s, plan.kept_counts)]
    # The sliced model's own config describes the same cost.
    assert 2 * encoder_macs(model_shape(sliced.config), s) == pytest.approx(sum(pruned), rel=1e-12)
    assert relative_flops(shape, s, plan.kept_counts) == pytest.approx(sum(pruned) / sum(dense))


def test_method_md_formula_per_head_and_neuron():
    shape = model_shape(T.BertConfig())
    s, d, dh = 25.16, 768, 64
    assert mac_per_head(shape, s) == pytest.approx(4 * s * d * dh + 2 * s * s * dh, rel=1e-12)
    assert mac_per_neuron(shape, s) == pytest.approx(2 * s * d, rel=1e-12)
    full = 12 * (12 * mac_per_head(shape, s) + 3072 * mac_per_neuron(shape, s))
    assert encoder_macs(shape, s) == pytest.approx(full, rel=1e-12)


def test_bert_base_known_answer_from_the_paper():
    shape = model_shape(T.BertConfig())
    assert keep_count(shape, 25.16, 0.6) == 14624
    assert keep_count(shape, 25.16, 1.0) == 36864
    # The count is the largest that fits: one more neuron would exceed the budget.
    assert relative_flops(shape, 25.16, [14624] + [0] * 11) <= 0.6
    assert relative_flops(shape, 25.16, [14625] + [0] * 11) > 0.6
    # "FFN-only pruning cannot go below roughly 34%".
    assert 0.33 < flops_floor(shape, 25.16) < 0.35


def test_keep_count_is_the_largest_fitting_count_on_a_tiny_shape(tiny_model):
    shape = model_shape(tiny_model("bert", layers=3).config)
    floor = flops_floor(shape, 9)
    for budget in (1.0, 0.95, 0.8, 0.7, floor + 1e-6, floor):
        k = keep_count(shape, 9, budget)
        counts = [min(k, WIDTH), min(max(k - WIDTH, 0), WIDTH), max(k - 2 * WIDTH, 0)]
        assert sum(counts) == k
        assert relative_flops(shape, 9, counts) <= budget + 1e-12
        if k < 3 * WIDTH:
            more = list(counts)
            more[next(i for i, c in enumerate(more) if c < WIDTH)] += 1
            assert relative_flops(shape, 9, more) > budget
    assert keep_count(shape, 9, floor) == 0


def test_gated_models_count_three_projections_per_neuron(tiny_model):
    shape = model_shape(tiny_model("llama").config)
    assert mac_per_neuron(shape, 5) == 3 * 5 * HIDDEN
    # K and V are shared by pairs of query heads: (2 + 2 * 2/4) s d dh + 2 s^2 dh.
    assert mac_per_head(shape, 5) == pytest.approx(3 * 5 * HIDDEN * 8 + 2 * 25 * 8)


def test_budget_below_the_floor_names_the_floor():
    shape = model_shape(T.BertConfig())
    floor = flops_floor(shape, 25.16)
    with pytest.raises(ValueError) as err:
        keep_count(shape, 25.16, 0.2)
    assert f"{floor:.3f}" in str(err.value) and "0.2" in str(err.value)


@pytest.mark.parametrize("budget", [1.7, 1.0000001, 0.0, -0.5, float("nan"), "0.5", None])
def test_budget_outside_zero_one_raises(budget):
    shape = model_shape(T.BertConfig())
    with pytest.raises(ValueError, match="budget"):
        keep_count(shape, 25.16, budget)


@pytest.mark.parametrize("seq_len", [0, -3, float("inf"), float("nan")])
def test_bad_sequence_length_raises(seq_len):
    with pytest.raises(ValueError, match="sequence length"):
        encoder_macs(model_shape(T.BertConfig()), seq_len)


@pytest.mark.parametrize("family,per_neuron", [
    ("bert", 2 * HIDDEN + 1), ("mpnet", 2 * HIDDEN + 1), ("distilbert", 2 * HIDDEN + 1), ("gpt2", 2 * HIDDEN + 1),
    ("llama", 3 * HIDDEN), ("qwen2", 3 * HIDDEN), ("vit", 2 * HIDDEN + 1),
])
def test_count_params_exact_and_drop_per_neuron(tiny_model, family, per_neuron):
    model = tiny_model(family, layers=3)
    counted = count_params(model)
    assert counted.total == sum(p.numel() for p in model.parameters())
    _, layers = transformer_layers(model)
    assert counted.layers == tuple(sum(p.numel() for p in layer.parameters()) for layer in layers)
    assert counted.head == sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for p in model.base_model.parameters())

    plan = mixed_plan([WIDTH] * 3)
    sliced = slice_model(model, plan)
    after = count_params(sliced)
    dropped = 3 * WIDTH - plan.total_kept
    assert counted.total - after.total == dropped * per_neuron
    assert after.total == sum(p.numel() for p in sliced.parameters())
    assert [a - b for a, b in zip(counted.layers, after.layers)] == [
        (WIDTH - k) * per_neuron for k in plan.kept_counts]
    assert (after.embeddings, after.head) == (counted.embeddings, counted.head)
    backbone = count_params(tiny_model(family, "base", layers=3))
    assert backbone.head == 0 and backbone.layers == counted.layers


@pytest.mark.parametrize("family", [
    "bert", "mpnet", "distilbert", "gpt2", "llama", "mistral", "vit", "qwen2",
])
def test_layer_parameter_estimate_matches_the_real_layers(tiny_model, family):
    model = tiny_model(family, layers=2)
    shape = model_shape(model.config)
    assert [estimate_layer_params(shape, WIDTH)] * 2 == list(count_params(model).layers)


def test_the_layer_estimate_counts_llamas_attention_and_mlp_biases(tiny_model):
    # what a Mistral or Qwen2 given MLP biases becomes (kcm_core.bias_carrier): the O projection's bias too
    model = tiny_model("llama", layers=2, attention_bias=True, mlp_bias=True)
    shape = model_shape(model.config)
    assert shape.qkv_bias and shape.out_bias and shape.mlp_bias
    assert [estimate_layer_params(shape, WIDTH)] * 2 == list(count_params(model).layers)


def test_cost_report_uses_measured_params_and_sums_blocks(tiny_model):
    model = tiny_model("bert", layers=3)
    shape = model_shape(model.config)
    report = cost_report(shape, 9, [37, 10, 0], params=count_params(model))
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert report.encoder_macs == pytest.approx(encoder_macs(shape, 9, [37, 10, 0]))
    assert report.relative_flops == pytest.approx(relative_flops(shape, 9, [37, 10, 0]))
    data = report.to_dict()
    assert data["encoder_flops"] == pytest.approx(2 * data["encoder_macs"])
    assert [row["neurons"] for row in data["layers"]] == [37, 10, 0]
    assert math.isclose(report.ffn_share,
                        sum(r.ffn for r in report.layers) / report.encoder_macs)


def test_explicit_head_dim_counts_the_real_projections_floor_keep_count_and_achieved(tiny_model):
    """Issue 23 (2): a config whose ``head_dim`` is not hidden / heads (Mistral-Nemo style). A tiny Mistral
    with head_dim 16 (hidden 32, 4 heads: 8 by division) is measured by ``FlopCounterMode``: per layer,
    the floor (every neuron removed), the keep count and the achieved relative FLOPs follow the weights."""
    model = tiny_model("mistral", layers=3, attn="eager", head_dim=16)
    assert model.model.layers[0].self_attn.q_proj.out_features == 4 * 16
    inputs, s = one_sequence(model)
    shape = model_shape(model.config)
    assert shape.head_dim == 16
    dense = measured_layer_flops(model, inputs)
    assert dense == [pytest.approx(2 * row.total, rel=1e-12) for row in layer_costs(shape, s)]

    empty = slice_model(model, KeepPlan(tuple(LayerKeep((), w) for w in shape.ffn_width)))
    floor = sum(measured_layer_flops(empty, inputs)) / sum(dense)
    assert flops_floor(shape, s) == pytest.approx(floor, rel=1e-12)
    with pytest.raises(ValueError, match="below what FFN-only pruning can reach"):
        keep_count(shape, s, floor - 0.01)

    budget = floor + 0.6 * (1 - floor)
    k = keep_count(shape, s, budget)
    counts = [min(k, WIDTH), min(max(k - WIDTH, 0), WIDTH), max(k - 2 * WIDTH, 0)]
    plan = KeepPlan(tuple(LayerKeep(tuple(range(c)), WIDTH) for c in counts))
    achieved = sum(measured_layer_flops(slice_model(model, plan), inputs)) / sum(dense)
    assert relative_flops(shape, s, counts) == pytest.approx(achieved, rel=1e-12)
    assert achieved <= budget + 1e-12
    more = list(counts)
    more[next(i for i, c in enumerate(more) if c < WIDTH)] += 1
    plan_more = KeepPlan(tuple(LayerKeep(tuple(range(c)), WIDTH) for c in more))
    assert sum(measured_layer_flops(slice_model(model, plan_more), inputs)) / sum(dense) > budget
