"""The adapter table: where every family keeps its FFN, and a clear refusal for anything else."""
import pytest
import torch
import transformers as T
from torch import nn

from conftest import DECODER_FAMILIES, HIDDEN, TINY_FAMILIES, WIDTH
from kcm_core import SUPPORTED_MODEL_TYPES, ffn_blocks, model_shape
from kcm_core.arch import transformer_layers

# Family -> (up, down, gate) module class names and the qualified name of layer 0's up-projection
# below the backbone (the head model adds the backbone's attribute name in front).
EXPECTED = {
    "bert": ("Linear", "Linear", None, "encoder.layer.0.intermediate.dense", "bert."),
    "roberta": ("Linear", "Linear", None, "encoder.layer.0.intermediate.dense", "roberta."),
    "xlm-roberta": ("Linear", "Linear", None, "encoder.layer.0.intermediate.dense", "roberta."),
    "electra": ("Linear", "Linear", None, "encoder.layer.0.intermediate.dense", "electra."),
    "mpnet": ("Linear", "Linear", None, "encoder.layer.0.intermediate.dense", "mpnet."),
    "distilbert": ("Linear", "Linear", None, "transformer.layer.0.ffn.lin1", "distilbert."),
    "gpt2": ("Conv1D", "Conv1D", None, "h.0.mlp.c_fc", "transformer."),
    "llama": ("Linear", "Linear", "Linear", "layers.0.mlp.up_proj", "model."),
    "mistral": ("Linear", "Linear", "Linear", "layers.0.mlp.up_proj", "model."),
    "qwen2": ("Linear", "Linear", "Linear", "layers.0.mlp.up_proj", "model."),
    "vit": ("Linear", "Linear", None, None, "vit."),
}


@pytest.mark.parametrize("task", ["classification", "base"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_ffn_blocks_find_every_layer_with_its_width(tiny_model, family, task):
    model = tiny_model(family, task, layers=3)
    blocks = ffn_blocks(model)
    up_cls, down_cls, gate_cls, up0, prefix = EXPECTED[family]
    assert [b.index for b in blocks] == [0, 1, 2]
    assert [b.width for b in blocks] == [WIDTH] * 3
    modules = dict(model.named_modules())
    for b in blocks:
        # The names resolve to exactly these module objects in the model.
        assert modules[b.up_name] is b.up and modules[b.down_name] is b.down
        assert type(b.up).__name__ == up_cls and type(b.down).__name__ == down_cls
        assert (type(b.gate).__name__ if b.gate is not None else None) == gate_cls
        assert (modules[b.gate_name] is b.gate) if b.gate is not None else b.gate_name is None
        assert b.transposed == (family == "gpt2")
        # Per-neuron views: one row per neuron, d columns, whatever the storage layout.
        assert tuple(b.down_rows().shape) == (WIDTH, HIDDEN)
        assert tuple(b.up_cols().shape) == (WIDTH, HIDDEN)
        if b.gate is not None:
            assert tuple(b.gate_cols().shape) == (WIDTH, HIDDEN)
    if up0 is not None:
        expected_name = (prefix if task == "classification" else "") + up0
        assert blocks[0].up_name == expected_name
    # Blocks of different layers are different modules.
    assert len({id(b.up) for b in blocks}) == 3 and len({id(b.down) for b in blocks}) == 3


def test_vit_block_is_the_mlp_of_each_encoder_layer(tiny_model):
    model = tiny_model("vit", layers=2)
    _, layers = transformer_layers(model)
    for layer, block in zip(layers, ffn_blocks(model)):
        inside = {id(m) for m in layer.modules()}
        assert id(block.up) in inside and id(block.down) in inside
        assert block.up.out_features == WIDTH and block.down.in_features == WIDTH


def test_blocks_point_at_the_weights_that_run(tiny_model, tiny_batches):
    """Zeroing the found down-projections (weights and bias) must change the model's output."""
    for family in ("bert", "gpt2", "llama"):
        model = tiny_model(family)
        batch = tiny_batches(model, n_batches=1, labels=False)[0]
        with torch.no_grad():
            before = model(**batch).logits
            for b in ffn_blocks(model):
                b.down.weight.zero_()
            after = model(**batch).logits
        assert not torch.allclose(before, after)


def test_causal_lm_heads_are_supported(tiny_model):
    for family in DECODER_FAMILIES:
        assert [b.width for b in ffn_blocks(tiny_model(family, "causal-lm"))] == [WIDTH, WIDTH]


def _assert_names_supported(message: str) -> None:
    for model_type in ("bert", "distilbert", "gpt2", "llama", "mistral", "qwen2", "vit"):
        assert model_type in message


def test_unsupported_transformers_model_fails_at_the_door():
    config = T.T5Config(vocab_size=99, d_model=32, d_ff=37, num_layers=1, num_heads=4, d_kv=8)
    model = T.T5Model(config)
    with pytest.raises(ValueError) as err:
        ffn_blocks(model)
    message = str(err.value)
    assert "T5Model" in message and "'t5'" in message
    _assert_names_supported(message)
    with pytest.raises(ValueError, match="'t5'"):
        model_shape(config)


def test_plain_module_is_refused_with_its_class_name():
    with pytest.raises(ValueError) as err:
        ffn_blocks(nn.Sequential(nn.Linear(32, 37), nn.GELU(), nn.Linear(37, 32)))
    assert "Sequential" in str(err.value)
    _assert_names_supported(str(err.value))


def test_supported_model_types_cover_every_tiny_family():
    for family in TINY_FAMILIES:
        assert family in SUPPORTED_MODEL_TYPES


def test_model_shape_from_config_alone():
    bert = model_shape(T.BertConfig())
    assert (bert.family, bert.layers, bert.hidden, bert.heads, bert.kv_heads) == ("bert", 12, 768, 12, 12)
    assert bert.ffn_width == (3072,) * 12 and bert.head_dim == 64
    assert not bert.gated and not bert.vision and bert.image_tokens == 0

    gpt2 = model_shape(T.GPT2Config(n_layer=3, n_embd=48, n_head=6))   # n_inner=None -> 4 * n_embd
    assert (gpt2.family, gpt2.layers, gpt2.hidden, gpt2.heads) == ("gpt2", 3, 48, 6)
    assert gpt2.ffn_width == (192,) * 3

    distil = model_shape(T.DistilBertConfig(n_layers=5, dim=40, n_heads=5, hidden_dim=70))
    assert (distil.layers, distil.hidden, distil.heads, distil.ffn_width) == (5, 40, 5, (70,) * 5)

    llama = model_shape(T.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=2, intermediate_size=90))
    assert (llama.family, llama.heads, llama.kv_heads, llama.gated) == ("llama", 8, 2, True)
    assert llama.ffn_width == (90, 90) and llama.head_dim == 8

    mha = model_shape(T.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                    num_key_value_heads=None, intermediate_size=90))
    assert mha.kv_heads == 8

    vit = model_shape(T.ViTConfig(image_size=32, patch_size=8, num_hidden_layers=2))
    assert vit.vision and vit.image_tokens == (32 // 8) ** 2 + 1 and vit.family == "vit"


def test_model_shape_reads_recorded_per_layer_widths():
    config = T.BertConfig(num_hidden_layers=3, intermediate_size=40)
    config.kcm_ffn_widths = [40, 0, 17]
    assert model_shape(config).ffn_width == (40, 0, 17)
