"""What the commands share: progress on stderr, the JSON out, the checks of ``--out`` and ``--json``,
the word ``demo`` resolved to the prepared demos, the data sources, and the one tail of ``prune``: the
report (in memory and streamed alike) and the export (classifiers and language models alike)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

from ..runtime import Progress
from .vision import (DEMO_VISION, demo_folder, demo_model_path, image_batches, is_image_source, is_vision,
                     load_images)

DEMO = "demo"
DEMO_LM = "demo-lm"
# --samples default for text classifiers (sequences), as the app's: against 2048 it changes the demo's KCM
# accuracy by -0.4 to +0.6 points at 0.9 to 0.5 (benchmarks/results/sample_size.md; the paper: 512 to 4096
# within 0.3) and D2 reads a quarter of the texts. LMs: see cli.lm
CLASSIFIER_SAMPLES = 512
IMAGE_SAMPLES = 512            # --samples default for image classifiers: the vision benchmark's calibration size


def classifier_config(config, args, vision: bool):
    """A classifier's configuration, with ``args.samples`` resolved: an image model's default method
    (``kcm_core.methods.DEFAULT_VISION_METHOD``) unless ``--method`` named one, and its sample size."""
    from dataclasses import replace

    from ..methods import DEFAULT_VISION_METHOD
    if args.samples is None:
        args.samples = IMAGE_SAMPLES if vision else CLASSIFIER_SAMPLES
    return replace(config, method=DEFAULT_VISION_METHOD) if vision and args.method is None else config


class StderrProgress:
    """Prints progress lines to stderr, at most one per stage change or 10% step."""

    def __init__(self) -> None:
        self._last: tuple[str, int] | None = None

    def __call__(self, message: str, fraction: float) -> None:
        stage = message.split(":")[0]
        key = (stage, int(fraction * 10))
        if key != self._last:
            self._last = key
            print(f"[{fraction:4.0%}] {message}", file=sys.stderr, flush=True)


def json_out(data: Any, path: str | None = None) -> None:
    """Print ``data`` as JSON, then write it to ``path`` (atomically; missing folders are created).

    Printed first, so a full disk or a refused write loses nothing: that becomes one ``ValueError``
    naming the file, and the JSON is still on stdout."""
    from ..atomic import write_text_atomic
    text = json.dumps(data, indent=2, default=str)
    print(text, flush=True)
    if path:
        target = Path(path).expanduser()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(target, text + "\n")
        except OSError as err:
            raise ValueError(f"could not write --json {path}: {err.strerror or err} (the JSON was "
                             "printed to stdout above)") from err


def check_output(args, markers: Sequence[str] | None, kind: str = "export") -> Path | None:
    """Refuse a bad ``--out`` and ``--json`` now, before any heavy work: ``--out`` equal to, inside or
    around ``--model`` / ``--data`` / ``--eval-data``, an existing path without ``--overwrite``, one
    that is not an earlier ``kind`` (``markers``) with it, or a folder that cannot be written; ``--json``
    a folder, a source, or unwritable. Returns ``--out`` (None for commands without one)."""
    from ..atomic import check_protected, check_replaceable, check_writable
    sources = source_paths(args)
    out = Path(args.out).expanduser() if getattr(args, "out", None) else None
    if out is not None:
        check_protected(out, sources, "--out")
        if out.exists() or out.is_symlink():
            if not args.overwrite:
                raise ValueError(f"output folder {out} already exists; choose another --out or pass "
                                 "--overwrite")
            check_replaceable(out, markers or (), kind=kind)
        check_writable(out, "--out")
    json_path = getattr(args, "json_out", None)
    if json_path:
        target = Path(json_path).expanduser()
        if target.is_dir():
            raise ValueError(f"--json {json_path} is a folder; give a file name for the JSON report")
        if out is not None and target.absolute() == out.absolute():
            raise ValueError(f"--json {json_path} is the --out folder; give the JSON its own file name")
        check_protected(target, sources, "--json")
        check_writable(target, "--json file")
    return out


def source_paths(args) -> list[str]:
    """What the command reads from disk (the demo's cache folder when a source is 'demo')."""
    paths = [getattr(args, name, None) for name in ("model", "data", "eval_data")]
    if DEMO in paths:
        from ..demos import classifier as demo
        paths.append(str(demo.demo_dir()))
    if DEMO_LM in paths:
        from ..demos import lm as demo_lm
        paths.append(str(demo_lm.lm_demo_dir()))
    if DEMO_VISION in paths:
        paths.append(demo_folder())
    return [p for p in paths if p and p not in (DEMO, DEMO_LM, DEMO_VISION)]


# --------------------------------------------------------------------------- sources

def resolve_model_path(name: str, progress: Progress) -> str:
    if name == DEMO:
        from ..demos import classifier as demo
        return str(demo.prepare_demo(progress=progress)["model_dir"])
    if name == DEMO_LM:
        from ..demos import lm as demo_lm
        return str(demo_lm.prepare_lm_demo(progress=progress)["model_dir"])
    if name == DEMO_VISION:
        return demo_model_path(progress)
    return name


def load_data(args, progress: Progress, split: str = "train", *, evaluation: bool = False,
              images: bool = False):
    """``--data`` (or ``--eval-data`` when ``evaluation``) as ``TextData``.

    The word ``demo`` means the prepared demo's ``split``. Anything else is a file or a hub dataset
    read with the shared column options and ``--data-config``; the hub split is ``--split`` for
    ``--data`` and ``--eval-split`` for ``--eval-data``. ``demo-vision``, a folder, an image file, or
    any table when ``images`` (an image model) is read as ``ImageData`` (``kcm_core.images``).
    """
    from .. import data as D
    source = args.eval_data if evaluation else args.data
    if images or is_image_source(source):
        return load_images(source, split, args, progress,
                           hub_split=getattr(args, "eval_split" if evaluation else "split", None))
    if source == DEMO:
        from ..demos import classifier as demo
        demo.prepare_demo(progress=progress)
        return demo.load_demo_split(split)
    return D.load_text_data(source, text_column=args.text_column,
                            text_pair_column=args.text_pair_column,
                            label_column=args.label_column,
                            split=args.eval_split if evaluation else args.split,
                            config_name=args.data_config)


def model_batches(data, tokenizer, model, args, *, with_labels: bool = True, progress: Progress | None = None):
    """Tokenized batches, or for an image model ``pixel_values`` from its image processor."""
    from .. import data as D
    if is_vision(model):
        return image_batches(data, tokenizer, model, args.batch_size, with_labels=with_labels, progress=progress)
    return D.make_batches(data, tokenizer, max_len=args.max_len, batch_size=args.batch_size,
                          with_labels=with_labels)


def limit(data, samples: int | None, seed: int):
    """The seeded subset every caller draws (``TextData.sample``): ``data`` itself when it is small."""
    return data.sample(samples, seed)


def sample_record(args, sample) -> dict:
    """The report's ``data`` for a classifier: the scoring sample and how it was drawn."""
    from ..images import ImageData
    return {"source": sample.source, "samples": len(sample), "max_len": args.max_len, "seed": args.seed,
            **({"unit": "images"} if isinstance(sample, ImageData) else {})}


def export_formats(args) -> tuple[str, ...]:
    """``--format`` as a tuple of format names (``"hf,onnx"`` -> ``("hf", "onnx")``)."""
    return tuple(f.strip() for f in args.format.split(",") if f.strip())


# --------------------------------------------------------------------------- the tail of prune

def run_report(args, model, model_path: str, config, result, *, data: dict, params_before: int,
               params_after: int, evaluation, seconds: dict):
    """The report of a pruning ``result`` (``pipeline.PruneResult`` or ``streamed.StreamResult``: a plan,
    its sequence length and score details) of ``model`` (a streamed run's empty skeleton serves):
    what every ``prune`` writes, in memory and streamed."""
    from ..arch import model_shape
    from ..flops import relative_flops
    from ..report import build_report
    shape = model_shape(model.config)
    return build_report(
        model=model, source=args.model,
        path=str(Path(model_path).resolve()) if Path(model_path).exists() else model_path,
        config=config, data=data, plan=result.plan, seq_len=result.seq_len,
        achieved_flops=relative_flops(shape, result.seq_len, result.plan.kept_counts),
        params_before=params_before, params_after=params_after,
        details=result.details, evaluation=evaluation, seconds=seconds)


def write_pruned(args, model, tokenizer, model_path: str, result, out_dir: Path | None, *, config,
                 data: dict, evaluation, times: dict, progress: Progress | None) -> dict:
    """The report of a pruning ``result`` of ``model`` and its export to ``out_dir``: the end of every
    in-memory ``prune`` (classifiers and language models); returns what the command prints."""
    from ..export import save_pruned
    from ..flops import count_params
    report = run_report(args, model, model_path, config, result, data=data,
                        params_before=count_params(model).total, params_after=count_params(result.model).total,
                        evaluation=evaluation, seconds=times)
    export = save_pruned(result.model, out_dir, plan=result.plan, report=report, tokenizer=tokenizer,
                         formats=export_formats(args), overwrite=args.overwrite, progress=progress,
                         protected=source_paths(args))
    return {**report.to_dict(), "export": export.to_dict(), "out": str(out_dir)}
