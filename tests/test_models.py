"""kcm_core.models: loading tiny local models and every clear failure. Never the network."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, BertTokenizerFast, GPT2Config,
                          GPT2LMHeadModel, GPT2TokenizerFast, GPTNeoConfig, T5Config)

from kcm_core.models import load_config, load_model, max_positions

TINY_BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=37, max_position_embeddings=64)


def tiny_bert_dir(root: Path, *, nan: bool = False) -> Path:
    """A saved tiny BERT classifier with its own 10-word tokenizer."""
    folder = root / "tiny-bert"
    folder.mkdir()
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film"]) + "\n")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**TINY_BERT, num_labels=3))
    if nan:
        with torch.no_grad():
            model.bert.encoder.layer[1].intermediate.dense.weight[0, 0] = float("nan")
    model.save_pretrained(folder)
    BertTokenizerFast(vocab=str(vocab)).save_pretrained(folder)
    return folder


def test_load_local_classifier_in_eval_mode(tmp_path):
    model, tok = load_model(str(tiny_bert_dir(tmp_path)), device="cpu")
    assert isinstance(model, BertForSequenceClassification)
    assert not model.training and model.config.num_labels == 3
    assert next(model.parameters()).device == torch.device("cpu")
    with torch.no_grad():
        logits = model(**tok(["good film", "bad"], padding=True, return_tensors="pt")).logits
    assert logits.shape == (2, 3)


def test_base_task_and_bad_arguments(tmp_path):
    folder = str(tiny_bert_dir(tmp_path))
    model, _ = load_model(folder, task="base", device="cpu", dtype="float32")
    assert type(model).__name__ == "BertModel"
    with pytest.raises(ValueError, match="task must be one of sequence-classification"):
        load_model(folder, task="translation")
    with pytest.raises(ValueError, match="dtype must be a torch dtype"):
        load_model(folder, dtype="float8")


def test_load_config_from_a_folder_with_only_config_json(tmp_path):
    BertConfig(**TINY_BERT).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    config = load_config(str(tmp_path))
    assert config.model_type == "bert" and config.intermediate_size == 37


@pytest.mark.parametrize("name", ["./no/such/model", "/nonexistent/model", "models/../x", "a/b/c"])
def test_missing_local_path(tmp_path, name):
    with pytest.raises(ValueError, match="no model folder at .*; give a local folder with config.json or a hub id"):
        load_model(name)


def test_folder_without_config_or_a_file(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        load_model(str(tmp_path / "weights.bin"))


@pytest.mark.parametrize("config", [T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=37, vocab_size=99),
                                    GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4,
                                                 attention_types=[[["global"], 2]], vocab_size=99)])
def test_unsupported_architecture_fails_before_weights(tmp_path, config):
    config.save_pretrained(tmp_path)                   # no weights at all: the config check must come first
    with pytest.raises(ValueError, match=f"Unsupported architecture: model_type '{config.model_type}'"):
        load_model(str(tmp_path))


def test_nan_weights_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"NaN or infinite weights in 'bert\.encoder\.layer\.1\.intermediate"):
        load_model(str(tiny_bert_dir(tmp_path, nan=True)), device="cpu")


def test_gpt2_classifier_gets_a_pad_token(tmp_path):
    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2, "ab": 3, "Ġ": 4, "Ġa": 5, "Ġb": 6}
    tok = GPT2TokenizerFast(vocab=vocab, merges=[("a", "b"), ("Ġ", "a"), ("Ġ", "b")])
    GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    # an LM checkpoint has no classifier: the new, untrained head is an explicit choice
    model, loaded = load_model(str(tmp_path), device="cpu", task="sequence-classification",
                               allow_new_head=True)
    assert loaded.pad_token == "<|endoftext|>" and model.config.pad_token_id == 0
    with torch.no_grad():
        logits = model(**loaded(["ab a b", "a"], padding=True, return_tensors="pt")).logits
    assert logits.shape == (2, 2)


def test_a_model_keeps_the_head_it_was_saved_with(tmp_path):
    """Without a task, the class in config.architectures decides: an LM stays an LM, a bare encoder
    stays bare (no freshly initialised classification head is slipped in)."""
    GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64)).save_pretrained(
        tmp_path / "lm")
    GPT2TokenizerFast(vocab={"<|endoftext|>": 0, "a": 1}, merges=[]).save_pretrained(tmp_path / "lm")
    model, _ = load_model(str(tmp_path / "lm"), device="cpu")
    assert type(model).__name__ == "GPT2LMHeadModel"
    classifier, _ = load_model(str(tiny_bert_dir(tmp_path)), device="cpu")
    assert type(classifier).__name__ == "BertForSequenceClassification"


# --------------------------------------------------------------------------- hub (monkeypatched)

def test_hub_offline_and_not_cached(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"model 'kcm-test-nobody/tiny' is not in the local Hugging Face cache "
                                         r"and the hub is offline"):
        load_model("kcm-test-nobody/tiny")


def test_hub_unreachable_is_one_sentence(monkeypatch):
    import huggingface_hub
    import transformers
    import kcm_core.hub as H

    def refuse(self, repo_id, **kwargs):
        assert kwargs["timeout"] <= 10                  # a short probe, not a retry loop
        raise ConnectionError("[Errno 101] Network is unreachable")

    def never(*args, **kwargs):
        raise AssertionError("from_pretrained must not run when the probe failed")

    monkeypatch.setattr(H, "hub_offline", lambda: False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", refuse)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", never)
    with pytest.raises(ValueError) as err:
        load_model("bert-base-uncased")
    assert str(err.value) == ("could not reach the Hugging Face hub to load model 'bert-base-uncased' from "
                              "this machine (ConnectionError); pass a local folder instead")


def test_hub_unknown_repo(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError
    import kcm_core.hub as H

    def missing(self, repo_id, **kwargs):
        response = SimpleNamespace(headers={}, request=None, status_code=404)   # stands in for an HTTP reply
        raise RepositoryNotFoundError("404 Client Error", response=response)

    monkeypatch.setattr(H, "hub_offline", lambda: False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", missing)
    with pytest.raises(ValueError, match="no model 'someone/typo' on the Hugging Face hub"):
        load_config("someone/typo")


def test_tokenizer_missing_from_folder(tmp_path):
    BertForSequenceClassification(BertConfig(**TINY_BERT)).save_pretrained(tmp_path)
    # transformers 5 would silently build a tokenizer of 5 special tokens here: every word [UNK]
    with pytest.raises(ValueError, match="has no usable tokenizer"):
        load_model(str(tmp_path), device="cpu")
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "bert"


@pytest.mark.parametrize("model_type", ["roberta", "mpnet"])
def test_positions_after_the_pad_id_shorten_the_usable_length(model_type):
    """RoBERTa and MPNet number positions from pad_token_id + 1: a 12-row table takes 10 tokens."""
    import transformers as T

    cls = {"roberta": T.RobertaConfig, "mpnet": T.MPNetConfig}[model_type]
    config = cls(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                 intermediate_size=37, max_position_embeddings=12, pad_token_id=1)
    assert max_positions(config) == 10
    torch.manual_seed(0)
    model = T.AutoModel.from_config(config).eval()
    with torch.no_grad():
        assert model(input_ids=torch.full((1, 10), 5)).last_hidden_state.shape == (1, 10, 32)
        with pytest.raises((IndexError, RuntimeError)):   # past the table (RoBERTa fails earlier, on its
            model(input_ids=torch.full((1, 11), 5))        # token-type buffer, also sized by the table)
