"""The repair step (``kcm_core.repair``) as an axis of its own, and the allocation across layers
(``kcm_core.select``): known answers, the pruned model never changed, masked = sliced, streamed =
in memory, and the choice recorded through the library and the CLI."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_model, make_batches, same_state, state_snapshot
from kcm_core import cli
from kcm_core.activations import collect_stats
from kcm_core.arch import ffn_blocks
from kcm_core.compensation import compensate
from kcm_core.methods import DEFAULT_METHOD
from kcm_core.pipeline import PruneConfig, prune
from kcm_core.plan import KeepPlan
from kcm_core.realise import mask_copy, slice_model
from kcm_core.repair import REPAIRS, RepairConfig, fit_repair
from kcm_core.select import select_top_k, standardised


def _logits(model, batches):
    with torch.no_grad():
        return [model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches]


def _duplicated_llama(copies: dict[int, tuple[int, float]]):
    """A tiny LLaMA whose neuron j (in ``copies``: j -> (i, c)) computes exactly neuron i's activation
    and writes c times neuron i's output: dropping j loses nothing the kept neurons cannot carry."""
    model = build_tiny_model("llama", "causal-lm", layers=2)
    with torch.no_grad():
        for block in ffn_blocks(model):
            for j, (i, c) in copies.items():
                block.up.weight[j] = block.up.weight[i]
                block.gate.weight[j] = block.gate.weight[i]
                block.down.weight[:, j] = c * block.down.weight[:, i]
    return model


def _plan_dropping(model, drop: set[int]) -> KeepPlan:
    masks = []
    for block in ffn_blocks(model):
        m = torch.ones(block.width, dtype=torch.bool)
        m[list(drop)] = False
        masks.append(m)
    return KeepPlan.from_masks(masks, method="test")


@pytest.mark.parametrize("kind,config", [("refit", dict(damp=1e-9)), ("scales", dict())])
def test_a_layer_the_kept_neurons_can_represent_is_reproduced_exactly(kind, config):
    copies = {3: (0, 0.5), 7: (1, -2.0), 11: (2, 1.5)}
    model = _duplicated_llama(copies)
    batches = make_batches(model, labels=False, n_batches=2)
    plan = _plan_dropping(model, set(copies))
    repaired = fit_repair(model, plan, batches, RepairConfig(kind, "local", **config), ridge=0.0)
    before = _logits(mask_copy(model, plan), batches)
    after = _logits(slice_model(model, repaired), batches)
    dense = _logits(model, batches)
    assert max(float((b - d).abs().max()) for b, d in zip(before, dense)) > 1e-2    # dropping hurts
    assert max(float((a - d).abs().max()) for a, d in zip(after, dense)) < 1e-4     # repair undoes it
    if kind == "scales":
        scales = repaired.layers[0].scales
        keep = repaired.layers[0].keep_idx
        for j, (i, c) in copies.items():
            assert scales[keep.index(i)] == pytest.approx(1 + c, abs=1e-4)
    assert all(after_err < 1e-4 for _, after_err in repaired.info.repair_errors)


def test_obs_re_chooses_the_neurons_the_others_can_carry_and_keeps_the_count():
    copies = {3: (0, 0.5), 7: (1, -2.0), 11: (2, 1.5)}
    model = _duplicated_llama(copies)
    batches = make_batches(model, labels=False, n_batches=2)
    plan = _plan_dropping(model, {20, 21, 22})          # neurons nothing else can stand in for
    repaired = fit_repair(model, plan, batches, RepairConfig("obs", "local", damp=1e-9))
    assert repaired.kept_counts == plan.kept_counts
    for layer in repaired.layers:
        dropped = set(layer.drop_idx())
        assert all(len(dropped & {i, j}) == 1 for j, (i, _) in copies.items())
    assert repaired.info.repair_swapped == [3, 3]
    dense, after = _logits(model, batches), _logits(slice_model(model, repaired), batches)
    assert max(float((a - d).abs().max()) for a, d in zip(after, dense)) < 1e-4
    for before, after_err in repaired.info.repair_errors:
        assert before > 1e-2 and after_err < 1e-4


@pytest.mark.parametrize("family,task", [("llama", "causal-lm"), ("gpt2", "causal-lm"), ("bert", "classification"),
                                         ("qwen2", "causal-lm")])
def test_obs_masks_and_slices_alike_at_the_selections_flops(family, task):
    model = build_tiny_model(family, task, layers=2)
    batches = make_batches(model, labels=False, n_batches=2)
    snapshot = state_snapshot(model)
    selected = prune(model, PruneConfig(method="d2", budget=0.8, repair=RepairConfig("none")), batches)
    result = prune(model, PruneConfig(method="d2", budget=0.8, repair=RepairConfig("obs")), batches)
    assert same_state(model, snapshot)
    assert result.plan.kept_counts == selected.plan.kept_counts
    assert result.plan.info.repair == "obs" and result.plan.info.repair_target == "local"
    for a, b in zip(_logits(result.model, batches), _logits(mask_copy(model, result.plan), batches)):
        assert (a - b).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="rows were refitted"):
        mask_copy(model, KeepPlan.from_json(result.plan.to_json()))


def test_obs_against_the_teacher_is_refused():
    with pytest.raises(ValueError, match="its target is local"):
        RepairConfig("obs", "teacher")


def test_the_intercept_is_the_dropped_neurons_mean_output_when_the_scales_are_one():
    model = build_tiny_model("llama", "causal-lm", layers=1)
    batches = make_batches(model, labels=False, n_batches=2)
    plan = _plan_dropping(model, {0, 5, 9, 20})
    local = fit_repair(model, plan, batches, RepairConfig("bias", "local"))
    flap = compensate(model, plan, collect_stats(model, batches).mean)
    # one layer: the pruned model's inputs to it are the unpruned model's, so both biases agree
    assert torch.allclose(torch.tensor(local.layers[0].bias_shift), torch.tensor(flap.layers[0].bias_shift),
                          atol=1e-5)
    assert local.layers[0].scales is None and local.layers[0].rows is None


def test_on_the_first_layer_the_teacher_and_the_local_target_are_the_same_problem():
    model = build_tiny_model("gpt2", "causal-lm", layers=2)
    batches = make_batches(model, labels=False, n_batches=2)
    plan = _plan_dropping(model, {1, 2, 30})
    a = fit_repair(model, plan, batches, RepairConfig("refit", "teacher"))
    b = fit_repair(model, plan, batches, RepairConfig("refit", "local"))
    assert torch.allclose(a.layers[0].rows, b.layers[0].rows, atol=1e-5)
    assert not torch.allclose(a.layers[1].rows, b.layers[1].rows, atol=1e-5)   # later layers differ


# Mistral and Qwen2 have no MLP-bias switch: a repair that adds a bias realises them as LLaMA
# (kcm_core.bias_carrier, tests/test_bias_carrier.py); this Mistral's window spans its context
@pytest.mark.parametrize("family,task", [("llama", "causal-lm"), ("gpt2", "causal-lm"), ("bert", "classification"),
                                         ("qwen2", "causal-lm"), ("mistral", "causal-lm"),
                                         ("distilbert", "classification")])
@pytest.mark.parametrize("kind", ["none", "bias", "scales", "scales+bias", "refit"])
@pytest.mark.parametrize("target", ["teacher", "local"])
def test_every_repair_masks_and_slices_alike_and_leaves_the_model_untouched(family, task, kind, target):
    fields = {"sliding_window": None} if family == "mistral" else {}
    model = build_tiny_model(family, task, layers=2, **fields)
    batches = make_batches(model, labels=False, n_batches=2)
    snapshot = state_snapshot(model)
    config = PruneConfig(method="d2", budget=0.85, repair=RepairConfig(kind, target), scale_samples=8)
    result = prune(model, config, batches)
    assert same_state(model, snapshot)
    assert result.plan.info.repair == kind
    masked = mask_copy(model, result.plan)
    assert type(masked) is type(result.model)
    moved = family in ("qwen2", "mistral") and result.plan.has_bias_shift
    assert type(result.model).__name__ == ("LlamaForCausalLM" if moved else type(model).__name__)
    for a, b in zip(_logits(result.model, batches), _logits(masked, batches)):
        assert (a - b).abs().max() <= 1e-5
    if kind == "refit":
        assert result.plan.has_rows
        assert result.plan.info.repair_intercept is True       # every family: Mistral and Qwen2 as LLaMA
        for before, after in result.plan.info.repair_errors:
            assert after <= before + 1e-9


def test_refit_lowers_every_layers_error_below_the_scaling_steps():
    model = build_tiny_model("llama", "causal-lm", layers=3)
    batches = make_batches(model, labels=False, n_batches=3)
    plan = _plan_dropping(model, set(range(0, 37, 3)))
    refit = fit_repair(model, plan, batches, RepairConfig("refit", "local"))
    scales = fit_repair(model, plan, batches, RepairConfig("scales", "local"))
    # each run has its own inputs past the first layer (its earlier layers were repaired its own way),
    # so each repair is compared with its own "before"; on the first layer both see the same inputs
    (first_before, first_refit), (_, first_scales) = refit.info.repair_errors[0], scales.info.repair_errors[0]
    assert first_refit < first_scales <= first_before + 1e-9
    for before, after in refit.info.repair_errors + scales.info.repair_errors:
        assert after <= before + 1e-9
    for (_, after_refit), (_, after_scales) in zip(refit.info.repair_errors, scales.info.repair_errors):
        assert after_refit < after_scales


def test_a_refitted_plan_read_back_from_json_says_its_rows_live_in_the_weights():
    model = build_tiny_model("llama", "causal-lm")
    batches = make_batches(model, labels=False)
    result = prune(model, PruneConfig(method="d2", budget=0.85, repair=RepairConfig("refit")), batches)
    back = KeepPlan.from_json(result.plan.to_json())
    assert back.info.repair == "refit" and not back.has_rows
    assert "rows" not in json.loads(result.plan.to_json())["layers"][0]
    with pytest.raises(ValueError, match="refitted"):
        slice_model(model, back)


def test_bad_repair_options_are_refused_with_the_value():
    with pytest.raises(ValueError, match="'rebuild'"):
        RepairConfig("rebuild")
    with pytest.raises(ValueError, match="'student'"):
        RepairConfig("refit", "student")
    with pytest.raises(ValueError, match="damp"):
        RepairConfig("refit", damp=0)
    with pytest.raises(ValueError, match="allocation"):
        PruneConfig(allocation="even")
    assert set(REPAIRS) == {"none", "bias", "scales", "scales+bias", "refit", "obs"}


def test_standardised_allocation_does_not_let_one_layers_scale_decide():
    # layer 0's scores are 1000x layer 1's: pooled keeps layer 0 whole, standardised splits the budget
    big = (torch.arange(10, dtype=torch.float32) + 1) * 1000
    small = torch.arange(10, dtype=torch.float32)
    pooled = select_top_k([big, small], 10)
    even = select_top_k(standardised([big, small]), 10)
    assert pooled.kept_counts == [10, 0]
    assert even.kept_counts == [5, 5]
    assert even.layers[0].keep_idx == (5, 6, 7, 8, 9)
    assert standardised([torch.ones(4)])[0].tolist() == [0.0] * 4      # a constant layer: all zeros


def test_the_method_row_brings_its_own_repair_and_allocation_and_the_config_overrides_them():
    assert PruneConfig(method="kcm").resolved_repair == RepairConfig("scales", "teacher")
    assert PruneConfig(method="kcm").resolved_allocation == "pooled"
    assert PruneConfig(method="flap").resolved_repair == RepairConfig("bias", "teacher")
    assert PruneConfig(method="wanda-sp").resolved_repair.kind == "none"
    assert PruneConfig(method="flap", repair=RepairConfig("refit")).resolved_repair == RepairConfig("refit", "local")
    assert PruneConfig(method="kcm", allocation="standardised").resolved_allocation == "standardised"
    assert PruneConfig().method == DEFAULT_METHOD


def test_the_repair_choice_reaches_the_report_through_the_cli(export_reload, tmp_path, capsys):
    from conftest import save_tiny_lm, LM_WORDS
    folder = tmp_path / "lm"
    save_tiny_lm(folder, "llama")
    data = tmp_path / "docs.txt"
    data.write_text("\n".join(" ".join(LM_WORDS[(i * 7 + j) % len(LM_WORDS)] for j in range(60))
                              for i in range(30)))
    out = tmp_path / "out"
    code = cli.main(["prune", "--model", str(folder), "--data", str(data), "--flops", "0.9", "--out", str(out),
                     "--method", "d2", "--repair", "refit", "--allocation", "standardised",
                     "--block-size", "16", "--eval-blocks", "2"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["options"]["repair"]["kind"] == "refit"
    assert report["options"]["allocation"] == "standardised"
    assert report["repair"]["kind"] == "refit" and report["repair"]["target"] == "local"
    assert report["repair"]["allocation"] == "standardised" and report["repair"]["intercept"] is True
    assert len(report["repair"]["layer_errors"]) == 2
    assert report["method"]["default"] == (DEFAULT_METHOD == "d2")


# Qwen2 and Mistral (its window spanning the context) are written as LLaMA where the repair adds a bias
@pytest.mark.parametrize("family,kind,target", [
    *[(f, k, t) for f in ("llama", "gpt2") for k, t in (("refit", "local"), ("refit", "teacher"),
                                                       ("scales+bias", "local"), ("bias", "local"))],
    ("qwen2", "refit", "local"), ("qwen2", "refit", "teacher"), ("qwen2", "bias", "local"),
    ("qwen2", "scales+bias", "local"), ("mistral", "refit", "local"), ("mistral", "bias", "local"), ("llama", "obs", "local"),
    ("gpt2", "obs", "local")])
def test_streamed_repairs_equal_in_memory(tmp_path, family, kind, target):
    from kcm_core.export import load_pruned
    from kcm_core.streamed import prune_streamed
    fields = {"sliding_window": None} if family == "mistral" else {}
    model = build_tiny_model(family, "causal-lm", layers=3, **fields)
    model.save_pretrained(tmp_path / "model")
    batches = make_batches(model, labels=False, n_batches=2)
    config = PruneConfig(method="d2", budget=0.8, scale_samples=8, repair=RepairConfig(kind, target),
                         allocation="standardised")
    reference = prune(model, config, batches)
    streamed = prune_streamed(tmp_path / "model", config, batches, tmp_path / "out")
    assert [l.keep_idx for l in streamed.plan.layers] == [l.keep_idx for l in reference.plan.layers]
    assert streamed.plan.info.repair == kind and streamed.plan.info.repair_target == target
    for (a_before, a_after), (b_before, b_after) in zip(reference.plan.info.repair_errors,
                                                        streamed.plan.info.repair_errors):
        assert a_before == pytest.approx(b_before, abs=1e-5) and a_after == pytest.approx(b_after, abs=1e-5)
    loaded = load_pruned(tmp_path / "out")
    assert type(loaded) is type(reference.model)
    for x, y in zip(_logits(reference.model, batches), _logits(loaded, batches)):
        assert (x - y).abs().max() <= 1e-4
