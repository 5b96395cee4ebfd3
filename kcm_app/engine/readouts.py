"""The readouts a slider move shows at once: select and count, no forward pass (milliseconds)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from kcm_core.arch import ffn_blocks
from kcm_core.flops import cost_report, count_params, keep_count, relative_flops
from kcm_core.methods import MethodScores
from kcm_core.pipeline import PruneConfig, make_plan
from kcm_core.plan import KeepPlan

from ..store import SharedStore
from .workspace import Workspace


@dataclass(frozen=True)
class Readout:
    """What the budget slider shows at once (no forward pass): plan, FLOPs, parameters."""

    budget: float
    plan: KeepPlan
    relative_flops: float
    neurons_kept: int
    neurons_total: int
    params_before: int
    params_after: int
    estimated_speedup: float     # the stack's MACs plus the LM head's, before over after (``estimated_speedup``)

    @property
    def neurons_pruned(self) -> float:
        return 1 - self.neurons_kept / self.neurons_total if self.neurons_total else 0.0

    @property
    def relative_params(self) -> float:
        return self.params_after / self.params_before


def params_per_neuron(model: nn.Module) -> list[int]:
    """Parameters one neuron owns in each layer: its up (and gate) row with bias, its down column."""
    out = []
    for block in ffn_blocks(model):
        n = block.width
        owned = block.up.weight.numel() + block.down.weight.numel()
        if getattr(block.up, "bias", None) is not None:
            owned += block.up.bias.numel()
        if block.gate is not None:
            owned += block.gate.weight.numel()
            if getattr(block.gate, "bias", None) is not None:
                owned += block.gate.bias.numel()
        out.append(owned // n if n else 0)
    return out


def model_params(ws: Workspace, store: SharedStore) -> tuple[int, tuple[int, ...]]:
    """(total parameters, parameters per neuron in each layer) of the shared model."""
    return store.get_or_compute(("params", ws.model_key), lambda: (
        count_params(ws.model).total, tuple(params_per_neuron(ws.model))))


def readout(ws: Workspace, scores: MethodScores, config: PruneConfig, store: SharedStore) -> Readout:
    """Select under ``config.budget`` and count; milliseconds, no model is run (on a model opened layer
    by layer too: the selection reads the skeleton's config alone). The plan is the selection alone:
    the repair (FLAP's bias shift, the scales) comes with the evaluation or the export, and changes no
    count."""
    plan = make_plan(ws.model, scores, config, ws.seq_len)
    total, per_neuron = model_params(ws, store)
    removed = sum((w - k) * p for w, k, p in zip(plan.widths, plan.kept_counts, per_neuron))
    rel = relative_flops(ws.shape, ws.seq_len, plan.kept_counts)
    return Readout(budget=config.budget, plan=plan, relative_flops=rel,
                   neurons_kept=plan.total_kept, neurons_total=sum(plan.widths),
                   params_before=total, params_after=total - removed,
                   estimated_speedup=estimated_speedup(ws, rel))


def estimated_speedup(ws: Workspace, rel: float) -> float:
    """1 / relative FLOPs for an encoder (its small task head is outside the count); for a causal LM the
    head (hidden x vocabulary per token, unpruned) is added to both sides, since it costs as much as
    several layers of a small LM (SmolLM2-135M: about 1.05x measured at 0.9, not 1.11x)."""
    if not ws.is_lm:
        return 1 / rel
    report = cost_report(ws.shape, ws.seq_len)
    dense, head = report.encoder_macs, report.head_macs
    return (dense + head) / (rel * dense + head)


def budget_for_pruned_fraction(ws: Workspace, fraction: float) -> float:
    """The relative FLOPs of a model with ``fraction`` of its FFN neurons removed (any layout)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction of neurons pruned must be in [0, 1], got {fraction}")
    widths = ws.widths
    kept_total = round(sum(widths) * (1 - fraction))
    # FLOPs depend only on the total kept count; spread it over the layers in any way.
    kept, left = [], kept_total
    for w in widths:
        kept.append(min(w, left))
        left -= kept[-1]
    return relative_flops(ws.shape, ws.seq_len, kept)


def neurons_for_budget(ws: Workspace, budget: float) -> int:
    return keep_count(ws.shape, ws.seq_len, budget)
