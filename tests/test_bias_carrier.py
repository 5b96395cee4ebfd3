"""Mistral and Qwen2 models given MLP biases by a repair, held by stock LLaMA classes
(``kcm_core.bias_carrier``): the move keeps the logits at every position, refuses where a sliding window
would make the two differ, and the repaired export loads with plain ``transformers``: through the library,
the CLI and ``--stream``."""
from __future__ import annotations

import json
import random

import pytest
import torch
import transformers as T

from conftest import LM_WORDS, build_tiny_model, make_batches, same_state, save_tiny_lm, state_snapshot
from kcm_core import cli
from kcm_core.arch import ffn_blocks, transformer_layers
from kcm_core.bias_carrier import MOVED_FROM, carrier_refusal, into_carrier
from kcm_core.export import save_pruned
from kcm_core.export.loading import cast_parameters
from kcm_core.pipeline import PruneConfig, prune
from kcm_core.realise import mask_copy
from kcm_core.repair import RepairConfig

POSITIONS = 64
# Qwen2 and Mistral configs whose model LLaMA reproduces: (family, config fields)
MOVABLE = {
    "qwen2": ("qwen2", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen2-window-on-no-layer": ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}),
    "mistral-no-window": ("mistral", {"sliding_window": None}),
    "mistral-window-spans-context": ("mistral", {"sliding_window": POSITIONS}),
    "mistral-head_dim": ("mistral", {"sliding_window": None, "head_dim": 16}),
}


def _model(family: str, task: str = "causal-lm", **fields):
    # a short rotary wavelength, so every position turns the rotation; weights large enough to matter
    return build_tiny_model(family, task, layers=2, max_position_embeddings=POSITIONS, rope_theta=10.0,
                            initializer_range=0.2, **fields)


def _ids(batch: int = 2, length: int = POSITIONS) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 99, (batch, length), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, length - 5:] = 0                   # one row ends in padding
    return {"input_ids": ids, "attention_mask": mask}


def _out(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    value = getattr(out, "logits", None)
    return value if value is not None else out.last_hidden_state


@pytest.mark.parametrize("case", list(MOVABLE))
def test_a_tiny_qwen2_or_mistral_as_llama_gives_the_same_logits_at_every_position(case):
    family, fields = MOVABLE[case]
    model = _model(family, **fields)
    snapshot = state_snapshot(model)
    carrier = into_carrier(model)
    assert type(carrier) is T.LlamaForCausalLM and same_state(model, snapshot)
    config = carrier.config
    assert config.mlp_bias and config.attention_bias == (family == "qwen2")
    assert getattr(config, MOVED_FROM) == type(model).__name__
    assert config.head_dim == model.model.layers[0].self_attn.head_dim
    assert config.tie_word_embeddings == model.config.tie_word_embeddings
    assert (carrier.lm_head.weight is carrier.model.embed_tokens.weight) == config.tie_word_embeddings
    assert config.rope_parameters == model.config.rope_parameters
    for block in ffn_blocks(carrier):              # biases the model did not have are zero
        assert all(not layer.bias.any() for layer in (block.up, block.gate, block.down))
    layer = transformer_layers(carrier)[1][0]
    if family == "qwen2":                          # Q, K, V biases kept, O's zero
        assert torch.equal(layer.self_attn.q_proj.bias, model.model.layers[0].self_attn.q_proj.bias)
        assert not layer.self_attn.o_proj.bias.any()
    diff = float((_out(model, _ids()) - _out(carrier, _ids())).abs().max())
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
@pytest.mark.parametrize("task,cls", [("classification", T.LlamaForSequenceClassification), ("base", T.LlamaModel)])
def test_heads_and_backbones_move_to_their_llama_counterparts(family, task, cls):
    model = _model(family, task, sliding_window=None)
    carrier = into_carrier(model)
    assert type(carrier) is cls
    assert (_out(model, _ids()) - _out(carrier, _ids())).abs().max() <= 1e-5


def test_half_precision_moves_with_the_models_own_rotary_tables_and_eager_attention():
    model = _model("qwen2", attn="eager")
    cast_parameters(model, torch.bfloat16)         # as from_pretrained(dtype=bfloat16) loads it
    carrier = into_carrier(model)
    assert carrier.config._attn_implementation == "eager"
    assert next(carrier.parameters()).dtype == torch.bfloat16
    assert {b.dtype for n, b in carrier.named_buffers() if n.endswith("inv_freq")} == {torch.float32}
    assert torch.equal(_out(model, _ids()), _out(carrier, _ids()))


def test_a_sliding_window_shorter_than_the_context_is_refused_because_it_changes_the_logits():
    windowed = _model("mistral", sliding_window=8)
    reason = carrier_refusal(windowed.config)
    assert "every layer attends through a sliding window of 8 tokens" in reason
    assert f"max_position_embeddings ({POSITIONS})" in reason
    with pytest.raises(ValueError, match="sliding window of 8 tokens"):
        into_carrier(windowed)
    # why: the same weights without the window (what LLaMA computes) agree up to 8 positions, not past them
    unwindowed = _model("mistral", sliding_window=None)
    unwindowed.load_state_dict(windowed.state_dict())
    inputs = {"input_ids": _ids()["input_ids"]}
    a, b = _out(windowed, inputs), _out(unwindowed, inputs)
    assert (a[:, :8] - b[:, :8]).abs().max() <= 1e-5 and (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3
    # a bias repair is refused before any work, naming the reason and what to choose instead
    config = PruneConfig(method="d2", budget=0.85, repair=RepairConfig("bias"), scale_samples=8)
    with pytest.raises(ValueError, match="sliding window of 8 tokens.*repair that adds no bias"):
        prune(windowed, config, make_batches(windowed, labels=False))
    # Qwen2: only the layers its layer_types marks slide; Mistral's default window (4096 of 131072)
    qwen2 = _model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert "layers [1] attend through a sliding window of 8 tokens" in carrier_refusal(qwen2.config)
    assert "sliding window of 4096 tokens" in carrier_refusal(build_tiny_model("mistral", "causal-lm").config)


def test_refit_on_a_model_no_stock_class_carries_fits_no_intercept_and_keeps_its_class():
    model = _model("mistral", sliding_window=8)
    config = PruneConfig(method="d2", budget=0.85, repair=RepairConfig("refit"), scale_samples=8)
    result = prune(model, config, make_batches(model, labels=False))
    assert result.plan.info.repair_intercept is False and not result.plan.has_bias_shift
    assert type(result.model) is T.MistralForCausalLM


@pytest.mark.parametrize("family,fields", [("qwen2", {}), ("mistral", {"sliding_window": None})])
@pytest.mark.parametrize("kind", ["bias", "refit", "scales+bias"])
def test_a_repaired_qwen2_or_mistral_exports_as_stock_llama_with_the_pruned_logits(export_reload, tmp_path, family,
                                                                                 fields, kind):
    model = _model(family, **fields)
    batches = make_batches(model, labels=False)
    config = PruneConfig(method="d2", budget=0.85, repair=RepairConfig(kind), scale_samples=8, uniform=True)
    result = prune(model, config, batches)
    assert result.plan.has_bias_shift and type(result.model) is T.LlamaForCausalLM
    assert result.plan.info.repair_intercept is (None if kind == "bias" else True)   # FLAP's bias has none
    assert type(mask_copy(model, result.plan)) is T.LlamaForCausalLM          # masked and sliced alike
    export = save_pruned(result.model, tmp_path / "out", plan=result.plan)
    assert export.loader == "transformers" and export.reloaded_ok
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == ["LlamaForCausalLM"] and written["mlp_bias"] is True
    assert written[MOVED_FROM] == type(model).__name__
    note = json.loads((tmp_path / "out" / "export.json").read_text())["class_note"]
    assert note.startswith(f"The model is LlamaForCausalLM, not {type(model).__name__}: the repair adds biases")
    assert note in (tmp_path / "out" / "report.md").read_text()
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out")       # stock transformers only
    assert type(reloaded) is T.LlamaForCausalLM
    diff = float((_out(reloaded, _ids()) - _out(result.model, _ids())).abs().max())
    assert diff <= 1e-5, diff


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    root = tmp_path_factory.mktemp("carrier-docs")
    rng = random.Random(0)
    (root / "docs.txt").write_text(
        "\n".join(" ".join(rng.choice(LM_WORDS) for _ in range(30)) for _ in range(40)) + "\n")
    return root / "docs.txt"


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_the_cli_prunes_with_the_bias_repair_in_memory_and_streamed_to_the_same_stock_llama(
        export_reload, tmp_path, capsys, docs, family):
    model_dir = save_tiny_lm(tmp_path / family, family)
    common = ["prune", "--model", str(model_dir), "--data", str(docs), "--flops", "0.9", "--repair", "bias",
              "--uniform", "--block-size", "16", "--samples", "8", "--eval-blocks", "4"]
    assert cli.main(common + ["--out", str(tmp_path / "memory")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["repair"]["kind"] == "bias" and report["export"]["loader"] == "transformers"
    assert report["model"]["class_note"].startswith("The model is LlamaForCausalLM")
    assert f"- Class: {report['model']['class_note']}" in (tmp_path / "memory" / "report.md").read_text()
    assert cli.main(common + ["--out", str(tmp_path / "streamed"), "--stream"]) == 0
    streamed_report = json.loads(capsys.readouterr().out)
    assert streamed_report["model"]["class_note"] == report["model"]["class_note"]
    plans = [json.loads((tmp_path / name / "kcm_plan.json").read_text()) for name in ("memory", "streamed")]
    for a, b in zip(plans[0]["layers"], plans[1]["layers"]):
        assert a["keep_idx"] == b["keep_idx"]
        assert torch.allclose(torch.tensor(a["bias_shift"]), torch.tensor(b["bias_shift"]), atol=1e-5, rtol=0)
    memory, streamed = (T.AutoModelForCausalLM.from_pretrained(tmp_path / name) for name in ("memory", "streamed"))
    assert type(memory) is type(streamed) is T.LlamaForCausalLM
    ids = {"input_ids": torch.randint(5, len(LM_WORDS), (2, 12), generator=torch.Generator().manual_seed(0))}
    assert (_out(memory, ids) - _out(streamed, ids)).abs().max() <= 1e-5


def test_the_cli_refuses_a_bias_repair_where_a_sliding_window_binds_in_one_line(tmp_path, capsys, docs):
    model_dir = save_tiny_lm(tmp_path / "mistral", "mistral", sliding_window=8)
    for stream in ([], ["--stream"]):
        capsys.readouterr()
        code = cli.main(["prune", "--model", str(model_dir), "--data", str(docs), "--flops", "0.9",
                         "--repair", "scales+bias", "--block-size", "16", "--samples", "8",
                         "--out", str(tmp_path / "out"), *stream])
        err = capsys.readouterr().err
        assert code == 2 and "sliding window of 8 tokens" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists()
