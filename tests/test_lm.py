"""Causal language models: token blocks, perplexity / agreement / KL with known answers, the LLM
baselines (Wanda-sp, FLAP with bias compensation), and tiny GPT-2, LLaMA and Qwen2 through the
pipeline, export and reload."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import VOCAB, WIDTH
from kcm_core import PruneConfig, compute_scores, mask_copy, prune, slice_model
from kcm_core.activations import NeuronStats, collect_stats
from kcm_core.arch import ffn_blocks
from kcm_core.compensation import compensate
from kcm_core.data import TextData
from kcm_core.export import load_pruned, save_pruned
from kcm_core.lm import (RESAMPLES, BlockStats, blocks_of, bootstrap_p, bootstrap_p_text, check_block_size,
                         evaluate_lm, generate, paired_perplexity, split_blocks, token_stream)
from kcm_core.scores import flap, wanda_sp
from kcm_core.select import select_top_k


def lm_batches(model, n_blocks=6, block=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n_blocks * block,), generator=gen).tolist()
    return blocks_of(ids, block, batch_size=4)


class WordTokenizer:
    """Whitespace words -> ids (tiny, deterministic), with an end-of-text id."""
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + (sum(map(ord, w)) % (VOCAB - 1)) for w in text.split()]}


def test_blocks_are_fixed_length_disjoint_and_refuse_too_little_text():
    docs = TextData(tuple(" ".join(f"w{i}{j}" for j in range(10)) for i in range(6)))
    ids = token_stream(docs, WordTokenizer())
    assert len(ids) == 66 and ids[10] == 0                      # 10 words then the end-of-text id
    cal, ev = split_blocks(docs, docs, WordTokenizer(), 8)
    assert [b["input_ids"].shape for b in cal] == [torch.Size([4, 8])]      # 33 tokens -> 4 blocks
    assert sum(b["input_ids"].shape[0] for b in ev) == 4
    first_half = set(token_stream(docs.subset(range(3)), WordTokenizer())[:32])
    assert torch.cat([b["input_ids"] for b in cal]).flatten().tolist() == \
        token_stream(docs.subset(range(3)), WordTokenizer())[:32]
    assert first_half                                            # calibration = the first documents only
    with pytest.raises(ValueError, match="fewer than one block of 100"):
        blocks_of(ids, 100)


def test_block_size_over_the_context_is_refused(tiny_model):
    model = tiny_model("gpt2", "causal-lm", n_positions=16)
    check_block_size(model.config, 16)
    with pytest.raises(ValueError, match="longer than the model's context of 16 positions"):
        check_block_size(model.config, 17)


def test_a_model_that_knows_nothing_has_perplexity_equal_to_the_vocabulary(tiny_model):
    model = tiny_model("llama", "causal-lm")
    with torch.no_grad():
        model.lm_head.weight.zero_()                            # every next token equally likely
    result = evaluate_lm(model, lm_batches(model), reference=model)
    assert result.perplexity.value == pytest.approx(VOCAB, rel=1e-5)
    assert result.agreement.value == 1.0 and result.kl.value == pytest.approx(0.0, abs=1e-6)
    assert result.perplexity.n == 6 and result.perplexity.low <= VOCAB + 1e-3


def test_pruned_against_unpruned_is_paired_on_the_same_blocks(tiny_model):
    model = tiny_model("qwen2", "causal-lm", initializer_range=0.2)
    batches = lm_batches(model)
    before = evaluate_lm(model, batches)
    plan = select_top_k([torch.rand(WIDTH, generator=torch.Generator().manual_seed(i)) for i in range(2)], 30)
    pruned = slice_model(model, plan)
    after = evaluate_lm(pruned, batches, reference=model)
    paired = paired_perplexity(after.stats, before.stats)
    assert paired.ratio == pytest.approx(after.perplexity.value / before.perplexity.value, rel=1e-9)
    assert paired.low <= paired.ratio <= paired.high and paired.n == 6
    assert after.kl.value > 0 and after.agreement.value < 1
    with pytest.raises(ValueError, match="same blocks"):
        paired_perplexity(after.stats, evaluate_lm(model, batches[:1]).stats)


def block_stats_of(nll: list[float]) -> BlockStats:
    return BlockStats(np.array(nll), np.full(len(nll), 10.0), None, None)


def test_paired_perplexity_known_answers():
    before = block_stats_of([20.0, 30.0, 25.0, 40.0, 35.0])
    same = paired_perplexity(before, before, seed=4)
    assert (same.ratio, same.low, same.high, same.p_value) == (1.0, 1.0, 1.0, 1.0)
    # every block 1 nat worse over its 10 tokens: ratio exp(0.1) in every draw, so no draw reaches 1
    worse = paired_perplexity(block_stats_of([21.0, 31.0, 26.0, 41.0, 36.0]), before, seed=4)
    assert worse.ratio == pytest.approx(math.exp(0.1))
    assert worse.low == pytest.approx(math.exp(0.1)) and worse.high == pytest.approx(math.exp(0.1))
    assert worse.p_value == pytest.approx(2 / (RESAMPLES + 1))
    assert worse.to_dict()["p_value"] == worse.p_value
    assert paired_perplexity(block_stats_of([21.0]), block_stats_of([20.0])).p_value is None


def test_bootstrap_p_counts_draws_on_the_far_side():
    draws = np.array([0.9] * 30 + [1.1] * 70)      # 30 of 100 at or below 1
    assert bootstrap_p(draws, 1.0) == pytest.approx(2 * 31 / 101)
    assert bootstrap_p(np.array([1.0] * 10), 1.0) == 1.0
    assert bootstrap_p_text(2 / (RESAMPLES + 1)) == "< 0.002" and bootstrap_p_text(0.0412) == "0.0412"


def test_wanda_sp_and_flap_rank_by_their_formulas(tiny_model):
    model = tiny_model("llama", "causal-lm")
    widths = [b.width for b in ffn_blocks(model)]
    gen = torch.Generator().manual_seed(0)
    rms = tuple(torch.rand(w, generator=gen) for w in widths)
    var = tuple(torch.rand(w, generator=gen) for w in widths)
    zeros = tuple(torch.zeros(w) for w in widths)
    stats = NeuronStats(zeros, zeros, rms, tokens=16, sequences=2, var=var)
    norms = [b.down_rows().detach().norm(dim=1) for b in ffn_blocks(model)]
    for got, r, n in zip(wanda_sp(model, stats), rms, norms):
        assert torch.allclose(got, r * 4.0 * n)                     # ||x_i|| = rms * sqrt(16)
    for got, v, n in zip(flap(model, stats), var, norms):
        raw = v * n * n
        assert torch.allclose(got, (raw - raw.mean()) / raw.std(unbiased=False), atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_flap_compensation_keeps_the_mean_output_of_the_first_layer(tiny_model, family):
    model = tiny_model(family, "causal-lm", initializer_range=0.2)
    batches = lm_batches(model)
    stats = collect_stats(model, batches)
    plan = compensate(model, select_top_k(flap(model, stats), 20), stats.mean)
    assert plan.has_bias_shift and len(plan.layers[0].bias_shift) == 32

    def first_ffn_mean(m):
        outs = []
        handle = ffn_blocks(m)[0].down.register_forward_hook(lambda _m, _i, out: outs.append(out))
        with torch.no_grad():
            for b in batches:
                m(**b)
        handle.remove()
        return torch.cat([o.reshape(-1, o.shape[-1]) for o in outs]).double().mean(0)

    full, masked, sliced = first_ffn_mean(model), first_ffn_mean(mask_copy(model, plan)), \
        first_ffn_mean(slice_model(model, plan))
    assert torch.allclose(masked, full, atol=1e-5) and torch.allclose(sliced, full, atol=1e-5)
    without = first_ffn_mean(mask_copy(model, plan.with_bias_shifts([None] * len(plan.layers))))
    assert not torch.allclose(without, full, atol=1e-3)        # the compensation is what keeps it


@pytest.mark.parametrize("family,fields", [("mistral", {"sliding_window": None}), ("qwen2", {})])
def test_flap_on_a_family_without_an_mlp_bias_switch_gives_a_llama(tiny_model, family, fields):
    model = tiny_model(family, "causal-lm", initializer_range=0.2, **fields)
    batches = lm_batches(model)
    result = prune(model, PruneConfig(method="flap", budget=0.9), batches)
    assert result.plan.has_bias_shift and type(result.model).__name__ == "LlamaForCausalLM"
    assert math.isclose(evaluate_lm(result.model, batches).perplexity.value,
                        evaluate_lm(mask_copy(model, result.plan), batches).perplexity.value, rel_tol=1e-5)


def test_flap_is_refused_where_no_stock_class_can_hold_the_down_bias(tiny_model):
    model = tiny_model("mistral", "causal-lm")      # a sliding window of 4,096 of 131,072 positions
    with pytest.raises(ValueError, match="needs a bias on the down-projection.*sliding window of 4096"):
        compute_scores(model, PruneConfig(method="flap", budget=0.9), lm_batches(model))


@pytest.mark.parametrize("family,method", [("gpt2", "kcm"), ("llama", "flap"), ("llama", "wanda-sp"),
                                           ("qwen2", "kcm"), ("qwen2", "wanda-sp")])
def test_tiny_lms_prune_export_and_reload(export_reload, tiny_model, tmp_path, family, method):
    model = tiny_model(family, "causal-lm", initializer_range=0.1)
    batches = lm_batches(model)
    result = prune(model, PruneConfig(method=method, budget=0.9, scale_samples=8), batches)
    pruned = result.model
    assert type(pruned) is type(model)                             # the LM head is kept
    out = save_pruned(pruned, tmp_path / "out", plan=result.plan)
    assert out.reloaded_ok and out.max_abs_diff["hf"] <= 1e-4
    reloaded = load_pruned(tmp_path / "out")
    a = evaluate_lm(reloaded, batches).perplexity.value
    b = evaluate_lm(pruned, batches).perplexity.value
    assert math.isclose(a, b, rel_tol=1e-5)
    if method == "flap":
        assert reloaded.config.mlp_bias and out.loader in ("transformers", "kcm_core.load_pruned")


def test_generation_is_greedy_and_deterministic(tiny_model):
    model = tiny_model("gpt2", "causal-lm")

    class Tok:
        pad_token_id = eos_token_id = 0

        def __call__(self, text, return_tensors=None):
            ids = torch.tensor([[1 + (ord(c) % (VOCAB - 1)) for c in text]])

            class Enc(dict):
                def to(self, device):
                    return self
            return Enc(input_ids=ids, attention_mask=torch.ones_like(ids))

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(str(int(i)) for i in ids)

    first, second = generate(model, Tok(), "ab", 5), generate(model, Tok(), "ab", 5)
    assert first == second and len(first.split()) == 5
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, Tok(), "  ")
    assert np.isfinite([float(x) for x in first.split()]).all()


# A dynamo ONNX export costs 30 to 50 s on two shared cores: gpt2 keeps a decoder's export in the fast
# tier, llama's (rotary, grouped-query attention) is checked in the full run.
@pytest.mark.parametrize("family", ["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def test_a_pruned_lm_exports_to_onnx_and_matches_on_reload(export_reload, tiny_model, tmp_path, family):
    """ONNX of a decoder: the full-sequence logits (no KV cache), dynamic batch and sequence axes."""
    model = tiny_model(family, "causal-lm")
    pruned = slice_model(model, select_top_k([torch.rand(WIDTH, generator=torch.Generator().manual_seed(i))
                                              for i in range(2)], 40))
    out = save_pruned(pruned, tmp_path / "out", formats=("hf", "onnx"))
    assert out.reloaded_ok and out.max_abs_diff["onnx"] <= 1e-4 and (tmp_path / "out" / "model.onnx").is_file()


def test_generation_reports_each_new_token_and_stops_where_progress_raises(tmp_path):
    """Issue 22 (6): a superseded continuation must stop between two tokens, not after all of them.
    ``generate`` reports every new token; a report that raises ends the generation there."""
    import transformers as T

    from conftest import save_tiny_lm
    folder = save_tiny_lm(tmp_path / "gpt2", "gpt2", positions=64)
    model, tokenizer = T.AutoModelForCausalLM.from_pretrained(folder).eval(), T.AutoTokenizer.from_pretrained(folder)
    heard: list[tuple[str, float]] = []
    text = generate(model, tokenizer, "the movie was", 12, lambda message, fraction: heard.append((message, fraction)))
    assert text == generate(model, tokenizer, "the movie was", 12)          # reporting changes nothing
    assert [m for m, _ in heard] == [f"new token {i}/12" for i in range(1, 13)]
    assert heard[-1][1] == 1.0

    class Stop(Exception):
        pass
    done: list[str] = []

    def stop_at_third(message: str, fraction: float) -> None:
        done.append(message)
        if len(done) == 3:
            raise Stop
    with pytest.raises(Stop):
        generate(model, tokenizer, "the movie was", 12, stop_at_third)
    assert done == [f"new token {i}/12" for i in range(1, 4)]


def test_generation_past_the_positions_keeps_the_last_prompt_tokens_that_fit(tmp_path):
    """Issue 23 (5): the prompt plus the new tokens past a GPT-2's positions was an uncaught IndexError on
    the Prune page (the default prompt on a 32-position model). The last prompt tokens that fit are kept,
    and ``generation_note`` says so."""
    import transformers as T

    from conftest import LM_WORDS, save_tiny_lm
    from kcm_core.lm import fit_generation, generation_note
    folder = save_tiny_lm(tmp_path / "gpt2", "gpt2", positions=32)
    model, tokenizer = T.AutoModelForCausalLM.from_pretrained(folder).eval(), T.AutoTokenizer.from_pretrained(folder)
    long_prompt = " ".join(LM_WORDS[i % len(LM_WORDS)] for i in range(40))
    tokens = len(tokenizer(long_prompt)["input_ids"])
    assert tokens > 32
    text = generate(model, tokenizer, long_prompt, 20)
    # the same as generating 16 tokens from the last 16 prompt tokens alone (half the positions each)
    ids = tokenizer(long_prompt, return_tensors="pt")["input_ids"][:, -16:]
    with torch.no_grad():
        alone = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                               do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert text == tokenizer.decode(alone[0, 16:], skip_special_tokens=True)
    assert generation_note(model, tokenizer, long_prompt, 20) == (
        f"The prompt ({tokens} tokens) and 20 new tokens exceed this model's 32 positions: both models read "
        "only its last 16 tokens and write 16 new tokens, not 20.")
    assert fit_generation(model.config, 30, 10) == (22, 10)      # new tokens within half: the prompt is cut
    assert generation_note(model, tokenizer, "good film", 20) is None
    assert fit_generation(model.config, 3, 40) == (3, 29)         # a short prompt leaves room for new tokens
    assert fit_generation(model.config, 40, 40) == (16, 16)       # else half the positions each
    assert fit_generation(model.config, 1000, 40) == (16, 16)


def test_a_held_out_half_too_short_for_a_block_says_it_is_the_held_out_half():
    """Issue 23 (minor): a 3,000-word text whose held-out half was one short document was reported as
    "the text holds 10 tokens, fewer than one block", as if the whole text were that short."""
    class Tok:
        eos_token_id = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1 + (hash(w) % 50) for w in text.split()]}
    data = TextData(texts=(" ".join(["word"] * 3000), "a short last review of ten words or so here"))
    with pytest.raises(ValueError) as err:
        split_blocks(data, data, Tok(), 16)
    assert str(err.value).startswith("the held-out half of the documents (2-2 of 2; the split is by document, "
                                     "not by length): the text holds 10 tokens, fewer than one block of 16")
