"""Mistral and Qwen2 models given MLP biases by a repair, held by stock LLaMA classes
(``kcm_core.bias_carrier``): the move keeps the logits at every position and refuses where a sliding window
would make the two differ."""
from __future__ import annotations

import pytest
import torch
import transformers as T

from conftest import build_tiny_model, same_state, state_snapshot
from kcm_core.arch import ffn_blocks, transformer_layers
from kcm_core.bias_carrier import MOVED_FROM, carrier_refusal, into_carrier
from kcm_core.export.loading import cast_parameters

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
    # Qwen2: only the layers its layer_types marks slide; Mistral's default window (4096 of 131072)
    qwen2 = _model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert "layers [1] attend through a sliding window of 8 tokens" in carrier_refusal(qwen2.config)
    assert "sliding window of 4096 tokens" in carrier_refusal(build_tiny_model("mistral", "causal-lm").config)
