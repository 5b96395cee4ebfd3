"""The command line on causal language models: tiny GPT-2, LLaMA and Qwen2 folders (a WordPiece
tokenizer over a few words) through prune, evaluate, export and reload; clear errors for LM inputs."""
from __future__ import annotations

import json
import random

import pytest

from conftest import LM_WORDS, save_tiny_lm
from kcm_core import cli
from kcm_core.export import load_pruned
from kcm_core.methods import DEFAULT_LM_METHOD
from kcm_core.report import SCHEMA

WORDS = LM_WORDS


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-lm")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40))) for _ in range(40)]
    (root / "docs.txt").write_text("\n".join(docs) + "\n")
    (root / "short.txt").write_text("good film\nbad plot\n")
    return root


def run(capsys, *argv):
    capsys.readouterr()                     # drop what building the fixtures printed
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("family,method", [("gpt2", "kcm"), ("llama", "flap"), ("qwen2", "wanda-sp"), ("llama", None)])
def test_prune_a_tiny_lm_reports_perplexity_agreement_and_kl(export_reload, lm_dir, capsys, tmp_path, family, method):
    model_dir = save_tiny_lm(tmp_path / family, family)
    out_dir = tmp_path / "pruned"
    code, out, err = run(capsys, "prune", "--model", model_dir, "--data", lm_dir / "docs.txt",
                         "--flops", 0.9, *(("--method", method) if method else ()), "--block-size", 16,
                         "--samples", 8, "--eval-blocks", 6, "--out", out_dir)
    assert code == 0, err
    report = json.loads(out)
    # without --method a language model gets its own default, and the report says it is the default
    assert report["method"]["name"] == (method or DEFAULT_LM_METHOD)
    assert report["method"]["default"] is (method is None)
    ev = report["evaluation"]
    assert report["schema"] == SCHEMA and ev["examples"] == 6
    assert set(ev["before"]) == {"perplexity"} and set(ev["after"]) == {"perplexity", "agreement", "kl"}
    ratio = ev["paired"]["perplexity_ratio"]
    assert ratio["ratio"] == pytest.approx(ev["after"]["perplexity"]["value"] / ev["before"]["perplexity"]["value"])
    assert 0 < ev["before"]["perplexity"]["value"] < 10 * len(WORDS) + 50
    assert report["data"]["unit"] == "blocks" and report["data"]["samples"] == 8
    markdown = (out_dir / "report.md").read_text()
    assert "- Perplexity before: " in markdown and "- KL divergence from the unpruned model after: " in markdown
    reloaded = load_pruned(out_dir)
    assert type(reloaded).__name__.endswith(("LMHeadModel", "ForCausalLM"))     # the LM head is kept
    code, out, err = run(capsys, "evaluate", "--model", out_dir, "--data", lm_dir / "docs.txt",
                         "--block-size", 16, "--eval-blocks", 4)
    assert code == 0, err
    assert json.loads(out)["blocks"] == 4 and json.loads(out)["perplexity"]["value"] > 1


@pytest.mark.parametrize("args, message", [
    (("--block-size", 64), "longer than the model's context of 32 positions"),
    (("--data-file", "short.txt"), "fewer than one block of 16"),
    (("--method", "mask-tuning"), "needs labeled data, which a language model's text does not have"),
    (("--vocab", 20), "the tokenizer does not belong to this model"),
], ids=["block-over-context", "too-little-text", "label-method", "foreign-tokenizer"])
def test_lm_inputs_that_cannot_work_exit_2_with_one_line(lm_dir, capsys, tmp_path, args, message):
    args = dict(zip(args[::2], args[1::2]))
    model_dir = save_tiny_lm(tmp_path / "llama", "llama", vocab_size=args.pop("--vocab", None))
    data = lm_dir / args.pop("--data-file", "docs.txt")
    argv = ["prune", "--model", model_dir, "--data", data, "--flops", 0.9, "--out", tmp_path / "out",
            "--block-size", args.pop("--block-size", 16), "--method", args.pop("--method", "kcm")]
    code, out, err = run(capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_held_out_perplexity_is_never_measured_on_the_calibration_text(export_reload, lm_dir, capsys, tmp_path):
    """Issue 23 (9): ``prune --data X --eval-data X`` measured on the calibration documents, and
    ``evaluate --model <pruned> --data X`` on the first blocks, which prune calibrated on. Now the first
    is split like no ``--eval-data`` and the second skips the documents the prune calibrated on; both
    say which documents were held out."""
    model_dir = save_tiny_lm(tmp_path / "llama", "llama")
    docs = lm_dir / "docs.txt"
    common = ["prune", "--model", model_dir, "--data", docs, "--flops", 0.9, "--block-size", 16,
              "--samples", 8, "--eval-blocks", 4]
    code, out, err = run(capsys, *common, "--out", tmp_path / "split")
    assert code == 0, err
    split = json.loads(out)["evaluation"]
    code, out, err = run(capsys, *common, "--eval-data", str(docs), "--out", tmp_path / "same")
    assert code == 0, err
    same = json.loads(out)["evaluation"]
    assert same["before"] == split["before"] and same["after"] == split["after"]
    assert same["data"] == split["data"] == (f"held-out blocks of 16 tokens from documents 21-40 of 40 of {docs} "
                                             "(the first 20 calibrate)")

    # evaluate on the calibration file: only the documents after the calibrated ones (8 blocks of 16
    # tokens from the first), the same numbers as a file holding just those documents
    texts = docs.read_text().splitlines()
    code, out, err = run(capsys, "evaluate", "--model", tmp_path / "split", "--data", docs, "--block-size", 16,
                         "--eval-blocks", 4)
    assert code == 0, err
    measured = json.loads(out)
    first = int(measured["held_out"].split()[1].split("-")[0]) - 1
    assert measured["held_out"] == (f"documents {first + 1}-40 of 40 (the prune that wrote this model "
                                    f"calibrated on the first {first})")
    assert 0 < first < 20
    (tmp_path / "rest.txt").write_text("\n".join(texts[first:]) + "\n")
    code, out, err = run(capsys, "evaluate", "--model", tmp_path / "split", "--data", tmp_path / "rest.txt",
                         "--block-size", 16, "--eval-blocks", 4)
    assert code == 0, err
    assert json.loads(out)["perplexity"] == measured["perplexity"] and "held_out" not in json.loads(out)


def test_a_folder_saved_from_a_gguf_load_prunes_as_plain_weights(export_reload, lm_dir, capsys, tmp_path):
    """Issue 23 (11): a folder whose config.json still carries ``quantization_config`` (``quant_method:
    gguf``, as ``from_pretrained(..., gguf_file=...)`` leaves it) holds plain tensors; it was scored,
    scaled and evaluated, then refused at the end ("quantized with gguf and is not serializable")."""
    model_dir = save_tiny_lm(tmp_path / "llama", "llama")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gguf"}}))
    code, out, err = run(capsys, "prune", "--model", model_dir, "--data", lm_dir / "docs.txt", "--flops", 0.9,
                         "--block-size", 16, "--samples", 4, "--eval-blocks", 2, "--out", tmp_path / "pruned")
    assert code == 0, err
    assert "quantization_config" not in json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert type(load_pruned(model_dir)).__name__ == "LlamaForCausalLM"
    assert getattr(load_pruned(model_dir), "hf_quantizer", None) is None


GGUF_CHARS = ["<unk>", "<s>", "</s>", "\u2581"] + list("abcdefghijklmnopqrstuvwxyz")


def write_tiny_gguf(path, seed: int = 0):
    """A tiny LLaMA written as a float32 GGUF file with the ``gguf`` package (llama.cpp's tensor names and
    q/k row order; a character-level SentencePiece-style vocabulary); returns the model it holds."""
    import gguf
    import numpy as np
    import torch
    import transformers as T

    def permute(w, heads):                   # llama.cpp's rotary row order for q and k
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    config = T.LlamaConfig(vocab_size=len(GGUF_CHARS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=37, max_position_embeddings=64,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = T.LlamaForCausalLM(config).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_block_count(2)
    w.add_feed_forward_length(37)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(8)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"] if hasattr(config, "rope_parameters") else 10000.0)
    w.add_vocab_size(len(GGUF_CHARS))
    w.add_tokenizer_model("llama")
    w.add_token_list(GGUF_CHARS)
    w.add_token_scores([0.0] * len(GGUF_CHARS))
    w.add_token_types([2, 3, 3] + [1] * (len(GGUF_CHARS) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_unk_token_id(0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for name, tensor in model.state_dict().items():
        tensor = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            tensor = permute(tensor, 4)
        elif name.endswith("k_proj.weight"):
            tensor = permute(tensor, 2)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(tensor))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def test_a_gguf_file_prunes_through_the_cli_and_opens_in_the_app(export_reload, lm_dir, capsys, tmp_path, monkeypatch):
    """Issue 23 (11): GGUF is what llama.cpp and Ollama users hold; a ``.gguf`` file is accepted as
    ``--model`` and as the app's local model (transformers dequantises it with ``gguf_file=``)."""
    import torch

    from kcm_app import resources
    from kcm_app.sources import ModelChoice
    from kcm_core.models import load_model
    original = write_tiny_gguf(tmp_path / "tiny.gguf")
    model, tokenizer = load_model(tmp_path / "tiny.gguf", device="cpu")
    ids = torch.tensor([[1, 5, 7, 9, 3, 12, 20]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, original(input_ids=ids).logits)
    assert tokenizer("good film")["input_ids"][1:] == [3, 10, 18, 18, 7, 3, 9, 12, 15, 16]
    code, out, err = run(capsys, "prune", "--model", tmp_path / "tiny.gguf", "--data", lm_dir / "docs.txt",
                         "--flops", 0.9, "--block-size", 16, "--samples", 4, "--eval-blocks", 2,
                         "--out", tmp_path / "pruned")
    assert code == 0, err
    report = json.loads(out)
    assert report["export"]["reloaded_ok"] and report["evaluation"]["before"]["perplexity"]["value"] > 1
    assert type(load_pruned(tmp_path / "pruned")).__name__ == "LlamaForCausalLM"
    code, out, err = run(capsys, "flops", "--model", tmp_path / "tiny.gguf")
    assert code == 0 and json.loads(out)["layers"][0]["neurons"] == 37, err
    monkeypatch.delenv("KCM_SHARED_SERVER", raising=False)
    key, app_model, _ = resources.load_model(ModelChoice("folder", str(tmp_path / "tiny.gguf")))
    assert type(app_model).__name__ == "LlamaForCausalLM" and resources.is_causal_lm(app_model)


@pytest.mark.parametrize("extra, message", [
    (("--label-column", "label"), "--label-column 'label' does not apply to a language model"),
    (("--text-column", "review"), "--text-column 'review' does not apply to"),
], ids=["label-column", "txt-text-column"])
def test_options_a_language_model_cannot_use_are_refused(lm_dir, capsys, tmp_path, extra, message):
    """Issue 23 (minor): ``--label-column`` and a .txt file's ``--text-column`` were silently ignored."""
    model_dir = save_tiny_lm(tmp_path / "llama", "llama")
    code, out, err = run(capsys, "prune", "--model", model_dir, "--data", lm_dir / "docs.txt", "--flops", 0.9,
                         "--block-size", 16, "--out", tmp_path / "out", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_causal_lm_config_without_architectures_loads_as_a_causal_lm(tmp_path):
    """Issue 23 (minor): a LLaMA config naming no class was loaded as LlamaForSequenceClassification and
    refused for lacking that head."""
    from kcm_core.cli.lm import is_causal_lm
    from kcm_core.models import load_model
    model_dir = save_tiny_lm(tmp_path / "llama", "llama")
    config = json.loads((model_dir / "config.json").read_text())
    del config["architectures"]
    (model_dir / "config.json").write_text(json.dumps(config))
    model, _ = load_model(model_dir, device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and is_causal_lm(model)
