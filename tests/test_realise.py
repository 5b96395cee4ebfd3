"""The heart of the suite: one plan, two realisations. Masking a copy and slicing into smaller layers
must give the same outputs (1e-5 in fp32) for every family, at every budget, with emptied layers and
with scales; neither may touch the caller's model; slicing keeps dtype and device and records the
new widths in the config; a plan survives a JSON round trip."""
import pytest
import torch

from conftest import TINY_FAMILIES, WIDTH, same_state, state_snapshot
from kcm_core import KeepPlan, LayerKeep, mask_copy, model_shape, slice_model
from kcm_core.arch import ffn_blocks, transformer_layers
from kcm_core.flops import flops_floor
from kcm_core.scores import random_scores
from kcm_core.select import select

SEQ = 9.0
WIDTH_FIELD = {"distilbert": "hidden_dim", "gpt2": "n_inner"}


def random_plan_scales(plan: KeepPlan, seed: int) -> KeepPlan:
    """Non-trivial scales in [-0.5, 2] for every kept neuron."""
    gen = torch.Generator().manual_seed(seed)
    return plan.with_scales([(torch.rand(layer.kept, generator=gen) * 2.5 - 0.5).tolist()
                             for layer in plan.layers])


def plans_for(model) -> dict[str, KeepPlan]:
    shape = model_shape(model.config)
    scores = random_scores(shape.ffn_width, seed=1)
    floor = flops_floor(shape, SEQ)
    plans = {
        "0.95": select(scores, shape, 0.95, SEQ),
        "0.8-scaled": random_plan_scales(select(scores, shape, 0.8, SEQ), seed=2),
        "floor": select(scores, shape, floor + 0.2 * (1 - floor) * 0.05, SEQ),
    }
    # Layer 0 emptied completely, layer 1 keeps 13 neurons, layer 2 all of them; with scales.
    gen = torch.Generator().manual_seed(3)
    mixed = KeepPlan((LayerKeep((), WIDTH),
                      LayerKeep(tuple(sorted(torch.randperm(WIDTH, generator=gen)[:13].tolist())), WIDTH),
                      LayerKeep(tuple(range(WIDTH)), WIDTH)))
    plans["emptied-layer-scaled"] = random_plan_scales(mixed, seed=4)
    plans["all-emptied"] = KeepPlan.from_masks([torch.zeros(WIDTH, dtype=torch.bool)] * 3)
    return plans


def outputs(model, batches) -> list[torch.Tensor]:
    """Logits and every hidden state, for every batch."""
    out = []
    with torch.no_grad():
        for batch in batches:
            result = model(**{k: v for k, v in batch.items() if k != "labels"},
                           output_hidden_states=True)
            out.append(result.logits)
            out.extend(result.hidden_states)
    return out


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_masked_and_sliced_agree_for_every_family_and_budget(tiny_model, tiny_batches, family):
    model = tiny_model(family, layers=3)
    batches = tiny_batches(model, n_batches=2)
    snapshot = state_snapshot(model)
    param_ids = [id(p) for p in model.parameters()]
    config_before = model.config.to_dict()
    dense = outputs(model, batches)
    for name, plan in plans_for(model).items():
        masked = mask_copy(model, plan)
        sliced = slice_model(model, plan)
        assert [b.width for b in ffn_blocks(sliced)] == plan.kept_counts, name
        assert [b.width for b in ffn_blocks(masked)] == [WIDTH] * 3, name
        got_masked, got_sliced = outputs(masked, batches), outputs(sliced, batches)
        for m, s in zip(got_masked, got_sliced):
            assert m.shape == s.shape
            assert torch.allclose(m, s, atol=1e-5, rtol=1e-5), (name, float((m - s).abs().max()))
        # The plan really changed the model (so the agreement above is not trivial).
        assert max(float((m - d).abs().max()) for m, d in zip(got_masked, dense)) > 1e-3, name
    # The caller's model: same parameter objects, same values, same config.
    assert [id(p) for p in model.parameters()] == param_ids
    assert same_state(model, snapshot)
    assert model.config.to_dict() == config_before
    assert not hasattr(model.config, "kcm_ffn_widths")
    for a, b in zip(dense, outputs(model, batches)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_keep_all_plan_reproduces_the_model_exactly(tiny_model, tiny_batches, family):
    model = tiny_model(family)
    batches = tiny_batches(model)
    plan = KeepPlan.keep_all([WIDTH, WIDTH])
    dense = outputs(model, batches)
    for realised in (mask_copy(model, plan), slice_model(model, plan)):
        for a, b in zip(dense, outputs(realised, batches)):
            assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_an_emptied_ffn_outputs_only_its_bias(tiny_model, tiny_batches, family):
    model = tiny_model(family)
    batch = tiny_batches(model, n_batches=1, labels=False)[0]
    plan = KeepPlan((LayerKeep((), WIDTH), LayerKeep(tuple(range(WIDTH)), WIDTH)))
    for realised in (mask_copy(model, plan), slice_model(model, plan)):
        down = ffn_blocks(realised)[0].down
        seen = {}
        handle = down.register_forward_hook(lambda _m, _a, y: seen.setdefault("y", y))
        with torch.no_grad():
            realised(**batch)
        handle.remove()
        bias = down.bias if down.bias is not None else torch.zeros(down.weight.shape[0])  # LLaMA: none
        assert torch.allclose(seen["y"], bias.expand_as(seen["y"]), atol=1e-7)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "vit"])
def test_sliced_layers_hold_the_kept_rows_with_scales_folded_in(tiny_model, family):
    model = tiny_model(family)
    keep = (1, 4, 5, 20, 36)
    scales = (2.0, -1.0, 0.5, 1.0, 3.0)
    plan = KeepPlan((LayerKeep(keep, WIDTH, scales), LayerKeep(tuple(range(0, WIDTH, 2)), WIDTH)))
    sliced = slice_model(model, plan)
    old, new = ffn_blocks(model)[0], ffn_blocks(sliced)[0]
    idx, s = torch.tensor(keep), torch.tensor(scales)
    assert torch.equal(new.up_cols(), old.up_cols()[idx])
    assert torch.allclose(new.down_rows(), old.down_rows()[idx] * s[:, None])
    if old.gate is not None:
        assert torch.equal(new.gate_cols(), old.gate_cols()[idx])
    if old.up.bias is not None:
        assert torch.equal(new.up.bias, old.up.bias[idx])
    if old.down.bias is not None:
        assert torch.equal(new.down.bias, old.down.bias)
    # New tensors, not views of the caller's.
    assert {p.data_ptr() for p in sliced.parameters()}.isdisjoint(
        {p.data_ptr() for b in ffn_blocks(model) for p in (b.up.weight, b.down.weight)})
    assert all(p.requires_grad for p in sliced.parameters())


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_float64_models_stay_float64_and_agree(tiny_model, tiny_batches, family):
    model = tiny_model(family, layers=3, dtype=torch.float64)
    batches = tiny_batches(model)
    plan = plans_for(model)["emptied-layer-scaled"]
    sliced, masked = slice_model(model, plan), mask_copy(model, plan)
    device = next(model.parameters()).device
    for realised in (sliced, masked):
        assert {p.dtype for p in realised.parameters()} == {torch.float64}
        assert {p.device for p in realised.parameters()} == {device}
    for block in ffn_blocks(sliced):
        for module in (block.up, block.down, block.gate):
            if module is not None:
                assert module.weight.dtype == torch.float64 and module.weight.device == device
    for m, s in zip(outputs(masked, batches), outputs(sliced, batches)):
        assert m.dtype == torch.float64
        assert torch.allclose(m, s, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_slicing_stays_on_the_models_device(tiny_model, family):
    """The meta device stands in for an accelerator: nothing may fall back to the CPU."""
    model = tiny_model(family).to("meta")
    plan = KeepPlan((LayerKeep((), WIDTH), LayerKeep((1, 2, 30), WIDTH, (1.0, 2.0, 3.0))))
    for realised in (slice_model(model, plan), mask_copy(model, plan)):
        assert {p.device.type for p in realised.parameters()} == {"meta"}
    assert [b.width for b in ffn_blocks(slice_model(model, plan))] == [0, 3]


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "llama", "vit"])
def test_config_records_the_widths(tiny_model, family):
    model = tiny_model(family, layers=3)
    field = WIDTH_FIELD.get(family, "intermediate_size")
    uniform = KeepPlan.from_masks([torch.arange(WIDTH) % 3 == 0] * 3)          # 13 each
    sliced = slice_model(model, uniform)
    assert getattr(sliced.config, field) == 13 and not hasattr(sliced.config, "kcm_ffn_widths")
    assert model_shape(sliced.config).ffn_width == (13, 13, 13)

    ragged = plans_for(model)["emptied-layer-scaled"]
    sliced = slice_model(model, ragged)
    assert sliced.config.kcm_ffn_widths == [0, 13, WIDTH]
    assert getattr(sliced.config, field) == WIDTH
    assert model_shape(sliced.config).ffn_width == (0, 13, WIDTH)
    assert "kcm_ffn_widths" in sliced.config.to_dict()

    # Slicing again to a uniform width clears the per-layer record.
    emptied = KeepPlan.from_masks([torch.zeros(w, dtype=torch.bool) for w in (0, 13, WIDTH)])
    again = slice_model(sliced, emptied)
    assert getattr(again.config, field) == 0 and not hasattr(again.config, "kcm_ffn_widths")
    # The caller's config never changes.
    assert getattr(model.config, field) == WIDTH and not hasattr(model.config, "kcm_ffn_widths")


def test_a_sliced_model_can_be_sliced_again(tiny_model, tiny_batches):
    model = tiny_model("gpt2", layers=3)
    batches = tiny_batches(model)
    first = plans_for(model)["emptied-layer-scaled"]
    sliced = slice_model(model, first)
    second = KeepPlan((LayerKeep((), 0), LayerKeep((0, 5, 12), 13),
                       LayerKeep(tuple(range(0, WIDTH, 2)), WIDTH)))
    twice = slice_model(sliced, second)
    assert [b.width for b in ffn_blocks(twice)] == [0, 3, 19]
    for m, s in zip(outputs(mask_copy(sliced, second), batches), outputs(twice, batches)):
        assert torch.allclose(m, s, atol=1e-5)


def test_plans_that_do_not_fit_the_model_are_refused(tiny_model):
    model = tiny_model("bert", layers=3)
    with pytest.raises(ValueError, match="plan has 2 layers, the model has 3"):
        mask_copy(model, KeepPlan.keep_all([WIDTH, WIDTH]))
    with pytest.raises(ValueError, match="plan expects 36 neurons in layer 0"):
        slice_model(model, KeepPlan.keep_all([36, WIDTH, WIDTH]))


def test_keep_plan_json_round_trip():
    plan = KeepPlan(
        (LayerKeep((0, 3, 36), WIDTH, (1.5, -0.25, 1e-3)), LayerKeep((), WIDTH, ()),
         LayerKeep((2, 7), 11)),
        method="kcm", info={"budget": 0.6, "seq_len": 25.16, "scaled_layers": 2, "k": 5},
    )
    back = KeepPlan.from_json(plan.to_json())
    assert back == plan
    assert back.info == plan.info and back.method == "kcm" and back.info.seq_len == 25.16
    assert [layer.scales for layer in back.layers] == [(1.5, -0.25, 1e-3), (), None]
    assert back.kept_counts == [3, 0, 2] and back.widths == [WIDTH, WIDTH, 11]
    assert KeepPlan.from_json(back.to_json()).to_json() == plan.to_json()


def test_layer_keep_names_the_direction_and_validates():
    layer = LayerKeep((1, 3), 5, (2.0, 0.5))
    assert layer.keep_mask().tolist() == [False, True, False, True, False]   # True means keep
    assert layer.drop_idx() == (0, 2, 4)
    assert layer.scale_vector().tolist() == [0.0, 2.0, 0.0, 0.5, 0.0]
    assert LayerKeep((1, 3), 5).scale_vector().tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="sorted and unique"):
        LayerKeep((3, 1), 5)
    with pytest.raises(ValueError, match="sorted and unique"):
        LayerKeep((1, 1), 5)
    with pytest.raises(ValueError, match="out of range"):
        LayerKeep((1, 5), 5)
    with pytest.raises(ValueError, match="out of range"):
        LayerKeep((-1, 2), 5)
    with pytest.raises(ValueError, match="1 scales for 2 kept neurons"):
        LayerKeep((1, 3), 5, (1.0,))


def test_from_masks_and_layers_of_the_model(tiny_model):
    masks = [torch.tensor([True, False, True]), torch.tensor([False, False])]
    plan = KeepPlan.from_masks(masks, method="m", info={"a": 1})
    assert [list(layer.keep_idx) for layer in plan.layers] == [[0, 2], []]
    assert plan.total_kept == 2 and plan.widths == [3, 2] and not plan.has_scales
    assert plan.with_scales([[1.0, 2.0], []]).has_scales
    name, layers = transformer_layers(tiny_model("bert", layers=3))
    assert name == "bert.encoder.layer" and len(layers) == 3
