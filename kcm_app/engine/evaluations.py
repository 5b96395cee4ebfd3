"""The slow readouts: a plan realised (selected, scaled, sliced) and evaluated on the labeled test
data (a classifier: accuracy, agreement) or on held-out token blocks (a causal LM: perplexity,
agreement, KL against the unpruned model), stored per (method, hyper-parameters, budget); the method
comparison built from them; and greedy continuations of a prompt, unpruned and pruned."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from kcm_core.evaluate import ClassifierEval, evaluate_classifier
from kcm_core.lm import LMEval, evaluate_lm, generate, paired_perplexity
from kcm_core.flops import count_params, relative_flops
from kcm_core.methods import MethodScores
from kcm_core.pipeline import PruneConfig, Store, prune
from kcm_core.plan import KeepPlan
from kcm_core.realise import slice_model
from kcm_core.runtime import Batch, Progress, take_sequences, tell
from kcm_core.scaling import teacher_targets

from .. import disk_cache
from ..records import BudgetResult
from ..store import SharedStore
from .scoring import method_scores, neuron_stats, score_key
from .workspace import Workspace, not_streamed, private_copy

# How many sequences the scaling step fits on in the app (the CLI default is 512). Its cost grows with
# the token count times k^2 (float64 Gram matrices), so a small sample keeps a new budget quick; on the
# demo, 32, 64, 128 and 512 sequences gave the same accuracy within the 95% intervals at 50% and 60%
# of FLOPs (weight magnitude + scale, 800 test sentences). Shown on the Prune page.
APP_SCALE_SAMPLES = 64
# A causal LM scales on its first 4 calibration blocks of 256 tokens (1,024 tokens; the CLI uses 8):
# on the 135M LM demo the scaling fit dominates a new budget (kcm_app.sources sizes the rest).
APP_LM_SCALE_BLOCKS = 4

# The generation panel: greedy continuations of this many new tokens, the same for both models.
GENERATION_TOKENS = 30
DEFAULT_PROMPT = "The movie was"

# Random selection is drawn with this many seeds (the sidebar's seed and the next ones) in the
# comparison, so its line shows the spread between draws rather than one lucky or unlucky draw.
RANDOM_SEEDS = 3


def scale_samples(ws: Workspace) -> int:
    """Sequences (a classifier) or blocks (a causal LM) the app fits scales on."""
    return APP_LM_SCALE_BLOCKS if ws.is_lm else APP_SCALE_SAMPLES


def reference_lm(ws: Workspace, store: SharedStore, progress: Progress | None = None) -> LMEval:
    """The unpruned language model's perplexity on the held-out blocks (computed once)."""
    not_streamed(ws, "perplexity")
    if not ws.is_lm or ws.eval_batches is None:
        raise ValueError("perplexity needs a causal language model and its held-out blocks")
    return store.get_or_compute(("dense-lm", ws.model_key, ws.data_key),
                                lambda: evaluate_lm(ws.model, ws.eval_batches, seed=ws.info.seed,
                                                    progress=progress), progress)


def reference_run(ws: Workspace, store: SharedStore,
                  progress: Progress | None = None) -> tuple[ClassifierEval, float]:
    """The unpruned model on the evaluation data, and the wall time that took (seconds)."""
    not_streamed(ws, "accuracy")
    if ws.is_lm:
        raise ValueError("a language model has no accuracy: its unpruned measure is perplexity")
    if ws.eval_batches is None:
        raise ValueError("no labeled evaluation data: choose data with a label column to see accuracy")

    def evaluate():
        start = time.perf_counter()
        result = evaluate_classifier(ws.model, ws.eval_batches, progress=progress)
        return result, time.perf_counter() - start

    def compute():        # kept on disk: a restarted app reads the unpruned predictions at once
        return disk_cache.cached("dense", (ws.weights_hash, ws.data_key), evaluate,
                                 disk_cache.encode_reference, disk_cache.decode_reference)
    return store.get_or_compute(("dense", ws.model_key, ws.data_key), compute, progress)


def reference(ws: Workspace, store: SharedStore, progress: Progress | None = None) -> ClassifierEval:
    """The unpruned model's evaluation (its predictions are the agreement reference)."""
    return reference_run(ws, store, progress)[0]


def teacher(ws: Workspace, scale_samples: int | None, store: SharedStore,
            progress: Progress | None = None) -> tuple[list[Batch], list[torch.Tensor]]:
    """The scaling sample and the unpruned model's FFN outputs on it (computed once)."""
    batches = take_sequences(ws.unlabeled, scale_samples)

    def compute():
        return batches, teacher_targets(private_copy(ws.model), batches)
    return store.get_or_compute(("teacher", ws.model_key, ws.data_key, scale_samples), compute, progress)


def budget_key(ws: Workspace, config: PruneConfig) -> tuple:
    return ("budget",) + score_key(ws, config) + (
        round(config.budget, 6), config.scale, config.scale_samples, config.multiple,
        config.min_per_layer, config.uniform, config.resolved_repair, config.resolved_allocation)


def pipeline_store(ws: Workspace, config: PruneConfig, store: SharedStore,
                   progress: Progress | None = None) -> Store:
    """``kcm_core.pipeline.Store`` hooks into the shared store, under the keys the app has always used:
    the teacher's outputs on the repair sample (``teacher``, kept per sample size: a private copy runs
    them) and the activation statistics of the whole scoring sample (``neuron_stats``, kept on disk too),
    whose means FLAP's bias takes when the scores carry none."""
    return Store(teacher=lambda: teacher(ws, config.repair_samples, store, progress)[1],
                 means=lambda: list(neuron_stats(ws, store, progress).mean))


def scaled_plan(ws: Workspace, scores: MethodScores, config: PruneConfig, store: SharedStore,
                progress: Progress | None = None) -> KeepPlan:
    """Select, then repair as the configuration says: ``kcm_core.pipeline.prune`` up to the plan, at the
    workspace's sequence length, with what it reuses served from the shared store (the shared model is
    only read; ``evaluate_budget`` slices the plan in its own timed step)."""
    return prune(ws.model, replace(config, seq_len=ws.seq_len), ws.unlabeled, progress=progress,
                 method_scores=scores, store=pipeline_store(ws, config, store, progress), realise=False).plan


def evaluate_budget(ws: Workspace, config: PruneConfig, store: SharedStore,
                    progress: Progress | None = None) -> BudgetResult:
    """Plan, scale, slice and evaluate one budget; stored per (method, hyper-parameters, budget)."""
    not_streamed(ws, "evaluating a budget")
    def compute() -> BudgetResult:
        seconds: dict[str, float] = {}
        t = time.perf_counter()
        scores = method_scores(ws, config, store, progress)
        lm_dense = reference_lm(ws, store, progress) if ws.is_lm else None
        dense = reference(ws, store, progress) if ws.eval_batches is not None and not ws.is_lm else None
        seconds["scores"] = time.perf_counter() - t
        t = time.perf_counter()
        plan = scaled_plan(ws, scores, config, store, progress)
        seconds["select+scale"] = time.perf_counter() - t
        t = time.perf_counter()
        pruned = slice_model(ws.model, plan)
        seconds["slice"] = time.perf_counter() - t
        result = None
        if dense is not None:
            t = time.perf_counter()
            result = evaluate_classifier(pruned, ws.eval_batches, reference=dense.predictions,
                                         progress=progress)
            seconds["evaluate"] = time.perf_counter() - t
        lm_result = paired = None
        if lm_dense is not None:
            t = time.perf_counter()
            # the shared model is only read: a forward pass per block as the agreement/KL reference
            lm_result = evaluate_lm(pruned, ws.eval_batches, reference=ws.model, seed=ws.info.seed,
                                    progress=progress)
            paired = paired_perplexity(lm_result.stats, lm_dense.stats, seed=ws.info.seed)
            seconds["evaluate"] = time.perf_counter() - t
        return BudgetResult(
            method=config.method, budget=config.budget, seed=config.seed, plan=plan,
            relative_flops=relative_flops(ws.shape, ws.seq_len, plan.kept_counts),
            params_after=count_params(pruned).total,
            accuracy=result.accuracy if result else None,
            agreement=result.agreement if result else lm_result.agreement if lm_result else None,
            seconds=seconds, details=scores.details,
            perplexity=lm_result.perplexity if lm_result else None,
            kl=lm_result.kl if lm_result else None,
            lm=lm_result, paired=paired, predictions=result.predictions if result else None)
    def compute_or_read() -> BudgetResult:
        # kept on disk, keyed by the weights and everything the key names: a restarted app shows a
        # stored budget at once (an LM's with its per-block statistics, from which its metrics are rebuilt)
        parts = (ws.weights_hash, ws.data_key, ws.info.seed,
                 repr(tuple(p for p in budget_key(ws, config) if p != ws.model_key)))
        return disk_cache.cached("budget-lm" if ws.is_lm else "budget", parts, compute, disk_cache.encode_budget,
                                 lambda payload: disk_cache.decode_budget(payload, ws.info.seed))
    return store.get_or_compute(budget_key(ws, config), compute_or_read, progress)


def is_evaluated(ws: Workspace, config: PruneConfig, store: SharedStore) -> bool:
    return budget_key(ws, config) in store


def comparison_configs(methods: Sequence[str], budgets: Sequence[float], base: PruneConfig,
                       random_seeds: int = RANDOM_SEEDS) -> list[PruneConfig]:
    """Every (method, budget) pair to evaluate, method-major; random selection once per seed
    (``base.seed``, ``base.seed + 1``, ...)."""
    configs = []
    for name in methods:
        seeds = [base.seed + i for i in range(random_seeds)] if name == "random" else [base.seed]
        configs += [replace(base, method=name, budget=float(b), seed=s) for s in seeds for b in budgets]
    return configs


def comparison(ws: Workspace, methods: Sequence[str], budgets: Sequence[float], base: PruneConfig,
               store: SharedStore, progress: Progress | None = None,
               random_seeds: int = RANDOM_SEEDS) -> list[BudgetResult]:
    """Every configuration of ``comparison_configs`` evaluated (stored ones are reused), in order."""
    configs = comparison_configs(methods, budgets, base, random_seeds)
    results = []
    for i, config in enumerate(configs):
        label = config.spec.label + (f" (seed {config.seed})" if config.method == "random" else "")

        def step(message: str, fraction: float, i=i, label=label, budget=config.budget) -> None:
            tell(progress, f"{label} at {budget:.2f}: {message}", (i + fraction) / len(configs))
        results.append(evaluate_budget(ws, config, store, step))
    tell(progress, "comparison: done", 1.0)
    return results


@dataclass(frozen=True)
class Continuations:
    """Greedy continuations of one prompt by the unpruned and the pruned model, and their speed:
    both timed one after the other on this machine when the pruned one is made."""

    prompt: str
    dense: str
    pruned: str
    new_tokens: int
    dense_tokens_per_s: float = 0.0
    pruned_tokens_per_s: float = 0.0


def generation_key(ws: Workspace, config: PruneConfig, prompt: str,
                   new_tokens: int = GENERATION_TOKENS) -> tuple:
    return ("generate",) + budget_key(ws, config) + (prompt, new_tokens)


def timed_generation(model, tokenizer, prompt: str, new_tokens: int,
                     progress: Progress | None = None) -> tuple[str, float]:
    """(continuation, tokens per second): the new tokens (counted by re-tokenising the continuation,
    which stops early at an end-of-text token) over the wall time of the greedy generation.
    ``progress`` hears of every new token (and may stop the generation there by raising)."""
    start = time.perf_counter()
    text = generate(model, tokenizer, prompt, new_tokens, progress)
    seconds = time.perf_counter() - start
    tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return text, tokens / seconds if seconds > 0 else 0.0


def is_generated(ws: Workspace, config: PruneConfig, prompt: str, store: SharedStore,
                 new_tokens: int = GENERATION_TOKENS) -> bool:
    return generation_key(ws, config, prompt, new_tokens) in store


def continuations(ws: Workspace, config: PruneConfig, prompt: str, store: SharedStore,
                  new_tokens: int = GENERATION_TOKENS, progress: Progress | None = None) -> Continuations:
    """The unpruned and the pruned (the plan of ``config``, sliced again from the shared model)
    continuations of ``prompt``, each with its tokens per second; stored per (prompt, plan).
    ``progress`` hears of every new token of either model; a callback that raises (an abandoned job)
    stops the generation between two tokens, and nothing is stored."""
    if not ws.is_lm:
        raise ValueError("text generation needs a causal language model")
    not_streamed(ws, "text generation")
    if not prompt.strip():
        raise ValueError("the prompt is empty; type a few words to continue")

    def compute() -> Continuations:
        plan = evaluate_budget(ws, config, store, progress).plan
        pruned = slice_model(ws.model, plan)          # a new model; the shared one is only read

        def half(which: str, offset: float) -> Progress:
            return lambda message, fraction: tell(progress, f"{which}: {message}", offset + fraction / 2)
        dense_text, dense_rate = timed_generation(ws.model, ws.tokenizer, prompt, new_tokens,
                                                  half("unpruned", 0.0))
        pruned_text, pruned_rate = timed_generation(pruned, ws.tokenizer, prompt, new_tokens,
                                                    half("pruned", 0.5))
        return Continuations(prompt, dense_text, pruned_text, new_tokens, dense_rate, pruned_rate)
    return store.get_or_compute(generation_key(ws, config, prompt, new_tokens), compute, progress)
