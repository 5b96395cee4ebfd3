"""kcm_core.data: every file format, column and label rules, batches. No network, tiny tokenizers."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import BertTokenizerFast, GPT2TokenizerFast

from kcm_core import data as D
from kcm_core.data import TextData, check_labels_for_model, load_text_data, make_batches, mean_length

WORDS = "the a film movie is was good great fun bad awful dull not very plot".split()


@pytest.fixture
def tokenizer(tmp_path: Path) -> BertTokenizerFast:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast(vocab=str(vocab))


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- formats

def test_csv_with_string_labels_maps_sorted_names(tmp_path):
    src = write(tmp_path / "d.csv", "text,label\ngood film,pos\nbad film,neg\nfun,pos\n")
    d = load_text_data(src)
    assert d.texts == ("good film", "bad film", "fun")
    assert d.labels == (1, 0, 1)
    assert d.label_names == ("neg", "pos")
    assert d.num_classes == 2 and d.has_labels and len(d) == 3
    assert d.source == src


def test_tsv_reads_glue_style_quotes_verbatim(tmp_path):
    src = write(tmp_path / "d.tsv", 'sentence\tlabel\nit is " good\t1\n"bad\t0\n')
    d = load_text_data(src)
    assert d.texts == ('it is " good', '"bad')
    assert d.labels == (1, 0) and d.label_names is None


def test_jsonl_with_bom_and_json_array(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes("\ufeff".encode() + b'{"text": "caf\xc3\xa9", "label": 0}\n{"text": "b", "label": 1}\n')
    assert load_text_data(str(jsonl)).texts == ("café", "b")
    arr = write(tmp_path / "d.json", json.dumps([{"sentence": "x", "label": 1}, {"sentence": "y", "label": 0}]))
    d = load_text_data(arr)
    assert d.texts == ("x", "y") and d.labels == (1, 0)


def test_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    pd.DataFrame({"id": [7, 8], "review": ["good", "bad"], "stars": [5, 1]}).to_parquet(path)
    d = load_text_data(str(path), label_column="stars")
    assert d.texts == ("good", "bad")             # first string column
    assert d.labels == (5, 1) and d.label_names is None     # integers are class ids: never renumbered


def test_txt_one_text_per_line_blank_lines_dropped(tmp_path):
    src = write(tmp_path / "d.txt", "first line\n\n   \nsecond line  \n")
    d = load_text_data(Path(src))                  # a Path works as well as a str
    assert d.texts == ("first line", "second line")
    assert not d.has_labels and d.labels is None and d.num_classes == 0


def test_text_pairs(tmp_path, tokenizer):
    src = write(tmp_path / "p.csv", "sentence1,sentence2,label\nthe film,a movie,1\nbad,good,0\n")
    d = load_text_data(src, text_column="sentence1", text_pair_column="sentence2")
    assert d.texts == ("the film", "bad") and d.text_pairs == ("a movie", "good")
    batch = make_batches(d, tokenizer)[0]
    # [CLS] the film [SEP] a movie [SEP]: the second segment is marked with token type 1
    assert batch["input_ids"][0].tolist() == [2, 5, 7, 3, 6, 8, 3]
    assert batch["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_local_files_never_go_through_datasets(tmp_path, monkeypatch):
    import datasets

    def refuse(*args, **kwargs):
        raise AssertionError("a local file went through datasets.load_dataset")
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    for name, text in (("d.csv", "text,label\na,1\nb,0\n"), ("d.tsv", "text\tlabel\na\t1\nb\t0\n"),
                       ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')):
        assert load_text_data(write(tmp_path / name, text)).labels == (1, 0)


def test_json_file_as_lines_or_object_of_columns_keeps_value_types(tmp_path):
    lines = write(tmp_path / "lines.json", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    assert load_text_data(lines).texts == ("a", "b")
    pretty = write(tmp_path / "cols.json", json.dumps({"text": ["a", "b"], "label": [0, 1]}, indent=2))
    assert load_text_data(pretty).labels == (0, 1)
    # Strings stay strings: no number or date guessing from text that looks like one.
    typed = write(tmp_path / "t.jsonl",
                  '{"date": "2020-01-01", "label": "1"}\n{"date": "007", "label": "0"}\n')
    d = load_text_data(typed)
    assert d.texts == ("2020-01-01", "007") and d.labels == (1, 0) and d.label_names == ("0", "1")


def test_mixed_label_types_and_unparsable_files(tmp_path):
    mixed = write(tmp_path / "m.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": "pos"}\n')
    with pytest.raises(ValueError, match=r"mixes value types \(int, str\)"):
        load_text_data(mixed)
    with pytest.raises(ValueError, match=r"could not read .*bad.csv as CSV: ParserError: Error tokenizing"):
        load_text_data(write(tmp_path / "bad.csv", "text,label\na,1\nb,0,extra,more\n"))
    with pytest.raises(ValueError, match=r"could not read .*bad.jsonl as JSON: ValueError"):
        load_text_data(write(tmp_path / "bad.jsonl", '{"text": "a"}\n{"text": \n'))
    with pytest.raises(ValueError, match="as CSV: EmptyDataError: No columns to parse from file"):
        load_text_data(write(tmp_path / "blank.csv", "\n\n"))
    with pytest.raises(ValueError, match="has no rows"):
        load_text_data(write(tmp_path / "empty.json", "[]"))


# --------------------------------------------------------------------------- errors

def test_wrong_column_lists_available_columns(tmp_path):
    src = write(tmp_path / "d.csv", "review,label\ngood,1\n")
    with pytest.raises(ValueError, match=r"no text column 'text'.*available columns: review, label"):
        load_text_data(src, text_column="text")
    with pytest.raises(ValueError, match="no label column 'y'; available columns: review, label"):
        load_text_data(src, label_column="y")
    with pytest.raises(ValueError, match="no text pair column 'b'"):
        load_text_data(src, text_pair_column="b")


@pytest.mark.parametrize("name", ["e.csv", "e.txt", "e.jsonl", "e.parquet"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        load_text_data(str(tmp_path / name))


def test_header_only_and_blank_text_files(tmp_path):
    with pytest.raises(ValueError, match="has no rows"):
        load_text_data(write(tmp_path / "h.csv", "text,label\n"))
    with pytest.raises(ValueError, match="only blank lines"):
        load_text_data(write(tmp_path / "b.txt", "\n \n"))


@pytest.mark.parametrize("name", ["l.csv", "l.txt", "l.jsonl"])
def test_non_utf8_file(tmp_path, name):
    (tmp_path / name).write_bytes("text,label\nh\xe9llo,1\n".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8"):
        load_text_data(str(tmp_path / name))


def test_missing_file_folder_and_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match="no data file at"):
        load_text_data(str(tmp_path / "missing.csv"))
    with pytest.raises(ValueError, match="is a folder"):
        load_text_data(str(tmp_path))
    with pytest.raises(ValueError, match="unsupported file type '.xlsx'"):
        load_text_data(write(tmp_path / "d.xlsx", "x"))
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        load_text_data(write(tmp_path / "ok.txt", "a\n"), limit=0)


def test_missing_text_value_names_row(tmp_path):
    src = write(tmp_path / "d.csv", "text,label\ngood,1\n,0\n")
    with pytest.raises(ValueError, match="row 1 has no value in text column 'text'"):
        load_text_data(src)


# --------------------------------------------------------------------------- labels

@pytest.mark.parametrize("values, labels, names", [
    ([0, 1, 1, 0], (0, 1, 1, 0), None),                 # already 0..C-1: kept
    ([-1, 1, 1, -1], (0, 1, 1, 0), ("-1", "1")),        # sorted unique, mapped in order
    ([2, 0, 2, 0], (2, 0, 2, 0), None),                 # integers are class ids: gaps are kept
    ([True, False, True, False], (1, 0, 1, 0), None),
    (["pos", "neg", "pos", "neg"], (1, 0, 1, 0), ("neg", "pos")),
])
def test_label_mapping(tmp_path, values, labels, names):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": v}) + "\n" for i, v in enumerate(values)))
    d = load_text_data(str(path))
    assert d.labels == labels and d.label_names == names


def test_labels_only_from_named_or_label_column(tmp_path):
    src = write(tmp_path / "d.csv", "text,target\na,x\nb,y\n")
    assert not load_text_data(src).has_labels
    assert load_text_data(src, label_column="target").labels == (0, 1)


def test_bad_labels(tmp_path):
    with pytest.raises(ValueError, match="non-integer numbers"):
        load_text_data(write(tmp_path / "f.csv", "text,label\na,0.5\nb,1.5\n"))
    with pytest.raises(ValueError, match="row 1 has no value in label column"):
        load_text_data(write(tmp_path / "n.csv", "text,label\na,1\nb,\n"))


def test_check_labels_for_model():
    two = TextData(texts=("a", "b"), labels=(0, 1))
    check_labels_for_model(two, 2)
    with pytest.raises(ValueError, match="needs at least two classes"):
        check_labels_for_model(TextData(texts=("a", "b"), labels=(1, 1), label_names=("x", "y")), 2)
    with pytest.raises(ValueError, match="has 3 classes but the model predicts only 2 labels"):
        check_labels_for_model(TextData(texts=("a", "b", "c"), labels=(0, 1, 2)), 2)
    with pytest.raises(ValueError, match="has no labels"):
        check_labels_for_model(TextData(texts=("a",)), 2)


def test_align_labels_follows_reference_names():
    test = TextData(texts=("a",), labels=(0,), label_names=("pos",))
    assert D.align_labels(test, ("neg", "pos")).labels == (1,)
    with pytest.raises(ValueError, match="label 'meh'"):
        D.align_labels(TextData(texts=("a",), labels=(0,), label_names=("meh",)), ("neg", "pos"))


def test_textdata_validates_and_subsets():
    with pytest.raises(ValueError, match="labels has 1 entries but texts has 2"):
        TextData(texts=("a", "b"), labels=(0,))
    d = TextData(texts=("a", "b", "c"), labels=(0, 1, 0), label_names=("n", "p"), source="s")
    sub = d.subset([2, 0])
    assert sub.texts == ("c", "a") and sub.labels == (0, 0) and sub.label_names == ("n", "p")
    assert sub.num_classes == 2 and sub.source == "s"
    with pytest.raises(ValueError, match="out of range"):
        d.subset([3])


def test_limit_is_seeded_and_keeps_file_order(tmp_path):
    src = write(tmp_path / "d.txt", "\n".join(f"line {i}" for i in range(50)))
    a = load_text_data(src, limit=10, seed=1)
    assert a.texts == load_text_data(src, limit=10, seed=1).texts
    assert a.texts != load_text_data(src, limit=10, seed=2).texts
    assert len(a) == 10 and list(a.texts) == sorted(a.texts, key=lambda t: int(t.split()[1]))
    assert len(load_text_data(src, limit=500)) == 50
    assert a.texts == load_text_data(src).sample(10, seed=1).texts
    assert a.source == f"{src} (random 10 of 50, seed 1)"


def test_seeded_indices_known_answer_and_nesting():
    # The first n of torch.randperm(total) from a generator seeded with the seed, sorted: with seed 0
    # randperm(10) starts 4, 1, 7, 5. The CLI's --samples subset has always been drawn this way.
    assert D.seeded_indices(10, 3, seed=0) == [1, 4, 7]
    assert D.seeded_indices(10, 4, seed=0) == [1, 4, 5, 7]              # a larger subset contains it
    assert D.seeded_indices(10, 3, seed=1) != [1, 4, 7]
    assert D.seeded_indices(10, None, seed=0) == D.seeded_indices(10, 99, seed=0) == list(range(10))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=f"sample size must be a positive integer or None, got {bad!r}"):
            D.seeded_indices(10, bad, seed=0)


def test_textdata_sample_keeps_order_names_and_source():
    d = TextData(texts=tuple("abcdefghij"), labels=(0, 1) * 5, label_names=("n", "p"), source="s")
    sub = d.sample(3, seed=0)
    assert sub.texts == ("b", "e", "h") and sub.labels == (1, 0, 1)
    assert sub.label_names == ("n", "p") and sub.source == "s"
    assert d.sample(10, seed=0) is d and d.sample(None, seed=5) is d
    assert d.sample(3, seed=0) == sub


# --------------------------------------------------------------------------- hub (never the network)

def test_hub_offline_env_fails_in_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"HF_HUB_OFFLINE is set, so hub dataset 'glue/sst2' cannot be "
                                         r"loaded; use a local file"):
        load_text_data("glue", config_name="sst2", split="validation")


def test_hub_unreachable_fails_in_one_sentence(monkeypatch):
    import huggingface_hub
    import kcm_core.hub as H

    def refuse(self, repo_id, **kwargs):
        raise ConnectionError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(H, "hub_offline", lambda: False)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", refuse)
    with pytest.raises(ValueError) as err:
        load_text_data("glue", config_name="sst2", split="validation")
    assert str(err.value) == ("could not reach the Hugging Face hub to load dataset 'glue/sst2' from this "
                              "machine (ConnectionError); pass a local folder instead")


def test_hub_dataset_uses_classlabel_names(monkeypatch):
    import datasets
    import kcm_core.hub as H
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    fake = datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": [1, 0]}, features=features)
    unlabeled = datasets.Dataset.from_dict({"sentence": ["a"], "label": [-1]}, features=features)
    monkeypatch.setattr(H, "hub_offline", lambda: False)
    monkeypatch.setattr(H, "check_hub", lambda *a, **k: None)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, split=None, **k: fake if split == "x" else unlabeled)
    d = load_text_data("glue", config_name="sst2", split="x")
    assert d.labels == (1, 0) and d.label_names == ("negative", "positive")
    assert d.source == "hub:glue/sst2 [x]"
    assert not load_text_data("glue", config_name="sst2", split="test").has_labels   # GLUE test: all -1

    def broken(*a, **k):
        raise ConnectionError("reset by peer")
    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(ValueError, match="could not reach the Hugging Face hub to load dataset 'glue/sst2'"):
        load_text_data("glue", config_name="sst2", split="x")


# --------------------------------------------------------------------------- batches

def test_make_batches_dynamic_padding_labels_order(tokenizer):
    d = TextData(texts=("good", "a very good film", "bad", "the film was not fun"), labels=(1, 1, 0, 0))
    batches = make_batches(d, tokenizer, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [torch.Size([2, 6]), torch.Size([2, 7])]
    assert set(batches[0]) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert batches[0]["labels"].dtype == torch.long and batches[1]["labels"].tolist() == [0, 0]
    assert batches[0]["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert mean_length(batches) == (3 + 6 + 3 + 7) / 4
    assert "labels" not in make_batches(d, tokenizer, with_labels=False)[0]


def test_make_batches_truncates_and_validates(tokenizer):
    d = TextData(texts=("the film " * 20,))
    assert make_batches(d, tokenizer, max_len=8)[0]["input_ids"].shape == (1, 8)
    with pytest.raises(ValueError, match="max_len must be a positive integer, got 0"):
        make_batches(d, tokenizer, max_len=0)
    with pytest.raises(ValueError, match="data is empty"):
        make_batches(TextData(texts=()), tokenizer)
    assert mean_length([]) == 0.0                               # no sequences: no length


def test_make_batches_pads_gpt2_style_tokenizer_on_a_copy():
    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2, "ab": 3, "Ġ": 4, "Ġa": 5, "Ġb": 6}
    tok = GPT2TokenizerFast(vocab=vocab, merges=[("a", "b"), ("Ġ", "a"), ("Ġ", "b")])
    assert tok.pad_token is None
    batch = make_batches(TextData(texts=("ab a b", "a")), tok)[0]
    assert batch["input_ids"].tolist()[1] == [1, 0, 0]          # padded with the end-of-text id
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert tok.pad_token is None                                 # the caller's tokenizer is untouched


def test_shuffled_sample_is_the_same_subset_in_the_order_drawn():
    """The benchmarks' order (their first rows scale) and the CLI's subset come from one draw."""
    from kcm_core.data import seeded_indices
    drawn = seeded_indices(50, 12, seed=4, shuffled=True)
    assert drawn == torch.randperm(50, generator=torch.Generator().manual_seed(4))[:12].tolist()
    assert sorted(drawn) == seeded_indices(50, 12, seed=4) and drawn != sorted(drawn)
    assert sorted(seeded_indices(5, None, seed=1, shuffled=True)) == [0, 1, 2, 3, 4]
