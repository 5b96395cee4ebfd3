"""Reliability of data in, numbers out: labels meet the model's own classes (never renumbered per
file), a label the model cannot predict is refused in one sentence, huge lines and files stay within
bounded memory, and odd cells get a clear message or a documented, correct reading.

Library calls and the CLI (``kcm_core.cli.main``) with tiny models; CPU, no network.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers as T

from conftest import save_tiny_encoder

from kcm_core import cli
from kcm_core import data as D
from kcm_core.data import TextData, labels_for_classes, labels_for_model, load_text_data, make_batches
from kcm_core.evaluate import evaluate_classifier

WORDS = "the a good bad movie film great awful fun dull plot acting very not".split()
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- tiny models

@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return path


def save_classifier(folder: Path, vocab: Path, *, always: int | None = 0, id2label=None,
                    num_labels: int = 2) -> Path:
    """A tiny BERT classifier saved to ``folder``; with ``always`` it predicts that class for every
    input (zero head weights, a bias that favours it), so its true accuracy is known exactly."""
    config = T.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=1,
                          num_attention_heads=4, intermediate_size=37, num_labels=num_labels)
    if id2label is not None:
        config.id2label = dict(id2label)
        config.label2id = {name: i for i, name in id2label.items()}
    torch.manual_seed(0)
    model = T.BertForSequenceClassification(config)
    if always is not None:
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.copy_(torch.full((num_labels,), -5.0))
            model.classifier.bias[always] = 5.0
    model.save_pretrained(folder)
    T.BertTokenizerFast(str(vocab)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def unnamed(tmp_path_factory, vocab) -> Path:
    """Classes LABEL_0, LABEL_1 (no names); predicts class 0 everywhere."""
    return save_classifier(tmp_path_factory.mktemp("m") / "unnamed", vocab)


@pytest.fixture(scope="module")
def named(tmp_path_factory, vocab) -> Path:
    """Classes 0=negative, 1=positive (like the demo); predicts class 0 (negative) everywhere."""
    return save_classifier(tmp_path_factory.mktemp("m") / "named", vocab,
                           id2label={0: "negative", 1: "positive"})


def csv_file(folder: Path, labels, name: str = "d.csv") -> Path:
    rows = ["text,label"] + [f"{WORDS[i % len(WORDS)]} film,{y}" for i, y in enumerate(labels)]
    path = folder / name
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def evaluate(capsys, model: Path, data: Path):
    return run_cli(capsys, "evaluate", "--model", model, "--data", data, "--max-len", 16)


# --------------------------------------------------------------------------- labels: the CLI

def test_a_file_holding_only_label_1_scores_0_on_a_model_predicting_0(capsys, tmp_path, unnamed):
    """Renumbered per file, label 1 became 0 and this model scored 100%; the truth is 0%."""
    code, out, err = evaluate(capsys, unnamed, csv_file(tmp_path, [1] * 6))
    assert code == 0, err
    accuracy = json.loads(out)["accuracy"]
    assert accuracy["value"] == 0.0 and accuracy["n"] == 6


def test_string_labels_go_through_the_models_label2id(capsys, tmp_path, named):
    """'positive' is class 1 of this model (which predicts 0): 0%, not the 100% of per-file numbering;
    the name is matched ignoring case when no class has it exactly."""
    for labels in (["positive"] * 4, ["Positive"] * 4):
        code, out, err = evaluate(capsys, named, csv_file(tmp_path, labels))
        assert code == 0, err
        assert json.loads(out)["accuracy"]["value"] == 0.0
    code, out, err = evaluate(capsys, named, csv_file(tmp_path, ["negative", "positive"] * 2))
    assert code == 0, err
    assert json.loads(out)["accuracy"]["value"] == 0.5


def test_integer_labels_are_the_named_models_own_ids(capsys, tmp_path, named):
    """The demo's files hold 0/1 for a model named negative/positive: integers are its class ids,
    also in a file holding only class 1 (once renumbered to 0: 100% for this model predicting 0)."""
    for labels, accuracy in (([1, 1, 1], 0.0), ([0, 0, 0, 1], 0.75)):
        code, out, err = evaluate(capsys, named, csv_file(tmp_path, labels))
        assert code == 0, err
        assert json.loads(out)["accuracy"]["value"] == accuracy


@pytest.mark.parametrize("model, labels, message", [
    ("unnamed", [1, 2, 1, 2], "label 2 is not one of the model's 2 unnamed classes (0, 1); use "
                              "the labels the model was trained on (its class ids 0-1)"),
    ("unnamed", [0, 1, 2, 3, 4], "label 2 is not one of the model's 2 unnamed classes (0, 1)"),
    ("unnamed", ["neg", "pos", "pos"], "label 'neg' is not one of the model's 2 unnamed classes "
                                       "(0, 1); its classes have no names, so give the labels as its class "
                                       "ids 0-1 (or add id2label and label2id to its config.json)"),
    ("unnamed", [-1, 1, 1], "label -1 is not one of the model's 2 unnamed classes (0, 1)"),
    ("named", ["negative", "neutral", "neutral"], "label 'neutral' is not one of the model's 2 "
                                                  "classes (0=negative, 1=positive); use the labels the "
                                                  "model was trained on (its class ids 0-1 or names)"),
    ("named", [0, 1, 7], "label 7 is not one of the model's 2 classes (0=negative, 1=positive)"),
])
def test_a_label_the_model_cannot_predict_exits_2_in_one_line(capsys, tmp_path, request, model, labels,
                                                            message):
    code, out, err = evaluate(capsys, request.getfixturevalue(model), csv_file(tmp_path, labels))
    assert code == 2
    assert message in err
    assert "Traceback" not in err and out == "" and len(err.strip().splitlines()) == 1


def test_prune_refuses_unpredictable_labels_before_any_work(capsys, tmp_path, unnamed):
    """Five classes on a two-label model: once 20% with no warning; now exit 2, nothing written."""
    out_dir = tmp_path / "pruned"
    data = csv_file(tmp_path, [0, 1, 2, 3, 4] * 4)
    code, out, err = run_cli(capsys, "prune", "--model", unnamed, "--data", data,
                             "--flops", 0.8, "--method", "weight-magnitude", "--max-len", 16,
                             "--out", out_dir)
    assert code == 2
    assert "label 2 is not one of the model's 2 unnamed classes (0, 1)" in err
    assert "Traceback" not in err and out == ""
    assert not out_dir.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["d.csv"]


def test_prune_checks_eval_data_labels_before_pruning(capsys, tmp_path, named, monkeypatch):
    import kcm_core.pipeline as P

    def refuse(*args, **kwargs):
        raise AssertionError("pruned before the evaluation labels were checked")
    monkeypatch.setattr(P, "prune", refuse)
    code, out, err = run_cli(capsys, "prune", "--model", named, "--data", csv_file(tmp_path, [0, 1] * 4),
                             "--eval-data", csv_file(tmp_path, ["positive", "meh"], "eval.csv"),
                             "--flops", 0.8, "--method", "weight-magnitude", "--max-len", 16,
                             "--out", tmp_path / "pruned")
    assert code == 2
    assert "eval.csv: label 'meh' is not one of the model's 2 classes (0=negative, 1=positive)" in err
    assert not (tmp_path / "pruned").exists()


# --------------------------------------------------------------------------- labels: the rules

NAMED = {0: "negative", 1: "positive"}
UNNAMED = {0: "LABEL_0", 1: "LABEL_1"}
INTEGER_NAMED = {0: "-1", 1: "1"}           # what fine-tuning on labels -1/1 saves


@pytest.mark.parametrize("data, id2label, ids", [
    # a ClassLabel (hub) or the demo: ids come with the data, names are matched when the model has them
    (TextData(("a", "b"), labels=(0, 1), label_names=("negative", "positive")), UNNAMED, (0, 1)),
    (TextData(("a", "b"), labels=(0, 1), label_names=("positive", "negative")), NAMED, (1, 0)),
    # a file's string labels that spell integers are class ids ("1" in a JSON file)
    (TextData(("a",), labels=(0,), label_names=("1",), labels_by_name=True), UNNAMED, (1,)),
    (TextData(("a",), labels=(0,), label_names=("LABEL_1",), labels_by_name=True), UNNAMED, (1,)),
    # a model whose class names are integers is matched by name: -1 is class 0, 1 is class 1
    (TextData(("a", "b"), labels=(0, 1), label_names=("-1", "1"), labels_by_name=True), INTEGER_NAMED,
     (0, 1)),
    (TextData(("a",), labels=(1,)), INTEGER_NAMED, (1,)),
])
def test_label_mapping_rules(data, id2label, ids):
    mapped = labels_for_classes(data, id2label)
    assert mapped.labels == ids and not mapped.labels_by_name
    named = any(n != f"LABEL_{i}" for i, n in id2label.items())
    assert mapped.label_names == (tuple(id2label.values()) if named else None)


@pytest.mark.parametrize("data, id2label, message", [
    # 0 is no class of a model trained on -1/1 (its ids are not the file's numbers)
    (TextData(("a", "b"), labels=(0, 1)), INTEGER_NAMED, "label 0 is not one of the model's 2 "
                                                         "classes (0=-1, 1=1)"),
    # hub ClassLabel names that a named model does not have are not guessed by position
    (TextData(("a",), labels=(0,), label_names=("neg", "pos")), NAMED, "label 'neg'"),
])
def test_label_mapping_refusals(data, id2label, message):
    with pytest.raises(ValueError) as err:
        labels_for_classes(data, id2label)
    assert message in str(err.value)


def test_labels_for_model_reads_the_config_and_leaves_unlabeled_data_alone():
    config = T.BertConfig(id2label={0: "NEGATIVE", 1: "POSITIVE"})
    data = TextData(("good", "bad"), labels=(1, 0), label_names=("negative", "positive"), labels_by_name=True)
    assert labels_for_model(data, config).labels == (1, 0)
    assert labels_for_model(data, config).label_names == ("NEGATIVE", "POSITIVE")
    unlabeled = TextData(("a",))
    assert labels_for_model(unlabeled, object()) is unlabeled


def test_unmapped_name_labels_never_reach_a_batch(tmp_path, vocab):
    """Labels numbered per file mean nothing to a model: make_batches refuses them until mapped."""
    data = load_text_data(csv_file(tmp_path, ["pos", "neg"]))
    assert data.labels == (1, 0) and data.labels_by_name
    tokenizer = T.BertTokenizerFast(str(vocab))
    with pytest.raises(ValueError) as err:
        make_batches(data, tokenizer)
    assert "are names (neg, pos), not a model's class ids; map them with " \
           "kcm_core.data.labels_for_model(data, model.config) first" in str(err.value)
    assert "labels" not in make_batches(data, tokenizer, with_labels=False)[0]


# --------------------------------------------------------------------------- evaluate's own checks

def test_evaluate_classifier_refuses_nan_weights(tmp_path, vocab):
    model = T.BertForSequenceClassification.from_pretrained(save_classifier(tmp_path / "m", vocab))
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
    batch = {"input_ids": torch.tensor([[2, 5, 3]]), "labels": torch.tensor([0])}
    with pytest.raises(ValueError) as err:
        evaluate_classifier(model, [batch])
    assert str(err.value).startswith("the model has NaN or infinite weights in 'classifier.weight'; "
                                     "it cannot be scored or pruned.")


def test_evaluate_classifier_refuses_labels_outside_the_model(tmp_path, vocab):
    model = T.BertForSequenceClassification.from_pretrained(save_classifier(tmp_path / "m", vocab))
    batch = {"input_ids": torch.tensor([[2, 5, 3], [2, 6, 3]]), "labels": torch.tensor([0, 4])}
    with pytest.raises(ValueError) as err:
        evaluate_classifier(model, [batch])
    assert "the evaluation batches hold label 4 but the model predicts only classes 0-1" in str(err.value)


# --------------------------------------------------------------------------- labels: fine-tuning

POS = ["good film", "great fun movie", "very good acting", "fun plot"] * 5
NEG = ["bad film", "awful dull movie", "very dull acting", "not good plot"] * 5
FAST = dict(epochs=8, lr=3e-3, batch_size=8, max_len=16)


def labeled_csv(path: Path, texts, labels) -> Path:
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(texts, labels)))
    return path


@pytest.mark.parametrize("pos, neg", [("pos", "neg"), (2, 1)])
def test_finetuned_model_is_evaluated_with_the_names_it_saved(capsys, tmp_path, pos, neg):
    """Fine-tuning on labels pos/neg (or 2/1) saves them as the model's classes; evaluating the saved
    model on a file holding only the positive label matches them by name (once: renumbered to 0, 0%)."""
    from kcm_core.demos.finetune import FinetuneConfig, finetune
    encoder = save_tiny_encoder(tmp_path / "encoder", WORDS)
    train = load_text_data(labeled_csv(tmp_path / "train.csv", POS + NEG, [pos] * 20 + [neg] * 20))
    summary = finetune(str(encoder), train, tmp_path / "clf", FinetuneConfig(**FAST))
    saved = T.AutoConfig.from_pretrained(tmp_path / "clf")
    names = {"pos": ("neg", "pos"), 2: ("1", "2")}[pos]
    assert saved.id2label == dict(enumerate(names)) and summary["label_names"] == list(names)
    only_pos = labeled_csv(tmp_path / "test.csv", POS[:4], [pos] * 4)
    code, out, err = evaluate(capsys, tmp_path / "clf", only_pos)
    assert code == 0, err
    assert json.loads(out)["accuracy"]["value"] == 1.0


def test_finetune_refuses_eval_names_for_a_head_trained_on_ids(tmp_path):
    from kcm_core.demos.finetune import FinetuneConfig, finetune
    train = TextData(tuple(POS + NEG), labels=(1,) * 20 + (0,) * 20)
    eval_data = load_text_data(labeled_csv(tmp_path / "e.csv", ["good film"], ["pos"]))
    with pytest.raises(ValueError) as err:
        finetune(str(tmp_path / "never-loaded"), train, tmp_path / "clf", FinetuneConfig(**FAST),
                 eval_data=eval_data)
    assert "label 'pos' is not one of the model's 2 unnamed classes (0, 1)" in str(err.value)
    assert not (tmp_path / "clf").exists()


# --------------------------------------------------------------------------- labels: the app

def test_app_workspace_refuses_labels_the_model_cannot_predict(tmp_path, unnamed):
    """Five classes on a two-label model: the Scores page once raised IndexError on them."""
    from kcm_app import resources
    from kcm_app.sources import DataChoice, SampleChoice
    from kcm_core.models import load_model
    model, tokenizer = load_model(str(unnamed))
    data = DataChoice("file", str(csv_file(tmp_path, [0, 1, 2, 3, 4] * 6)))
    with pytest.raises(ValueError) as err:
        resources._workspace("folder:tiny", data, SampleChoice(size=8, max_len=16), model, tokenizer)
    assert "label 2 is not one of the model's 2 unnamed classes (0, 1)" in str(err.value)


# --------------------------------------------------------------------------- long lines, big files

MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import pandas  # noqa: F401  (imported before measuring: the loader's import is not its data)
    from transformers import BertTokenizerFast
    from kcm_core.data import load_text_data, make_batches

    def status_mb(field):
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) for l in fh if l.startswith(field + ":")) / 1024

    tokenizer = BertTokenizerFast(sys.argv[2])
    tokenizer(["good film"], ["fun"])
    # Reset the peak (VmHWM): a forked child starts with its parent's, the test process's, peak.
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = status_mb("VmRSS")
    data = load_text_data(sys.argv[1], text_pair_column=sys.argv[3] if len(sys.argv) > 3 else None)
    batches = make_batches(data, tokenizer, max_len=16, with_labels=False)
    peak = status_mb("VmHWM")
    print(json.dumps({"growth_mb": peak - before, "chars": [len(t) for t in data.texts],
                      "shape": list(batches[0]["input_ids"].shape)}))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures peak RSS through /proc")
@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl", ".pairs.csv"])
def test_a_20_mb_single_line_file_loads_in_bounded_memory(tmp_path, vocab, suffix):
    """Once 3.1 GB (the tokenizer saw the whole 20 MB string); now the text is cut as it is read.
    A pair of two such texts took over 20 GB (the tokenizer's own pair truncation is quadratic)."""
    line = "good fun " * 2_300_000                        # 20.7 MB, no line break inside
    path = tmp_path / f"big{suffix}"
    with path.open("w", encoding="utf-8") as fh:
        if suffix == ".csv":
            fh.write(f"text,label\n{line},1\n")
        elif suffix == ".pairs.csv":
            fh.write(f"text,other\n{line},{line[:10_000_000]}\n")
        elif suffix == ".jsonl":
            fh.write(json.dumps({"text": line, "label": 1}) + "\n")
        else:
            fh.write(line)
    assert path.stat().st_size >= 20_000_000
    argv = [str(path), str(vocab)] + (["other"] if suffix == ".pairs.csv" else [])
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["chars"] == [D.MAX_CHARS_PER_TEXT] and result["shape"] == [1, 16]
    assert result["growth_mb"] < 300, result


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl"])
def test_texts_are_cut_to_max_chars_and_the_next_rows_survive(tmp_path, suffix):
    long = "x" * (D.MAX_CHARS_PER_TEXT + 5)
    path = tmp_path / f"d{suffix}"
    if suffix == ".txt":
        path.write_text(f"{long}\nshort one\n")
    elif suffix == ".csv":
        path.write_text(f"text,label\n{long},0\nshort one,1\n")
    else:
        rows = [{"text": long, "label": 0}, {"text": "short one", "label": 1}]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = load_text_data(path)
    assert data.texts == ("x" * D.MAX_CHARS_PER_TEXT, "short one")


def test_make_batches_cuts_texts_before_the_tokenizer_sees_them(vocab):
    seen: list[int] = []
    real = T.BertTokenizerFast(str(vocab))

    class Spy:
        pad_token = real.pad_token

        def __call__(self, texts, pairs=None, **kwargs):
            seen.extend(len(t) for t in texts)
            return real(texts, pairs, **kwargs)

    long = "good " * (D.MAX_CHARS_PER_TEXT // 5 + 10)
    batch = make_batches(TextData((long, "fun")), Spy(), max_len=8)[0]
    assert seen == [D.MAX_CHARS_PER_TEXT, 3]
    assert batch["input_ids"].shape == (2, 8)


@pytest.mark.parametrize("words_a, words_b, max_len", [
    (40, 5, 32), (5, 40, 32), (40, 41, 32), (41, 40, 33), (200, 300, 64), (1, 200, 7),
])
def test_long_pairs_are_cut_before_the_tokenizer_truncates_them(vocab, words_a, words_b, max_len):
    """The tokenizer's own pair truncation grows with the square of the length, so pairs reach it
    already cut to what its longest_first rule keeps (it removes at most one token); the batches
    are exactly those of the tokenizer alone."""
    real = T.BertTokenizerFast(str(vocab))
    final_calls: list[tuple[list[str], list[str]]] = []

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, texts, pairs=None, **kwargs):
            if pairs is not None:
                final_calls.append((list(texts), list(pairs)))
            return real(texts, pairs, **kwargs)

    texts = (" ".join(WORDS[i % 14] for i in range(words_a)), "good film")
    pairs = (" ".join(WORDS[(i * 5) % 14] for i in range(words_b)), "not fun")
    batch = make_batches(TextData(texts, text_pairs=pairs), Spy(), max_len=max_len)[0]
    direct = real(list(texts), list(pairs), padding="longest", truncation=True, max_length=max_len,
                  return_tensors="pt")
    assert set(batch) == set(direct)
    for key in direct:
        assert torch.equal(batch[key], direct[key]), key
    [(seen_texts, seen_pairs)] = final_calls
    untruncated = real(seen_texts, seen_pairs)["input_ids"]
    assert max(len(ids) for ids in untruncated) <= max_len + 1


# --------------------------------------------------------------------------- odd cells

def test_csv_text_cells_are_read_verbatim(tmp_path):
    """A text of digits keeps its zeros and "NA"/"null" are texts, not missing values (once "7",
    and "row 1 has no value")."""
    path = tmp_path / "d.csv"
    path.write_text("id,text,label\n1,007,1\n2,NA,0\n3,null,1\n")
    data = load_text_data(path)
    assert data.texts == ("007", "NA", "null") and data.labels == (1, 0, 1)
    numbers = tmp_path / "n.csv"
    numbers.write_text("id,code\n1,007\n2,042\n")
    with pytest.raises(ValueError, match=r"has no string column to use as text; available columns: id, "
                                         r"code \(name one with text_column\)"):
        load_text_data(numbers)
    assert load_text_data(numbers, text_column="code").texts == ("007", "042")


@pytest.mark.parametrize("name, text, message", [
    ("inf.jsonl", '{"text": "a", "label": Infinity}\n{"text": "b", "label": 0}\n',
     "label column 'label' holds non-integer numbers (e.g. inf); only classification labels"),
    ("mixed.csv", "text,label\na,1\nb,pos\n",
     "label column 'label' mixes value types (int, str); labels must be all integers or all strings"),
    ("list.jsonl", '["a", 1]\n', "line 1 is a JSON list, not an object of column values"),
    ("missing.csv", "text,label\na,1\nb,\n",
     "row 1 has no value in label column 'label'; give every row a label or remove the unlabeled rows"),
])
def test_odd_label_and_row_cells_get_one_clear_message(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_text_data(path)
    assert message in str(err.value)


def test_thin_data_is_said_the_guessed_text_column_and_a_sample_smaller_than_asked(tmp_path, unnamed):
    """Issue 23 (12): a CSV without a ``text`` column quietly used its ``review`` column, and a one-line
    text file pruned the classifier on 1 sequence while the app claimed the sample asked for."""
    from kcm_app import resources
    from kcm_app.sources import DataChoice, SampleChoice
    from kcm_core.data import load_text_data
    from kcm_core.models import load_model
    (tmp_path / "reviews.csv").write_text("id,review\n1,a good film\n2,a dull plot\n")
    data = load_text_data(tmp_path / "reviews.csv")
    assert data.texts == ("a good film", "a dull plot")
    assert data.source == f"{tmp_path / 'reviews.csv'} (text from its column 'review': it has no text or sentence column)"
    assert load_text_data(tmp_path / "reviews.csv", text_column="review").source == str(tmp_path / "reviews.csv")

    from kcm_app.views.model import provenance, sample_warning
    model, tokenizer = load_model(str(unnamed))
    (tmp_path / "one.txt").write_text("a good film .\n")
    ws = resources._workspace("folder:tiny", DataChoice("file", str(tmp_path / "one.txt")),
                              SampleChoice(size=64, max_len=16), model, tokenizer)
    assert (ws.info.sample, ws.info.asked) == (1, 64)
    assert sample_warning(ws) == ("The data holds only 1 sequence for scoring, fewer than the 64 asked: the "
                                  "scores rest on that few. Give more data for scores you can trust.")
    assert provenance(ws).loc["unlabeled sequences for scoring", "value"] == "1"
    from types import SimpleNamespace

    from kcm_app.views.prune import readout_note
    from kcm_core.plan import PlanInfo
    info = PlanInfo(scaled_layers=2, repair="scales", repair_target="teacher")
    slow = SimpleNamespace(accuracy=None, agreement=None, plan=SimpleNamespace(info=info, layers=[None, None]))
    speed = SimpleNamespace(dense_seconds=0.01, pruned_seconds=0.01, timed_on="one batch")
    assert ("fitted to the unpruned model's output on the first 1 unlabeled sequences to keep a new budget "
            "quick (2 of 2 layers scaled)") in readout_note(ws, slow, speed)
