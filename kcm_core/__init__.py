"""kcm_core: Kernelized Convex Masking (Nova, Dai, Schuurmans, ICML 2023) as a plain library.

Score FFN neurons (R2 from the weights, D2 from unlabeled activations, and baselines), select the best
under a FLOPs budget into a ``KeepPlan``, fit label-free scales, and realise the plan by masking a copy
or slicing into smaller layers. No Streamlit, no printing, no downloads inside library calls.
"""
from .arch import FAMILIES, SUPPORTED_MODEL_TYPES, ffn_blocks, model_shape
from .export import ExportResult, load_pruned, save_pruned
from .flops import cost_report, count_params, keep_count, relative_flops
from .hull import HullConfig, kernel_hull, r2_scores
from .methods import METHODS, Method, MethodScores, method
from .pipeline import PruneConfig, compute_scores, make_plan, prune
from .plan import KeepPlan, LayerKeep, PlanInfo
from .realise import mask_copy, slice_model
from .scaling import ScaleConfig, fit_scales
from .scores import D2Config
from .select import select

__all__ = [
    "FAMILIES", "SUPPORTED_MODEL_TYPES", "ffn_blocks", "model_shape", "cost_report", "count_params",
    "keep_count", "relative_flops", "HullConfig", "kernel_hull", "r2_scores", "METHODS",
    "Method", "method", "MethodScores", "PruneConfig", "compute_scores", "make_plan", "prune", "KeepPlan", "LayerKeep", "PlanInfo",
    "mask_copy", "slice_model", "ScaleConfig", "fit_scales", "D2Config", "select",
    "ExportResult", "load_pruned", "save_pruned",
]
