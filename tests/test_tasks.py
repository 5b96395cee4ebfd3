"""kcm_core.demos.tasks: the benchmark tasks' parsers on tiny fake inputs (never the network), and the cache check."""
from __future__ import annotations

import json
import lzma
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
import rdata                      # requirements-dev.txt: writes the fake R data the parsers read

from kcm_core.demos import classifier as demo, tasks


def serialized(tmp_path, obj) -> bytes:
    """``obj`` as an uncompressed R serialization stream (the body of one lazy-load record)."""
    path = tmp_path / "obj.rds"
    rdata.write_rds(path, obj, compression=None)
    return path.read_bytes()


def frame(reviews: list[str], scores: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"product": pd.Series([f"B{i:03d}" for i in range(len(reviews))], dtype=object),
                         "review": pd.Series(reviews, dtype=object),
                         "score": pd.Categorical(scores, categories=["great", "other"])})


def lazyload_db(tmp_path, objects: dict, kind: bytes = b"Z") -> tuple[bytes, bytes]:
    """A lazy-load database the way R writes one with ``compress = 3``: records of a 4-byte big-endian
    length, a type byte and the packed body, indexed by an RDS list (variables, references, compressed)."""
    rdb, variables = b"", {}
    for name, obj in objects.items():
        body = serialized(tmp_path, obj)
        packed = {b"Z": lambda b: lzma.compress(b, format=lzma.FORMAT_RAW,
                                                filters=[{"id": lzma.FILTER_LZMA2, "preset": 1}]),
                  b"1": zlib.compress, b"0": lambda b: b}[kind](body)
        record = struct.pack(">I", len(body)) + kind + packed
        variables[name] = np.array([len(rdb), len(record)], dtype=np.int32)
        rdb += record
    index = serialized(tmp_path, {"variables": variables, "references": {}, "compressed": np.array([3])})
    return index, rdb


TRAIN = frame(["Great <br />stuff &amp; cheap!", "Stale.<br /><br />Would not buy", "  Love   it "],
              ["great", "other", "great"])
TEST = frame(["<a href=\"http://x\">This</a> tea", "ok"], ["other", "great"])


@pytest.mark.parametrize("kind", [b"Z", b"1", b"0"], ids=["xz", "zlib", "stored"])
def test_fine_foods_read_from_a_lazy_load_database(tmp_path, kind):
    rdx, rdb = lazyload_db(tmp_path, {"testing_data": TEST, "other_thing": np.arange(5),
                                      "training_data": TRAIN}, kind)
    train, test = tasks.fine_foods(rdx, rdb)
    assert train.texts == ("Great stuff & cheap!", "Stale. Would not buy", "Love it")
    assert train.labels == (1, 0, 1) and train.label_names == ("other", "great")
    assert test.texts == ("This tea", "ok") and test.labels == (0, 1)
    assert test.source == "small_fine_foods testing_data"


def test_lazy_load_errors_name_the_problem(tmp_path):
    rdx, rdb = lazyload_db(tmp_path, {"training_data": TRAIN, "testing_data": TEST})
    with pytest.raises(ValueError, match="no object 'ames'"):
        tasks.read_lazyload(rdx, rdb, "ames")
    with pytest.raises(ValueError, match="truncated"):
        tasks.fine_foods(rdx, rdb[:-7])
    damaged = rdb[:9] + bytes(b ^ 0xFF for b in rdb[9:40]) + rdb[40:]
    with pytest.raises(ValueError, match="training_data"):
        tasks.read_lazyload(rdx, damaged, "training_data")
    with pytest.raises(ValueError, match="not a readable R serialization"):
        tasks.read_lazyload(b"not an index", rdb, "training_data")


def test_a_review_with_an_unknown_score_is_refused(tmp_path):
    bad = frame(["fine"], ["great"])
    bad["score"] = pd.Categorical(["meh"], categories=["meh"])
    rdx, rdb = lazyload_db(tmp_path, {"training_data": bad, "testing_data": TEST})
    with pytest.raises(ValueError, match=r"training_data row 1 has score 'meh'"):
        tasks.fine_foods(rdx, rdb)


def test_clean_review_drops_markup_only():
    assert tasks.clean_review("A&amp;B <br /><br/>c  <i>d</i>\n e <3") == "A&B c d e <3"


def hedge_csv(n_per_class: int) -> bytes:
    rows = [f'"{1 if i % 2 else -1}","Sentence {i} that {"is" if i % 2 else "may be"} true."'
            for i in range(2 * n_per_class)]
    return ("\ufeff" + "\r\n".join(rows) + "\r\n").encode("utf-8")


def test_hedge_labels_and_stratified_split():
    train, test = tasks.hedge(hedge_csv(10))
    assert (len(train), len(test)) == (16, 4)
    assert sorted(train.labels) == [0] * 8 + [1] * 8 and sorted(test.labels) == [0, 0, 1, 1]
    labelled = dict(zip(train.texts + test.texts, train.labels + test.labels))
    # "1" in the first column is certain (pattern's own test reads it so), "-1" uncertain.
    assert labelled["Sentence 1 that is true."] == 1 and labelled["Sentence 0 that may be true."] == 0
    assert train.label_names == ("uncertain", "certain")
    assert set(train.texts).isdisjoint(test.texts)
    assert "CoNLL-2010" in train.source and "train" in train.source
    with pytest.raises(ValueError, match="CoNLL-2010 uncertainty CSV row 1"):
        tasks.hedge(b'"yes","a sentence"\r\n')


def test_an_unprepared_or_altered_task_says_what_to_run(tmp_path):
    with pytest.raises(ValueError, match=r"prepare_tasks.py --task hedge"):
        tasks.load_task_split("hedge", "test", tmp_path)
    with pytest.raises(ValueError, match="unknown task 'sst2'"):
        tasks.task_dir("sst2", tmp_path)
    # A folder in the demo's layout, as prepare_tasks writes it.
    folder = tasks.task_dir("hedge", tmp_path)
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "config.json").write_text("{}")
    (folder / "model" / "model.safetensors").write_bytes(b"weights")
    train, test = tasks.hedge(hedge_csv(5))
    demo.write_split(folder / "train.jsonl", train)
    demo.write_split(folder / "test.jsonl", test)
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": demo.file_sha256(p)}
             for p in folder.rglob("*") if p.is_file()}
    (folder / "summary.json").write_text(json.dumps({"files": files}))
    back = tasks.load_task_split("hedge", "test", tmp_path)
    assert back.texts == test.texts and back.labels == test.labels
    assert back.label_names == ("uncertain", "certain")
    text = (folder / "test.jsonl").read_text()
    (folder / "test.jsonl").write_text(text.replace("Sentence", "Sentenxe", 1))    # same size, altered
    with pytest.raises(ValueError, match=r"test.jsonl does not have the sha256.*prepare_tasks.py --task hedge"):
        tasks.load_task_split("hedge", "test", tmp_path)
