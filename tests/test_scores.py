"""Scorers: D2 statistics against hand-made activations and a manual hook computation, the
normalisations, weight magnitude on hand-set weights, random scores, mask gradients; and that every
scorer leaves the caller's model as it was (no hooks, no .grad, same training flags)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import HIDDEN, WIDTH, same_state, state_snapshot
from kcm_core.activations import NeuronStats, collect_stats
from kcm_core.arch import ffn_blocks
from kcm_core.scaling import fit_scales, teacher_targets
from kcm_core.scores import (D2Config, d2, mask_gradients, normalise, output_magnitude, r2d2,
                             random_scores, weight_magnitude)
from kcm_core.select import select_top_k


def hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def manual_stats(model, batches):
    """Mean, mean |.|, RMS of every down-projection input over the real tokens, by plain hooks."""
    blocks = ffn_blocks(model)
    rows = [[] for _ in blocks]
    for batch in batches:
        seen = {}
        handles = [b.down.register_forward_pre_hook(
            lambda _m, args, i=i: seen.__setitem__(i, args[0])) for i, b in enumerate(blocks)]
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k != "labels"})
        for h in handles:
            h.remove()
        mask = batch.get("attention_mask")
        for i in range(len(blocks)):
            h = seen[i].double()
            rows[i].append(h[mask.bool()] if mask is not None else h.reshape(-1, h.shape[-1]))
    cat = [torch.cat(r) for r in rows]
    return ([c.mean(0) for c in cat], [c.abs().mean(0) for c in cat],
            [c.pow(2).mean(0).sqrt() for c in cat], cat[0].shape[0])


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "llama", "vit"])
def test_collect_stats_matches_a_manual_hook_computation(tiny_model, tiny_batches, family):
    model = tiny_model(family)
    batches = tiny_batches(model, n_batches=2)
    stats = collect_stats(model, batches)
    mean, mean_abs, rms, tokens = manual_stats(model, batches)
    assert stats.tokens == tokens and stats.sequences == 8
    if family != "vit":
        assert tokens == sum(int(b["attention_mask"].sum()) for b in batches) == 2 * (36 - 8)
    for got, want in zip(stats.mean + stats.mean_abs + stats.rms, mean + mean_abs + rms):
        assert got.shape == (WIDTH,) and got.dtype == torch.float32
        assert torch.allclose(got.double(), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "llama"])
def test_tokens_at_padded_positions_do_not_change_the_stats(tiny_model, tiny_batches, family):
    model = tiny_model(family)
    batches = tiny_batches(model)
    base = collect_stats(model, batches)
    gen = torch.Generator().manual_seed(5)
    changed_pads, changed_real = [], []
    for b in batches:
        noise = torch.randint(2, 99, b["input_ids"].shape, generator=gen)
        pad = b["attention_mask"] == 0
        changed_pads.append({**b, "input_ids": torch.where(pad, noise, b["input_ids"])})
        changed_real.append({**b, "input_ids": torch.where(pad, b["input_ids"], noise)})
    same = collect_stats(model, changed_pads)
    for a, c in zip(base.mean + base.rms, same.mean + same.rms):
        assert torch.allclose(a, c, atol=1e-6)
    # The check can fail: changing real tokens does change the statistics.
    other = collect_stats(model, changed_real)
    assert not torch.allclose(base.mean[0], other.mean[0], atol=1e-4)


def test_d2_known_answer_with_hand_made_activations(tiny_model, tiny_batches):
    """Up-projections with zero weights and bias b: every token's activation is exactly gelu(b)."""
    model = tiny_model("bert")
    perm = torch.randperm(WIDTH, generator=torch.Generator().manual_seed(1))
    biases = [0.05 + 0.1 * perm.float(), 2.0 - 0.05 * perm.float()]     # two opposite rankings
    with torch.no_grad():
        for block, b in zip(ffn_blocks(model), biases):
            block.up.weight.zero_()
            block.up.bias.copy_(b)
    stats = collect_stats(model, tiny_batches(model))
    scores = d2(stats)          # paper default: mean, min-max per layer
    for s, b in zip(scores, biases):
        g = F.gelu(b.double())
        assert torch.allclose(s.double(), (g - g.min()) / (g.max() - g.min()), atol=1e-6)
        assert torch.equal(torch.sort(s, stable=True).indices, torch.sort(b, stable=True).indices)
    assert int(scores[0].argmax()) == int(perm.argmax()) and int(scores[1].argmax()) == int(perm.argmin())
    raw = d2(stats, D2Config(statistic="mean_abs", normalise="none"))
    assert torch.allclose(raw[0].double(), F.gelu(biases[0].double()), atol=1e-6)


def test_normalisations_known_answers():
    x = torch.tensor([1.0, 3.0, 2.0, 5.0])
    assert torch.allclose(normalise(x, "minmax"), torch.tensor([0.0, 0.5, 0.25, 1.0]))
    z = normalise(torch.tensor([1.0, 2.0, 3.0]), "zscore")
    assert torch.allclose(z, torch.tensor([-1.0, 0.0, 1.0]) * (1.5 ** 0.5))
    none = normalise(x, "none")
    assert torch.equal(none, x) and none.data_ptr() != x.data_ptr()
    assert torch.equal(normalise(torch.full((4,), 7.0), "minmax"), torch.ones(4))
    assert torch.equal(normalise(torch.full((4,), 7.0), "zscore"), torch.zeros(4))
    assert normalise(torch.zeros(0), "minmax").shape == (0,)


@pytest.mark.parametrize("statistic,normalisation", [("mean", "zscore"), ("rms", "minmax"),
                                                     ("mean_abs", "none")])
def test_d2_options_pick_the_statistic_and_normalisation(tiny_model, tiny_batches, statistic,
                                                         normalisation):
    model = tiny_model("bert")
    stats = collect_stats(model, tiny_batches(model))
    got = d2(stats, D2Config(statistic=statistic, normalise=normalisation))
    for g, raw in zip(got, getattr(stats, statistic)):
        assert torch.equal(g, normalise(raw, normalisation))


@pytest.mark.parametrize("kwargs", [{"statistic": "median"}, {"normalise": "l2"}])
def test_d2_config_validation(kwargs):
    with pytest.raises(ValueError, match=repr(next(iter(kwargs.values())))):
        D2Config(**kwargs)


def test_r2d2_is_the_elementwise_product():
    a, b = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])], [torch.tensor([0.5, 0.0]), torch.tensor([2.0])]
    assert [t.tolist() for t in r2d2(a, b)] == [[0.5, 0.0], [6.0]]


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_weight_magnitude_known_answer(tiny_model, family):
    """Row i of the up-projection filled with a_i, column i of the down with c_i (gate with g_i):
    the score is ||a_i 1_d|| * ||c_i 1_d|| (* ||g_i 1_d||) = d |a_i c_i| (* sqrt(d) |g_i|)."""
    model = tiny_model(family)
    a = torch.arange(1, WIDTH + 1, dtype=torch.float32) / WIDTH        # (N,)
    c = torch.linspace(2.0, -1.0, WIDTH)
    g = torch.linspace(0.5, 1.5, WIDTH)
    with torch.no_grad():
        for block in ffn_blocks(model):
            if block.transposed:        # Conv1D: up (d, N), down (N, d)
                block.up.weight.copy_(a[None, :].expand(HIDDEN, WIDTH))
                block.down.weight.copy_(c[:, None].expand(WIDTH, HIDDEN))
            else:                       # Linear: up (N, d), down (d, N)
                block.up.weight.copy_(a[:, None].expand(WIDTH, HIDDEN))
                block.down.weight.copy_(c[None, :].expand(HIDDEN, WIDTH))
                if block.gate is not None:
                    block.gate.weight.copy_(g[:, None].expand(WIDTH, HIDDEN))
    expected = HIDDEN * (a * c).abs()
    if family == "llama":
        expected = expected * HIDDEN ** 0.5 * g.abs()
    for s in weight_magnitude(model):
        assert torch.allclose(s, expected, rtol=1e-5)


def test_output_magnitude_is_mean_abs_times_down_row_norm(tiny_model, tiny_batches):
    model = tiny_model("gpt2")
    stats = collect_stats(model, tiny_batches(model))
    for s, m, block in zip(output_magnitude(model, stats), stats.mean_abs, ffn_blocks(model)):
        assert torch.allclose(s, m * block.down.weight.detach().norm(dim=1))


def test_random_scores_are_determined_by_the_seed():
    a, b = random_scores([37, 5], seed=7), random_scores([37, 5], seed=7)
    assert [t.shape[0] for t in a] == [37, 5]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = random_scores([37, 5], seed=8)
    assert not torch.equal(a[0], c[0])


def test_mask_gradients_leave_no_grad_and_follow_the_chain_rule(tiny_model, tiny_batches):
    model = tiny_model("bert")
    with torch.no_grad():       # neuron 5 of layer 0 writes nothing: its mask gradient is exactly 0
        ffn_blocks(model)[0].down.weight[:, 5] = 0.0
    batches = tiny_batches(model, n_batches=1)
    snapshot = state_snapshot(model)
    config_before = model.config.to_dict()
    squared = mask_gradients(model, batches, squared=True)
    plain = mask_gradients(model, batches, squared=False)
    assert all(p.grad is None for p in model.parameters())
    assert model.config.to_dict() == config_before      # the loss sets problem_type; it is put back
    assert all(p.requires_grad for p in model.parameters())
    assert same_state(model, snapshot) and hook_count(model) == 0
    assert [s.shape[0] for s in squared] == [WIDTH, WIDTH]
    assert float(squared[0][5]) == 0.0 and float(plain[0][5]) == 0.0
    assert int((plain[0] > 0).sum()) == WIDTH - 1 and bool((plain[1] > 0).all())
    for s, p in zip(squared, plain):        # one batch: Fisher = |grad|^2
        assert torch.allclose(s, p * p, rtol=1e-5)


def test_mask_gradients_match_autograd_on_an_explicit_mask(tiny_model, tiny_batches):
    model = tiny_model("llama")
    batch = tiny_batches(model, n_batches=1)[0]
    got = mask_gradients(model, [batch], squared=False)
    twin = copy.deepcopy(model)
    masks = [torch.ones(WIDTH, requires_grad=True) for _ in range(2)]
    for block, m in zip(ffn_blocks(twin), masks):
        block.down.register_forward_pre_hook(lambda _mod, args, m=m: (args[0] * m,))
    loss = twin(**batch).loss
    loss.backward()
    for g, m in zip(got, masks):
        assert torch.allclose(g, m.grad.abs(), rtol=1e-4, atol=1e-7)


def test_mask_gradients_need_labels(tiny_model, tiny_batches):
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="labels"):
        mask_gradients(model, tiny_batches(model, labels=False))
    with pytest.raises(ValueError, match="empty"):
        mask_gradients(model, [])
    assert hook_count(model) == 0


def test_scorers_restore_training_flags(tiny_model, tiny_batches):
    model = tiny_model("bert").train()
    model.bert.encoder.layer[1].eval()         # a mixed state must come back exactly
    flags = [m.training for m in model.modules()]
    batches = tiny_batches(model)
    collect_stats(model, batches)
    mask_gradients(model, batches)
    teacher_targets(model, batches)
    assert [m.training for m in model.modules()] == flags


class Boom(Exception):
    pass


def _raise(*_args):
    raise Boom


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_hooks_are_removed_even_when_the_forward_raises(tiny_model, tiny_batches, family):
    model = tiny_model(family)
    assert hook_count(model) == 0
    batches = tiny_batches(model)
    bad = [batches[0], {**batches[1], "input_ids": batches[1]["input_ids"] + 1000}]   # out of vocab
    snapshot = state_snapshot(model)
    with pytest.raises((IndexError, RuntimeError)):
        collect_stats(model, bad)
    assert hook_count(model) == 0
    with pytest.raises(Boom):       # an error raised between batches, hooks still registered
        collect_stats(model, batches, progress=_raise, total=2)
    assert hook_count(model) == 0
    with pytest.raises((IndexError, RuntimeError)):
        mask_gradients(model, bad)
    assert hook_count(model) == 0
    with pytest.raises((IndexError, RuntimeError)):
        teacher_targets(model, bad)
    assert hook_count(model) == 0
    plan = select_top_k(random_scores([WIDTH, WIDTH], seed=0), 40)
    with pytest.raises(ValueError, match="scaling: the model fails on the calibration data"):
        fit_scales(model, plan, bad)
    assert hook_count(model) == 0
    assert all(hook_count(b.down) == 0 for b in ffn_blocks(model))
    assert same_state(model, snapshot) and all(p.grad is None for p in model.parameters())


def test_d2_auto_uses_the_signed_mean_only_for_ungated_ffns():
    """A gated MLP's input act(gate) * up has no preferred sign: auto ranks it by magnitude."""
    mean = (torch.tensor([-3.0, 0.5, 1.0]),)
    stats = NeuronStats(mean, (torch.tensor([3.0, 0.5, 1.0]),), mean, tokens=4, sequences=1)
    assert d2(stats, D2Config(), gated=False)[0].argmax() == 2          # the paper's signed mean
    assert d2(stats, D2Config(), gated=True)[0].argmax() == 0           # |x| for gated MLPs
    assert D2Config().statistic_for(True) == "mean_abs" and D2Config("rms").statistic_for(True) == "rms"
