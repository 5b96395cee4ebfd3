"""The app's calls into ``kcm_core``, each result stored once for all sessions. No Streamlit here.

- ``workspace``: the loaded model and data (``Workspace``) and the private-copy rule;
- ``scoring``: neuron scores per method, from shared components;
- ``readouts``: what a slider move shows at once (plan, FLOPs, parameters; no forward pass);
- ``evaluations``: a plan scaled, sliced and evaluated (accuracy, agreement; for a causal LM
  perplexity, agreement, KL) into a ``BudgetResult`` (``kcm_app.records``: typed, encoded for the
  disk only by ``kcm_app.disk_cache``), the comparison, and greedy continuations (unpruned and pruned);
- ``speed``: the sliced plan timed against the unpruned model;
- ``projections``: PCA and UMAP of a layer's down-projection rows (UMAP also kept on disk).

Isolation rules (STYLE habit 6), applied in these modules:
- the shared model (``Workspace.model``) is only *read*: forward passes, ``slice_model``,
  ``mask_copy`` and ``fit_scales`` (which work on copies they make themselves);
- every core call that registers hooks (activation statistics, gradients, teacher targets, timing)
  gets a private ``copy.deepcopy`` of the model, so a hook can never fire in another session's
  forward pass;
- every result goes into a ``SharedStore`` under a key of hashable ids (model id, data fingerprint,
  method, hyper-parameters, budget) and is never mutated afterwards; sessions differ only in which
  keys they ask for, so two browsers never see each other's numbers.
"""
from ..records import BudgetResult
from .evaluations import (APP_LM_SCALE_BLOCKS, APP_SCALE_SAMPLES, DEFAULT_PROMPT, GENERATION_TOKENS,
                          RANDOM_SEEDS, Continuations, budget_key, comparison,
                          comparison_configs, continuations, evaluate_budget, generation_key,
                          is_evaluated, is_generated, reference, reference_lm, reference_run, scale_samples,
                          scaled_plan, teacher)
from .projections import layer_pca, layer_points, layer_umap, umap_key
from .readouts import (Readout, budget_for_pruned_fraction, model_params, neurons_for_budget,
                       params_per_neuron, readout)
from .scoring import component_key, gradient_scores, method_scores, neuron_stats, r2_fits, score_key
from .speed import (LM_TIMING_BATCH, TIMING_BATCH, TIMING_REPEATS, SpeedResult, is_timed, measure_speed,
                    paired_seconds, speed_key, timing_batch)
from .workspace import Workspace, WorkspaceInfo, not_streamed, private_copy, skeleton

__all__ = [
    "APP_LM_SCALE_BLOCKS", "APP_SCALE_SAMPLES", "DEFAULT_PROMPT", "GENERATION_TOKENS", "RANDOM_SEEDS",
    "LM_TIMING_BATCH", "TIMING_BATCH", "TIMING_REPEATS",
    "BudgetResult", "Continuations", "Readout", "SpeedResult", "Workspace", "WorkspaceInfo",
    "budget_for_pruned_fraction", "budget_key", "comparison", "comparison_configs", "continuations", "evaluate_budget", "generation_key",
    "gradient_scores", "is_evaluated", "is_generated", "is_timed", "measure_speed", "method_scores", "model_params",
    "neuron_stats", "neurons_for_budget", "paired_seconds", "params_per_neuron", "private_copy",
    "r2_fits", "readout", "reference", "reference_lm", "reference_run", "scale_samples", "scaled_plan", "score_key", "component_key", "speed_key", "teacher",
    "timing_batch", "layer_pca", "layer_points", "layer_umap", "umap_key", "not_streamed", "skeleton",
]
