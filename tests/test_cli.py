"""The command line: JSON out, exit code 2 with one clear line on bad input, nothing half-written."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

from kcm_core import cli
from kcm_core.arch import model_shape
from kcm_core.export import load_pruned
from kcm_core.flops import keep_count

WORDS = "the a good bad movie film great awful fun dull plot acting i love hate it was is very not".split()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (root / "vocab.txt").write_text("\n".join(vocab))
    tokenizer = T.BertTokenizerFast(str(root / "vocab.txt"))
    config = T.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=37, num_labels=2)
    torch.manual_seed(0)
    T.BertForSequenceClassification(config).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    config.save_pretrained(root / "config-only")
    rng = random.Random(0)
    rows = ["text,label"] + [
        f"{' '.join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))},{rng.randint(0, 1)}"
        for _ in range(48)
    ]
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    return root


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_flops_on_a_folder_with_only_a_config(workdir, capsys):
    code, out, _ = run_cli(capsys, "flops", "--model", workdir / "config-only", "--seq-len", 10,
                           "--flops", 0.8)
    assert code == 0
    report = json.loads(out)
    assert [row["neurons"] for row in report["layers"]] == [37, 37]
    shape = model_shape(T.AutoConfig.from_pretrained(workdir / "config-only"))
    assert report["budget"]["keep_neurons"] == keep_count(shape, 10, 0.8)
    # FLOPs = 2 x MACs, and per-layer totals add up to the encoder count.
    assert report["encoder_flops"] == 2 * report["encoder_macs"]
    assert sum(row["total"] for row in report["layers"]) == report["encoder_macs"]


def test_prune_writes_a_loadable_folder_and_a_full_report(workdir, capsys, tmp_path):
    out_dir = tmp_path / "pruned"
    code, out, err = run_cli(capsys, "prune", "--model", workdir / "tiny", "--data", workdir / "data.csv",
                             "--label-column", "label", "--flops", 0.8, "--method", "kcm",
                             "--out", out_dir, "--seed", 3)
    assert code == 0, err
    report = json.loads(out)
    assert "R2" in err and "scaling" in err                       # progress went to stderr
    assert report["relative_flops"]["achieved"] <= 0.8
    assert report["neurons"]["kept"] == sum(report["neurons"]["kept_per_layer"])
    assert report["params"]["after"] < report["params"]["before"]
    assert report["evaluation"]["after"]["agreement"]["n"] == 48
    for stage in ("r2", "d2", "selection", "scaling", "slicing"):
        assert stage in report["seconds"]
    assert report["environment"]["torch"] == torch.__version__
    assert report["export"]["max_abs_diff"]["hf"] <= 1e-4
    saved = json.loads((out_dir / "report.json").read_text())
    assert saved["neurons"] == report["neurons"]
    model = load_pruned(out_dir)
    widths = [b.up.weight.shape[0] for b in __import__("kcm_core").ffn_blocks(model)]
    assert widths == report["neurons"]["kept_per_layer"]


def test_prune_is_deterministic_for_a_seed(workdir, capsys, tmp_path):
    plans = []
    for name in ("a", "b"):
        code, _, err = run_cli(capsys, "prune", "--model", workdir / "tiny", "--data", workdir / "data.csv",
                               "--flops", 0.85, "--method", "random", "--seed", 7, "--out", tmp_path / name)
        assert code == 0, err
        plans.append(json.loads((tmp_path / name / "kcm_plan.json").read_text()))
    assert plans[0]["layers"] == plans[1]["layers"]


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/folder"], "no model folder at /no/such/folder"),
    (["--flops", "0.1"], "below what FFN-only pruning can reach"),
    (["--flops", "1.7"], "got 1.7"),
    (["--text-column", "nope"], "available columns: text, label"),
    (["--method", "mask-tuning", "--data", "EMPTY"], "is empty"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(workdir, capsys, tmp_path, args, message):
    (tmp_path / "empty.csv").write_text("")
    base = {"--model": str(workdir / "tiny"), "--data": str(workdir / "data.csv"), "--flops": "0.8"}
    extra = []
    for key, value in zip(args[::2], args[1::2]):
        value = str(tmp_path / "empty.csv") if value == "EMPTY" else value
        if key in base:
            base[key] = value
        else:
            extra += [key, value]
    argv = ["prune", *[x for kv in base.items() for x in kv], *extra, "--out", str(tmp_path / "out")]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_unless_overwrite(workdir, capsys, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    argv = ["prune", "--model", workdir / "tiny", "--data", workdir / "data.csv", "--flops", 0.85,
            "--method", "weight-magnitude", "--out", out_dir]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "already exists" in err
    assert (out_dir / "keep.txt").read_text() == "mine"
    code, _, err = run_cli(capsys, *argv, "--overwrite")
    assert code == 0, err
    assert not (out_dir / "keep.txt").exists() and (out_dir / "kcm_plan.json").exists()


def test_unsupported_architecture_from_the_shell(tmp_path):
    T.T5Config().save_pretrained(tmp_path / "t5")
    proc = subprocess.run([sys.executable, "-m", "kcm_core", "flops", "--model", str(tmp_path / "t5")],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2
    assert "Unsupported architecture: model_type 't5'" in proc.stderr
    assert "bert" in proc.stderr and "Traceback" not in proc.stderr
