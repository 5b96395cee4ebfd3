"""Command line: ``python -m kcm_core {flops,prune,evaluate,export,finetune,demo}``.

JSON goes to stdout (or files), progress to stderr. Bad input exits with code 2 and one clear line,
never a traceback. The word ``demo`` stands for the prepared demo wherever a model or data source
is expected (its model folder; its train split as the unlabeled sample, its test split for evaluation);
``demo-lm`` and ``demo-vision`` likewise for the language-model and image demos.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from ..hull import STOP_RULES
from .common import (DEMO, classifier_config, StderrProgress, check_output, export_formats, json_out, limit,
                     load_data, model_batches, resolve_model_path, sample_record, source_paths, write_pruned)
from .lm import evaluate_lm_command, is_causal_lm, lm_config, prune_lm
from .vision import DEMO_VISION, check_image_data, is_image_source, is_vision, load_images

# --------------------------------------------------------------------------- commands

def cmd_flops(args) -> dict:
    from ..arch import model_shape
    from ..flops import cost_report, flops_floor, keep_count
    from ..models import load_config
    progress = StderrProgress()
    config = load_config(resolve_model_path(args.model, progress))
    shape = model_shape(config)
    seq_len = args.seq_len if args.seq_len is not None else (shape.image_tokens if shape.vision else 128)
    report = cost_report(shape, seq_len).to_dict()
    report["params"]["note"] = "estimated from the config (no weights read)"
    report["floor_relative_flops"] = flops_floor(shape, seq_len)
    report["model"] = args.model
    if args.flops is not None:
        k = keep_count(shape, seq_len, args.flops)
        report["budget"] = {"relative_flops": args.flops, "keep_neurons": k,
                            "total_neurons": sum(shape.ffn_width)}
    return report


def _prune_config(args):
    from ..config import PruneConfig
    from ..hull import HullConfig
    from ..methods import DEFAULT_METHOD
    from ..repair import RepairConfig
    from ..scaling import ScaleConfig
    from ..scores import D2Config
    return PruneConfig(
        method=args.method or DEFAULT_METHOD, budget=args.flops, seq_len=args.seq_len, seed=args.seed,
        hull=HullConfig(sigma=args.sigma, sigma_mode=args.sigma_mode, alpha=args.alpha,
                        stop_rule=args.stop_rule, max_iter=args.max_iter, rank_tol=args.rank_tol,
                        top_share=args.top_share),
        d2=D2Config(statistic=args.d2_statistic, normalise=args.d2_normalise),
        scale=ScaleConfig(ridge=args.ridge), scale_samples=args.scale_samples or 512,
        label_samples=args.label_samples, multiple=args.multiple,
        min_per_layer=args.min_per_layer, uniform=args.uniform, allocation=args.allocation,
        repair=RepairConfig(kind=args.repair, target=args.repair_target, damp=args.refit_damp),
    )


def cmd_prune(args) -> dict | None:
    """Under torchrun (or accelerate launch) every rank runs this with the same arguments and takes
    its share of the calibration work; rank 0 alone checks and writes ``--out`` and ``--json``, prints,
    and evaluates. The other ranks return None."""
    from ..distributed import session
    with session() as group:
        return _prune(args, group)


def _prune(args, group) -> dict | None:
    from .. import data as D
    from ..evaluate import evaluate_classifier
    from ..arch import model_shape
    from ..models import fit_max_len, load_model
    from ..pipeline import prune
    from ..select import check_multiple
    from ..report import Evaluation

    from ..export.saving import EXPORT_MARKERS
    out_dir = group.only_main(lambda: check_output(args, EXPORT_MARKERS))   # before any heavy work
    config = _prune_config(args)                      # validates options before any heavy work
    progress = StderrProgress() if group.is_main else None
    if args.stream:                                   # one layer at a time: kcm_core.cli.streamed
        if group.distributed:
            raise ValueError("--stream runs in one process (one layer at a time); run it with plain "
                             "`python -m kcm_core prune ... --stream`, not under torchrun")
        from .streamed import prune_streamed_command
        return prune_streamed_command(args, config, out_dir, progress)
    times: dict[str, float] = {}
    start = time.perf_counter()
    model_path = group.main_first(lambda: resolve_model_path(args.model, progress))
    model, tokenizer = load_model(model_path)
    args.max_len = fit_max_len(args.max_len, model.config, option="--max-len")   # before any data work
    check_multiple(args.multiple, model_shape(model.config).ffn_width)             # before scoring
    times["load"] = time.perf_counter() - start
    if is_causal_lm(model):
        config = lm_config(config, args)
        return prune_lm(args, config, model, tokenizer, model_path, out_dir, times, progress, group=group)
    images = is_vision(model)
    config = classifier_config(config, args, images)

    # Labels become the model's class ids (or are refused) before any work: scoring and evaluation
    # must agree with what the model predicts.
    sample = group.main_first(lambda: D.labels_for_model(
        limit(load_data(args, progress, "train", images=images), args.samples, args.seed), model.config))
    check_image_data(sample, model)
    eval_data = group.only_main(lambda: _evaluation_data(args, sample, progress, images))
    eval_data = None if eval_data is None else D.labels_for_model(eval_data, model.config)
    unlabeled = model_batches(sample, tokenizer, model, args, with_labels=False, progress=progress)
    spec = config.spec
    labeled = None
    if spec.uses_labels:
        if not sample.has_labels:
            raise ValueError(f"method {spec.name!r} needs labels: name the label column with --label-column")
        labeled = model_batches(limit(sample, config.label_samples, args.seed), tokenizer, model, args)
    result = prune(model, config, unlabeled, labeled, progress, group=group)
    if not group.is_main:
        return None
    times.update(result.seconds)

    evaluation = None
    if eval_data is not None:
        t = time.perf_counter()
        batches = model_batches(eval_data, tokenizer, model, args)
        before = evaluate_classifier(model, batches, seed=args.seed, progress=progress)
        after = evaluate_classifier(result.model, batches, reference=before.predictions,
                                    seed=args.seed, progress=progress)
        evaluation = Evaluation.of_classifier(eval_data.source, len(eval_data), before, after,
                                                seed=args.seed)
        times["evaluation"] = time.perf_counter() - t

    data = {**sample_record(args, sample), **group.record()}
    return write_pruned(args, model, tokenizer, model_path, result, out_dir, config=config, data=data,
                        evaluation=evaluation, times=times, progress=progress)


def _evaluation_data(args, sample, progress, images: bool = False):
    """``--eval-data`` (``demo``: the demo's test split), else the demo's test split when ``--data``
    is the demo, else the scoring sample itself when it has labels, else None."""
    if getattr(args, "eval_data", None):
        return load_data(args, progress, "test", evaluation=True, images=images)
    if args.data == DEMO:
        from ..demos import classifier as demo
        return demo.load_demo_split("test")
    if args.data == DEMO_VISION:
        return load_images(DEMO_VISION, "test", args, progress)
    return sample if sample.has_labels else None


def cmd_evaluate(args) -> dict:
    from .. import data as D
    from ..evaluate import evaluate_classifier
    from ..models import fit_max_len, load_model
    progress = StderrProgress()
    model_path = resolve_model_path(args.model, progress)
    model, tokenizer = load_model(model_path)                 # refuses damaged and NaN checkpoints
    if is_causal_lm(model):
        return evaluate_lm_command(args, model, tokenizer, progress)
    args.max_len = fit_max_len(args.max_len, model.config, option="--max-len")   # before reading data
    if is_vision(model) or is_image_source(args.data):
        data = load_images(args.data, "test", args, progress, hub_split=args.split)
    else:
        data = demo_test(progress) if args.data == DEMO else D.load_text_data(
            args.data, text_column=args.text_column, text_pair_column=args.text_pair_column,
            label_column=args.label_column, split=args.split, config_name=args.data_config)
    check_image_data(data, model)
    if not data.has_labels:
        raise ValueError("evaluate needs labels: name the label column with --label-column")
    data = D.labels_for_model(data, model.config)      # the model's class ids, or a clear refusal
    batches = model_batches(data, tokenizer, model, args, progress=progress)
    result = evaluate_classifier(model, batches, seed=args.seed, progress=progress)
    return {"model": args.model, "data": data.source, "examples": len(data), **result.to_dict()}


def demo_test(progress):
    from ..demos import classifier as demo
    demo.prepare_demo(progress=progress)
    return demo.load_demo_split("test")


def cmd_export(args) -> dict:
    from ..export import PLAN_FILE, REPORT_FILE, save_pruned
    from ..models import load_model
    from ..plan import KeepPlan
    from ..report import PruneReport
    from ..export.saving import EXPORT_MARKERS
    out_dir = check_output(args, EXPORT_MARKERS)     # before any heavy work
    model, tokenizer = load_model(args.model)                 # refuses damaged and NaN checkpoints
    plan = _read_saved(Path(args.model) / PLAN_FILE, KeepPlan.from_json)
    report = _read_saved(Path(args.model) / REPORT_FILE,
                         lambda text: PruneReport.from_dict(json.loads(text)))
    export = save_pruned(model, out_dir, plan=plan, report=report, tokenizer=tokenizer,
                         formats=export_formats(args), overwrite=args.overwrite, progress=StderrProgress(),
                         protected=source_paths(args))
    return export.to_dict()


def _read_saved(path: Path, parse):
    """``parse(text)`` of a file a prune run saved beside the model, None when there is none; a damaged
    one is a ``ValueError`` naming it (its parser raises whatever malformed JSON leads it to)."""
    from ..errors import one_line
    if not path.exists():
        return None
    try:
        return parse(path.read_text())
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} is damaged ({type(err).__name__}: {one_line(err)}); delete it to export "
                         "without it, or prune the model again") from None


def cmd_finetune(args) -> dict:
    from ..demos.finetune import FINETUNE_MARKERS, FinetuneConfig, finetune
    out_dir = check_output(args, FINETUNE_MARKERS, "fine-tune output")     # before any heavy work
    progress = StderrProgress()
    train = load_data(args, progress, "train")
    eval_data = load_data(args, progress, "test", evaluation=True) if args.eval_data else None
    config = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                            max_len=args.max_len, seed=args.seed)
    return finetune(resolve_model_path(args.model, progress), train, out_dir, config,
                    eval_data=eval_data, progress=progress, overwrite=args.overwrite,
                    protected=source_paths(args))


def cmd_demo(args) -> dict:
    from ..demos import classifier as demo
    from ..demos import lm as demo_lm
    from ..demos import vision as demo_vision
    which = getattr(args, "which", "classifier")
    out: dict = {}
    if which in ("classifier", "all"):
        out["classifier"] = (demo.prepare_demo(progress=StderrProgress(), verify=True)
                             if args.action == "prepare" else demo.demo_status())
    if which in ("lm", "all"):
        out["lm"] = demo_lm.prepare_lm_demo(progress=StderrProgress()) if args.action == "prepare" else {
            "ready": demo_lm.lm_demo_ready(), "folder": str(demo_lm.lm_demo_dir()),
            "model_source": demo_lm.MODEL_SOURCE, "text_source": demo_lm.TEXT_SOURCE,
            "text_terms": demo_lm.TEXT_TERMS}
    if which in ("vision", "all"):
        out["vision"] = (demo_vision.prepare_vision_demo(progress=StderrProgress(), fetch_deb=_given_deb(args))
                         if args.action == "prepare" else demo_vision.info())
    return out[which] if which != "all" else out


def _given_deb(args):
    """``--deb PATH``: a downloaded Fashion-MNIST package instead of ``apt-get download``."""
    if not getattr(args, "deb", None):
        return None
    path = Path(args.deb)
    if not path.is_file():
        raise ValueError(f"--deb {args.deb} is not a file")
    return lambda _folder: path


# --------------------------------------------------------------------------- parser

class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error convention: one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    """A positive, finite number: 0 is refused, not taken as "not given" (``--seq-len 0``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _whole_number(text: str, low: int, high: int | None, wanted: str) -> int:
    """``text`` as a whole number in [low, high] (high None: no upper bound), else argparse's error."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
    return value


def _seed(text: str) -> int:
    """A seed numpy and torch both take."""
    return _whole_number(text, 0, 2**32 - 1, f"a whole number from 0 to {2**32 - 1}")


def _count(text: str) -> int:
    return _whole_number(text, 0, None, "a whole number of at least 0")


def _check_format_option(args) -> None:
    """``--format`` refused at the door (it was checked only when saving, after all the work)."""
    if getattr(args, "format", None) is None:
        return
    from ..export.saving import check_formats
    try:
        check_formats([f for f in args.format.split(",") if f.strip()])
    except ValueError as err:
        raise ValueError(f"--format {args.format!r}: {err}") from None


def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required,
                   help="'demo', a CSV/TSV/JSON/JSONL/Parquet/TXT file, or a hub dataset name; image models: "
                        "'demo-vision', an image folder, a table of image paths, a save_to_disk folder "
                        "or a hub image dataset")
    p.add_argument("--text-column", help="column holding the text (default: text or sentence)")
    p.add_argument("--image-column", help="image models: column holding image paths (default: image, "
                                          "image_path, path, file or filename), or a Hugging Face "
                                          "dataset's image column (default: its datasets.Image column)")
    p.add_argument("--text-pair-column", help="second text column for pair tasks (MRPC, QNLI, MNLI)")
    p.add_argument("--label-column", help="column holding labels (enables accuracy, label methods)")
    p.add_argument("--split", help="split of a hub dataset or a saved DatasetDict (e.g. train, validation)")
    p.add_argument("--data-config", help="config of a hub dataset (e.g. sst2 for glue)")
    p.add_argument("--max-len", type=_positive_int,
                   help="truncate texts to this many tokens (default 128, or the model's positions when "
                        "fewer; more than its positions is refused)")
    p.add_argument("--batch-size", type=_positive_int, default=32,
                   help="sequences per forward pass (language models: blocks, at most 4)")
    p.add_argument("--block-size", type=_positive_int, default=256,
                   help="language models: tokens per block (calibration and evaluation text)")
    p.add_argument("--eval-blocks", type=_positive_int, default=32,
                   help="language models: held-out blocks to measure perplexity on")
    p.add_argument("--seed", type=_seed, default=0)


def build_parser() -> argparse.ArgumentParser:
    from ..methods import METHODS
    from ..methods import DEFAULT_LM_METHOD, DEFAULT_METHOD, DEFAULT_VISION_METHOD
    from ..repair import REPAIRS, TARGETS
    from ..select import ALLOCATIONS
    parser = _Parser(prog="python -m kcm_core", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("flops", help="per-block cost of a model (needs only its config.json)")
    p.add_argument("--model", required=True, help="folder with config.json, a hub id, or 'demo'")
    p.add_argument("--seq-len", type=_positive_float,
                   help="tokens per sequence (default 128; ViT: patches + 1)")
    p.add_argument("--flops", type=float, help="relative FLOPs budget: also report the kept-neuron count")
    p.add_argument("--json", dest="json_out", help="also write the JSON to this file")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("prune", help="score, select, scale, slice and save a pruned model")
    p.add_argument("--model", required=True, help="model folder, hub id, or 'demo'")
    _add_data_args(p)
    p.add_argument("--flops", type=float, required=True, help="fraction of FLOPs to keep, e.g. 0.6")
    p.add_argument("--method", default=None, choices=list(METHODS),
                   help=f"which neurons to keep (default: {DEFAULT_METHOD}, the paper's exact KCM, for a "
                        f"text classifier; {DEFAULT_LM_METHOD} for a causal language model; "
                        f"{DEFAULT_VISION_METHOD} for an image classifier)")
    p.add_argument("--repair", default="auto", choices=["auto", *REPAIRS],
                   help="how the kept neurons make up for the dropped ones (default: the method's own)")
    p.add_argument("--repair-target", default="auto", choices=["auto", *TARGETS],
                   help="fit each layer to the unpruned model's output (teacher) or to the unpruned "
                        "layer on the pruned model's inputs (local); auto: the repair's own")
    p.add_argument("--refit-damp", type=_positive_float, default=1.0,
                   help="refit and obs repairs: ridge toward the original rows, relative to the mean of diag(H^T H)")
    p.add_argument("--allocation", default="auto", choices=["auto", *ALLOCATIONS],
                   help="how the budget is spread over layers: pooled raw scores (the paper), per-layer "
                        "z-scores, or curve (halfway to the counts that minimise the layers' refit error; "
                        "default: the method's own)")
    p.add_argument("--out", required=True, help="output folder (refused if it exists, see --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--samples", type=_positive_int, default=None,
                   help="unlabeled sequences to score with (default 512 texts or images; language models: calibration "
                        "blocks, default 32)")
    p.add_argument("--seq-len", type=_positive_float, help="sequence length for FLOPs (default: sample mean)")
    p.add_argument("--eval-data", help="labeled data for accuracy (default: demo test split, or --data)")
    p.add_argument("--eval-split", help="split of --eval-data when it is a hub dataset")
    p.add_argument("--multiple", type=_positive_int, default=1,
                   help="round kept widths to a multiple (8, 16, 64), at most the widest layer")
    p.add_argument("--min-per-layer", type=_count, default=0, help="neurons every layer keeps at least")
    p.add_argument("--uniform", action="store_true",
                   help="same width in every layer (stock from_pretrained can load the result)")
    p.add_argument("--sigma", type=float, default=1.0, help="R2 kernel bandwidth (see --sigma-mode)")
    p.add_argument("--sigma-mode", default="median", choices=["median", "fixed"],
                   help="median: sigma x median pairwise distance; fixed: sigma as given (paper: 1)")
    p.add_argument("--alpha", type=float, default=0.01, help="R2 stopping tolerance")
    p.add_argument("--stop-rule", "--r2-stop", default="auto", choices=list(STOP_RULES),
                   help="R2 stop rule: auto (default) is absolute up to 3072 neurons per layer and "
                        "closed_form above; absolute/signed change of C (alpha), the ranking's change "
                        "(spearman, topk; see --rank-tol), or closed_form: one step, O(N^2 d) "
                        "(docs/options.md)")
    p.add_argument("--rank-tol", type=float, default=1e-4,
                   help="spearman: stop when 1 - rho <= this; topk: when at most this share of the "
                        "top set changed between iterations")
    p.add_argument("--top-share", type=float, default=0.4, help="topk rule: share of neurons compared")
    p.add_argument("--max-iter", type=_positive_int, default=200, help="R2 iteration cap")
    p.add_argument("--d2-statistic", default="auto", choices=["auto", "mean", "mean_abs", "rms"],
                   help="auto: mean for ungated FFNs, mean_abs for gated MLPs (see docs/options.md)")
    p.add_argument("--d2-normalise", default="minmax", choices=["minmax", "zscore", "none"])
    p.add_argument("--ridge", type=float, default=1.0, help="scaling: pull toward scale 1")
    p.add_argument("--scale-samples", type=_positive_int, default=None,
                   help="sequences used by scaling (default 512; language models: blocks, default 8)")
    p.add_argument("--label-samples", type=_positive_int, default=512, help="labeled sequences for label methods")
    p.add_argument("--format", default="hf", help="comma list of export formats: hf, onnx")
    p.add_argument("--stream", action="store_true",
                   help="models larger than memory: read, prune and write one layer at a time from the "
                        "folder's safetensors files (same plan and output; label-free methods, hf format, "
                        "no evaluation of the pruned model)")
    p.add_argument("--json", dest="json_out", help="also write the report JSON to this file")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("evaluate", help="accuracy of a (pruned) model on labeled data")
    p.add_argument("--model", required=True, help="pruned folder, model folder, hub id, or 'demo'")
    _add_data_args(p)
    p.add_argument("--json", dest="json_out")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="re-export a pruned folder (e.g. add ONNX)")
    p.add_argument("--model", required=True, help="a folder written by prune")
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="hf,onnx", help="comma list: hf, onnx")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", dest="json_out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("finetune", help="fine-tune a classifier on labeled data")
    p.add_argument("--model", required=True)
    _add_data_args(p)
    p.add_argument("--eval-data", help="labeled data to report accuracy on")
    p.add_argument("--eval-split")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--epochs", type=_positive_int, default=2)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--json", dest="json_out")
    p.set_defaults(func=cmd_finetune, max_len=64)

    p = sub.add_parser("demo", help="the embedded demos: 'prepare' builds one, 'info' describes it")
    p.add_argument("action", choices=["prepare", "info"])
    p.add_argument("which", nargs="?", default="classifier", choices=["classifier", "lm", "vision", "all"],
                   help="classifier (MiniLM on sentence polarity; the default), lm (SmolLM2-135M on "
                        "movie reviews), vision (a DINOv2-S ViT on Fashion-MNIST) or all")
    p.add_argument("--deb", help="vision: a downloaded dataset-fashion-mnist .deb (else apt-get download)")
    p.add_argument("--json", dest="json_out")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code: 0, 2 for bad input (one line on stderr), 130 on Ctrl-C.

    Bad input, damaged or refused files, and a full or read-only disk (``clear_error_types``) become
    one line; any other exception is a bug and keeps its traceback.
    """
    from ..distributed import StoppedOnMain, launched
    from ..errors import clear_error_types, one_line
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:              # --help (0), or a bad option: _Parser printed one line
        return stop.code if isinstance(stop.code, int) else 2
    try:
        if args.command != "prune" and launched():
            raise ValueError(f"only prune runs under torchrun (or accelerate launch); run "
                             f"`python -m kcm_core {args.command} ...` in one process")
        _check_format_option(args)              # every option before anything is loaded
        result = args.func(args)
        if result is not None:                  # None: a rank other than 0 of a distributed prune
            json_out(result, getattr(args, "json_out", None))
    except StoppedOnMain:                       # rank 0 printed why
        return 2
    except clear_error_types() as err:
        rank = os.environ.get("RANK")               # set by torchrun: say which rank failed
        where = f" (rank {rank})" if rank not in (None, "0") else ""
        print(f"error{where}: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
