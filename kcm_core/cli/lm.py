"""The command line's causal-language-model path: text becomes token blocks, accuracy becomes
perplexity, agreement and KL against the unpruned model (``kcm_core.lm``).

``prune`` and ``evaluate`` send a model whose config names a causal-LM class here. ``--samples`` counts
calibration blocks of ``--block-size`` tokens, ``--eval-blocks`` the held-out blocks. ``demo-lm``
stands for the LM demo's model or documents (calibration documents to score with, held-out ones to
evaluate on); other sources are split by document in half when no ``--eval-data`` is given.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from ..distributed import SINGLE, Group
from ..methods import DEFAULT_LM_METHOD
from .common import DEMO_LM, write_pruned

CALIBRATION_BLOCKS = 32        # --samples default for language models: 8,192 tokens at block size 256
MAX_BATCH = 4
LM_SCALE_BLOCKS = 8            # --scale-samples default for language models: the first 8 calibration blocks


def is_causal_lm(model) -> bool:
    from ..arch import model_shape
    return model_shape(model.config).head == "lm"


def documents(args, progress, *, evaluation: bool):
    """Calibration (or evaluation) documents named by ``--data`` (``--eval-data``)."""
    from .. import data as D
    source = args.eval_data if evaluation else args.data
    check_lm_options(args, source)
    if source == DEMO_LM:
        from ..demos import lm as demo_lm
        demo_lm.prepare_lm_demo(progress=progress)
        return demo_lm.load_lm_split("evaluation" if evaluation else "calibration")
    return D.load_text_data(source, text_column=args.text_column,
                            split=args.eval_split if evaluation else args.split,
                            config_name=args.data_config)


def same_source(a, b) -> bool:
    """Whether two ``--data`` values name the same text: equal, or paths to the same file."""
    if not a or not b:
        return False
    if str(a) == str(b):
        return True
    first, second = Path(str(a)).expanduser(), Path(str(b)).expanduser()
    return first.exists() and second.exists() and first.resolve() == second.resolve()


def check_lm_options(args, source) -> None:
    """Options a language model's text cannot use are refused, not silently ignored."""
    if getattr(args, "label_column", None):
        raise ValueError(f"--label-column {args.label_column!r} does not apply to a language model: it reads "
                         "text only (perplexity needs no labels); drop the option")
    if getattr(args, "text_pair_column", None):
        raise ValueError("--text-pair-column does not apply to a language model: it reads one text column")
    if getattr(args, "text_column", None) and str(source).lower().endswith(".txt"):
        raise ValueError(f"--text-column {args.text_column!r} does not apply to {source}: a .txt file has no "
                         "columns (one document per line); drop the option")


def blocks(args, model, tokenizer, progress, notes: dict | None = None):
    """(calibration blocks, evaluation blocks), disjoint by document. ``notes["held_out"]`` (when given)
    says which documents the evaluation blocks come from. An ``--eval-data`` naming the ``--data``
    source (and split) is split like no ``--eval-data``: never measured on the calibration text."""
    from ..lm import check_block_size, check_token_ids, split_blocks
    check_block_size(model.config, args.block_size)
    calibration = documents(args, progress, evaluation=False)
    eval_data = getattr(args, "eval_data", None)
    if eval_data and same_source(eval_data, args.data) and args.eval_split == args.split:
        eval_data = None
    if eval_data:
        evaluation = documents(args, progress, evaluation=True)
        held_out = f"{eval_data}, a separate source"
    elif args.data == DEMO_LM:
        from ..demos import lm as demo_lm
        evaluation = demo_lm.load_lm_split("evaluation")
        held_out = "the LM demo's evaluation documents"
    else:
        evaluation = calibration                 # split_blocks halves it by document
        half = len(calibration) // 2
        held_out = (f"documents {half + 1}-{len(calibration)} of {len(calibration)} of {args.data} (the "
                    f"first {half} calibrate)")
    if notes is not None:
        notes["held_out"] = held_out
    cal, ev = split_blocks(calibration, evaluation, tokenizer, args.block_size,
                           calibration_blocks=args.samples or CALIBRATION_BLOCKS,
                           evaluation_blocks=args.eval_blocks, batch_size=lm_batch_size(args))
    check_token_ids(cal + ev, model.config)
    return cal, ev


def blocks_record(args, calibration) -> dict:
    """The report's ``data`` for a causal LM: the calibration blocks and where they came from."""
    return {"source": args.data, "samples": sum(int(b["input_ids"].shape[0]) for b in calibration),
            "max_len": args.block_size, "seed": args.seed, "unit": "blocks"}


def lm_batch_size(args) -> int:
    """Blocks per forward pass: at most 4, since a batch's logits take B x block x vocabulary floats
    (4 x 256 x 49,152 x 4 bytes = 200 MB for the LM demo)."""
    return max(1, min(args.batch_size, MAX_BATCH))


def prune_lm(args, config, model, tokenizer, model_path: str, out_dir: Path | None, times: dict, progress, *,
             group: Group = SINGLE) -> dict | None:
    """``prune`` for a causal LM: calibrate on blocks, evaluate perplexity before and after, save.
    Under a distributed ``group`` the ranks share the calibration; rank 0 alone evaluates and saves
    (the other ranks return None)."""
    from ..lm import evaluate_lm, paired_perplexity
    from ..pipeline import prune
    from ..report import Evaluation

    spec = config.spec
    if spec.uses_labels:
        raise ValueError(f"method {spec.name!r} needs labeled data, which a language model's text does "
                         "not have; choose a label-free method (kcm, wanda-sp, flap, ...)")
    notes: dict = {}
    calibration, evaluation_blocks = group.main_first(lambda: blocks(args, model, tokenizer, progress, notes))
    result = prune(model, config, calibration, None, progress, group=group)
    if not group.is_main:
        return None
    times.update(result.seconds)
    t = time.perf_counter()
    before = evaluate_lm(model, evaluation_blocks, seed=args.seed, progress=progress)
    after = evaluate_lm(result.model, evaluation_blocks, reference=model, seed=args.seed, progress=progress)
    evaluation = Evaluation.of_lm(f"held-out blocks of {args.block_size} tokens from {notes['held_out']}",
                                  before, after, paired_perplexity(after.stats, before.stats, seed=args.seed))
    times["evaluation"] = time.perf_counter() - t
    data = {**blocks_record(args, calibration), **group.record()}
    return write_pruned(args, model, tokenizer, model_path, result, out_dir, config=config, data=data,
                        evaluation=evaluation, times=times, progress=progress)


def evaluate_lm_command(args, model, tokenizer, progress) -> dict:
    """``evaluate`` for a causal LM: perplexity on the held-out blocks."""
    from ..lm import blocks_of, check_block_size, check_token_ids, evaluate_lm, token_stream
    check_block_size(model.config, args.block_size)
    if args.data == DEMO_LM:
        from ..demos import lm as demo_lm
        demo_lm.prepare_lm_demo(progress=progress)
        docs = demo_lm.load_lm_split("evaluation")
    else:
        docs = documents(args, progress, evaluation=False)
    held_out = {}
    calibrated = calibrated_documents(args, docs, tokenizer)
    if calibrated:                       # never measure on the text the prune that wrote --model saw
        if calibrated >= len(docs):
            raise ValueError(f"the prune that wrote {args.model} calibrated on every document of {args.data}; "
                             "evaluate it on other text (its perplexity there would not be held out)")
        held_out = {"held_out": f"documents {calibrated + 1}-{len(docs)} of {len(docs)} (the prune that wrote "
                                f"this model calibrated on the first {calibrated})"}
        docs = docs.subset(range(calibrated, len(docs)))
    batches = blocks_of(token_stream(docs, tokenizer), args.block_size, lm_batch_size(args), args.eval_blocks)
    check_token_ids(batches, model.config)
    result = evaluate_lm(model, batches, seed=args.seed, progress=progress)
    return {"model": args.model, "data": docs.source, **held_out, "blocks": result.perplexity.n,
            "block_size": args.block_size, **result.to_dict()}


def lm_config(config, args):
    """A causal LM's configuration: its default method unless one was named, and its scaling sample."""
    if args.method is None:
        config = replace(config, method=DEFAULT_LM_METHOD)
    return replace(config, scale_samples=args.scale_samples or LM_SCALE_BLOCKS)


def calibrated_documents(args, docs, tokenizer) -> int:
    """How many of ``docs``, from the first, the prune that wrote ``--model`` calibrated on (its report,
    ``kcm_report.json``, names the data, the blocks and their size); 0 when it calibrated on other text."""
    import json

    from ..export import REPORT_FILE
    try:
        data = json.loads((Path(args.model) / REPORT_FILE).read_text()).get("data", {})
        budget = int(data["samples"]) * int(data["max_len"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0
    if data.get("unit") != "blocks" or not same_source(data.get("source"), args.data):
        return 0
    eos = getattr(tokenizer, "eos_token_id", None)
    used = 0
    for i, text in enumerate(docs.texts):     # calibration read the first `budget` tokens of this stream
        if used >= budget:
            return i
        used += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + (eos is not None)
    return len(docs)
