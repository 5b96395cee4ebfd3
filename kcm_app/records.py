"""The app's typed result of one evaluated budget, which the engine makes (``kcm_app.engine.evaluations``),
the shared store holds and the disk cache keeps (``kcm_app.disk_cache`` turns it into a file and back).

It lives apart from the engine so that the disk cache can name it without importing the engine (which
imports the disk cache). Its metrics are the library's own records: a classifier's ``Rate`` and a
language model's ``LMMetric`` (each a value, its 95% interval ``low``/``high`` and ``n``), never the
dicts their JSON forms are. No Streamlit here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kcm_core.evaluate import Rate
from kcm_core.lm import LMEval, LMMetric, PairedPerplexity
from kcm_core.methods import ScoreDetails
from kcm_core.plan import KeepPlan


@dataclass(frozen=True)
class BudgetResult:
    """A plan realised and evaluated: the accuracy readouts of the Prune page. Speed is measured
    separately (``engine.speed``), after these are on screen."""

    method: str
    budget: float
    seed: int                        # the method's seed (only random selection depends on it)
    plan: KeepPlan                   # with scales when the method scales
    relative_flops: float
    params_after: int
    accuracy: Rate | None            # a classifier with labels; None otherwise
    # a classifier: the same prediction as the unpruned model (Rate); an LM: the same top-1 next token (LMMetric)
    agreement: Rate | LMMetric | None
    seconds: dict[str, float]        # wall time of each stage of this evaluation
    details: ScoreDetails = ScoreDetails()   # how the method's scores were obtained
    # causal LMs only, on the held-out blocks (n counts blocks)
    perplexity: LMMetric | None = None
    kl: LMMetric | None = None       # mean KL(unpruned || pruned) per next token, in nats
    lm: LMEval | None = None         # the whole evaluation (per-block sums, for the report)
    paired: PairedPerplexity | None = None   # perplexity after / before on the same blocks
    predictions: torch.Tensor | None = None  # a classifier's predicted class per test example (paired comparisons)
