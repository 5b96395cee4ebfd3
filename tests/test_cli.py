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
from kcm_core.cli import commands, common
from kcm_core.arch import model_shape
from kcm_core.export import load_pruned
from kcm_core.flops import keep_count
from kcm_core.report import SCHEMA

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


def test_prune_writes_a_loadable_folder_and_a_full_report(export_reload, workdir, capsys, tmp_path):
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
    assert report["schema"] == SCHEMA and report["method"]["label"] == "KCM (R2D2)"
    markdown = (out_dir / "report.md").read_text()
    assert "with KCM (R2D2)" in markdown and "{'" not in markdown
    assert "- Accuracy before: " in markdown and "- Accuracy after: " in markdown
    # after minus before, paired over the same 48 examples (counts agree with the two accuracies)
    ev = report["evaluation"]
    diff = ev["paired"]["accuracy_difference"]
    assert diff["n"] == 48 and diff == saved["evaluation"]["paired"]["accuracy_difference"]
    assert (diff["a_only"] - diff["b_only"]) / 48 == pytest.approx(
        ev["after"]["accuracy"]["value"] - ev["before"]["accuracy"]["value"])
    assert diff["value"] == pytest.approx(ev["after"]["accuracy"]["value"] - ev["before"]["accuracy"]["value"])
    assert f"Accuracy after minus before (paired over the same 48 examples): {100 * diff['value']:+.1f}" in markdown
    assert f"McNemar exact p = {diff['mcnemar_p']:.3g}" in markdown


def test_a_pruned_folder_with_per_layer_widths_evaluates_and_prunes_again(export_reload, workdir, capsys, tmp_path):
    """One loader: the per-layer export goes through load_pruned wherever a model is named."""
    first, second = tmp_path / "first", tmp_path / "second"
    code, out, err = run_cli(capsys, "prune", "--model", workdir / "tiny", "--data", workdir / "data.csv",
                             "--flops", 0.85, "--method", "kcm", "--out", first)
    assert code == 0, err
    widths = json.loads(out)["neurons"]["kept_per_layer"]
    assert len(set(widths)) > 1 and json.loads((first / "config.json").read_text())["kcm_ffn_widths"] == widths
    code, out, err = run_cli(capsys, "evaluate", "--model", first, "--data", workdir / "data.csv",
                             "--label-column", "label")
    assert code == 0, err
    assert json.loads(out)["examples"] == 48
    code, out, err = run_cli(capsys, "prune", "--model", first, "--data", workdir / "data.csv",
                             "--flops", 0.9, "--method", "kcm", "--out", second)
    assert code == 0, err
    again = json.loads(out)
    assert again["neurons"]["width_per_layer"] == widths
    assert again["neurons"]["kept"] < sum(widths)
    assert [b.width for b in __import__("kcm_core").ffn_blocks(load_pruned(second))] == \
        again["neurons"]["kept_per_layer"]


@pytest.mark.parametrize("argv, hull", [
    (["--r2-stop", "closed_form"], {"stop_rule": "closed_form"}),
    (["--stop-rule", "topk", "--rank-tol", "0.02", "--top-share", "0.25"],
     {"stop_rule": "topk", "rank_tol": 0.02, "top_share": 0.25}),
])
def test_r2_stop_options_reach_the_fit_and_the_report(export_reload, workdir, capsys, tmp_path, argv, hull):
    code, out, err = run_cli(capsys, "prune", "--model", workdir / "tiny", "--data", workdir / "data.csv",
                             "--flops", 0.85, "--method", "r2", "--out", tmp_path / "out", *argv)
    assert code == 0, err
    report = json.loads(out)
    assert {k: report["options"]["hull"][k] for k in hull} == hull
    iterations = report["details"]["r2_iterations"]
    if hull["stop_rule"] == "closed_form":
        assert iterations == [1, 1]
    else:
        assert all(i >= 2 for i in iterations)      # a ranking rule compares two iterates


def test_prune_is_deterministic_for_a_seed(export_reload, workdir, capsys, tmp_path):
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
    (["--r2-stop", "spearman", "--rank-tol", "1.5"], "rank_tol must be in [0, 1), got 1.5"),
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


@pytest.mark.parametrize("argv, message", [
    (["prune", "--format", "hf,pt"], "error: --format 'hf,pt': unknown export format 'pt'; choose from hf, onnx"),
    (["prune", "--stream", "--format", "hf,onnx"], "error: --stream writes the hf format only"),
    (["prune", "--seed", "-1"], "error: argument --seed: must be a whole number from 0 to 4294967295, got '-1'"),
    (["prune", "--seed", str(2**32)], "error: argument --seed: must be a whole number from 0 to 4294967295"),
    (["prune", "--min-per-layer", "-2"], "error: argument --min-per-layer: must be a whole number of at least 0"),
    (["prune", "--scale-samples", "0"], "error: argument --scale-samples: must be a positive whole number"),
    (["prune", "--label-samples", "0"], "error: argument --label-samples: must be a positive whole number"),
    (["prune", "--max-iter", "0"], "error: argument --max-iter: must be a positive whole number"),
    (["evaluate", "--seed", "-1"], "error: argument --seed: must be a whole number from 0"),
    (["export", "--format", "hf,tflite"], "error: --format 'hf,tflite': unknown export format 'tflite'"),
    (["finetune", "--epochs", "0"], "error: argument --epochs: must be a positive whole number"),
], ids=lambda x: "_".join(x) if isinstance(x, list) else None)
def test_every_option_is_checked_before_anything_is_loaded(workdir, capsys, tmp_path, monkeypatch, argv, message):
    """Issue 23 (8): ``--format hf,pt`` was refused only when saving (36 s in; under torchrun after the
    distributed run) and ``--seed -1`` after 25 s by numpy; now each names its option before any load."""
    import kcm_core.models as M

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")
    monkeypatch.setattr(M, "load_model", no_loading)
    monkeypatch.setattr(M, "load_config", no_loading)
    command, options = argv[0], argv[1:]
    common = {"prune": ["--data", workdir / "data.csv", "--flops", "0.8", "--out", tmp_path / "out"],
              "evaluate": ["--data", workdir / "data.csv"],
              "export": ["--out", tmp_path / "out"],
              "finetune": ["--data", workdir / "data.csv", "--out", tmp_path / "out"]}[command]
    code, out, err = run_cli(capsys, command, "--model", workdir / "tiny", *common, *options)
    assert (code, out) == (2, "") and err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_unless_overwrite(export_reload, workdir, capsys, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    argv = ["prune", "--model", workdir / "tiny", "--data", workdir / "data.csv", "--flops", 0.85,
            "--method", "weight-magnitude", "--out", out_dir]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "already exists" in err
    code, _, err = run_cli(capsys, *argv, "--overwrite")          # someone's folder: never replaced
    assert code == 2 and "is not an earlier export" in err
    assert (out_dir / "keep.txt").read_text() == "mine"
    export = tmp_path / "export"                                  # an earlier export: replaced
    assert run_cli(capsys, *argv[:-1], export)[0] == 0
    (export / "stale.txt").write_text("from the first run")
    code, _, err = run_cli(capsys, *argv[:-1], export, "--overwrite")
    assert code == 0, err
    assert not (export / "stale.txt").exists() and (export / "kcm_plan.json").exists()


def test_unsupported_architecture_from_the_shell(tmp_path):
    T.T5Config().save_pretrained(tmp_path / "t5")
    proc = subprocess.run([sys.executable, "-m", "kcm_core", "flops", "--model", str(tmp_path / "t5")],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2
    assert "Unsupported architecture: model_type 't5'" in proc.stderr
    assert "bert" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- data sources

def refuse_hub(*args, **kwargs):
    raise AssertionError("went to the Hugging Face hub")


@pytest.fixture
def fake_demo(monkeypatch):
    """The prepared demo without a download: small train/test splits; the splits read are recorded."""
    import kcm_core.data.readers as readers
    import kcm_core.demos.classifier as demo
    from kcm_core.data import TextData
    read: list[str] = []

    def load_split(name, cache_dir=None):
        read.append(name)
        n = 16 if name == "train" else 8
        texts = tuple(("good fun film" if i % 2 else "bad dull plot") + f" {WORDS[i]}" for i in range(n))
        return TextData(texts=texts, labels=tuple(i % 2 for i in range(n)),
                        label_names=demo.LABEL_NAMES, source=f"fake demo {name} split")

    monkeypatch.setattr(demo, "prepare_demo", lambda *a, **k: {})
    monkeypatch.setattr(demo, "load_demo_split", load_split)
    monkeypatch.setattr(readers, "read_hub", refuse_hub)
    return read


def test_finetune_on_the_demo_uses_its_splits(workdir, capsys, tmp_path, fake_demo):
    code, out, err = run_cli(capsys, "finetune", "--model", workdir / "tiny", "--data", "demo",
                             "--eval-data", "demo", "--out", tmp_path / "ft", "--epochs", 1,
                             "--batch-size", 8, "--max-len", 16)
    assert code == 0, err
    summary = json.loads(out)
    assert fake_demo == ["train", "test"]
    assert summary["train_source"] == "fake demo train split" and summary["train_examples"] == 16
    assert summary["eval_source"] == "fake demo test split" and summary["eval_examples"] == 8
    assert summary["label_names"] == ["negative", "positive"]


def test_hub_eval_data_keeps_the_data_config(monkeypatch):
    import datasets
    import kcm_core.hub as H
    calls = []

    def load_dataset(name, config_name=None, split=None, **kwargs):
        calls.append((name, config_name, split))
        return datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": [0, 1]})

    monkeypatch.setattr(H, "hub_offline", lambda: False)
    monkeypatch.setattr(H, "check_hub", lambda *a, **k: None)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    args = cli.build_parser().parse_args([
        "prune", "--model", "m", "--data", "glue", "--data-config", "sst2", "--split", "train",
        "--eval-data", "glue", "--eval-split", "validation", "--flops", "0.8", "--out", "o"])
    evaluation = commands._evaluation_data(args, None, None)
    assert calls == [("glue", "sst2", "validation")]
    assert evaluation.source == "hub:glue/sst2 [validation]" and evaluation.labels == (0, 1)


def test_samples_subset_is_the_shared_seeded_sample(workdir):
    from kcm_core.data import load_text_data
    data = load_text_data(workdir / "data.csv")
    assert common.limit(data, 10, 3) == data.sample(10, 3)
    rows = (2, 5, 10, 15, 28, 29, 32, 34, 36, 39)   # sorted(randperm(48, seed 3)[:10]), as always
    assert common.limit(data, 10, 3).texts == tuple(data.texts[i] for i in rows)
    assert common.limit(data, None, 3) is data and common.limit(data, 48, 3) is data


def test_an_image_model_loads_with_its_head_and_text_data_is_refused_for_it(tmp_path, capsys):
    """A ViT folder loads as ViTForImageClassification (not refused for the wrong task); its cost works
    from the config; prune and evaluate refuse text data for it (image data: tests/test_images.py)."""
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import build_tiny_model
    from kcm_core.models import load_model
    folder = tmp_path / "vit"
    build_tiny_model("vit").save_pretrained(folder)
    T.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    (tmp_path / "t.txt").write_text("a b c\nd e f\n")
    model, _ = load_model(str(folder), device="cpu")
    assert type(model).__name__ == "ViTForImageClassification"
    code, out, err = run_cli(capsys, "flops", "--model", folder)
    assert code == 0 and json.loads(out)["layers"]
    for argv in (["prune", "--model", folder, "--data", tmp_path / "t.txt", "--flops", 0.9, "--out", tmp_path / "o"],
                 ["evaluate", "--model", folder, "--data", tmp_path / "t.txt"]):
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and "neither a folder of images nor a table" in err, err
    assert not (tmp_path / "o").exists()
