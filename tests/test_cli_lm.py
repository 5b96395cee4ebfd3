"""The command line on causal language models: tiny GPT-2, LLaMA and Qwen2 folders (a WordPiece
tokenizer over a few words) through prune, evaluate, export and reload; clear errors for LM inputs."""
from __future__ import annotations

import json
import random

import pytest

from conftest import LM_WORDS, save_tiny_lm
from kcm_core import cli
from kcm_core.export import load_pruned
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


@pytest.mark.parametrize("family,method", [("gpt2", "kcm"), ("llama", "flap"), ("qwen2", "wanda-sp")])
def test_prune_a_tiny_lm_reports_perplexity_agreement_and_kl(lm_dir, capsys, tmp_path, family, method):
    model_dir = save_tiny_lm(tmp_path / family, family)
    out_dir = tmp_path / "pruned"
    code, out, err = run(capsys, "prune", "--model", model_dir, "--data", lm_dir / "docs.txt",
                         "--flops", 0.9, "--method", method, "--block-size", 16, "--samples", 8,
                         "--eval-blocks", 6, "--out", out_dir)
    assert code == 0, err
    report = json.loads(out)
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


def test_held_out_perplexity_is_never_measured_on_the_calibration_text(lm_dir, capsys, tmp_path):
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


def test_a_folder_saved_from_a_gguf_load_prunes_as_plain_weights(lm_dir, capsys, tmp_path):
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
