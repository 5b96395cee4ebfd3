"""Repair: what the kept neurons of a pruned layer do to make up for the dropped ones.

Every repair is label-free, gradient-free and closed form, fitted layer by layer on unlabeled
calibration tokens. For one FFN layer with ``H`` the kept neurons' inputs to the down-projection
(tokens x k) and ``W`` their down-projection rows (k x d), the repaired layer outputs ``H W' + b``:

- ``none``: ``W' = W``, no bias;
- ``bias``: ``W' = W`` plus a bias: the dropped neurons' mean output (FLAP's compensation);
- ``scales``: ``W' = diag(s) W``, one scale per kept neuron, ridge toward ``s = 1`` (Kwon et al.);
- ``scales+bias``: the same least-squares problem with an intercept (activations and targets centred
  by their token means, scales solved, then the bias);
- ``refit``: every kept row of the down-projection refitted, ``W'`` = the ridge solution of
  ``min ||H W' + b - T||^2 + damp * ||W' - W||^2`` (a k x k system with d right-hand sides, as the
  reconstruction step of ZipLM, SlimGPT and OSSCAR), plus the intercept ``b``;
- ``obs``: the layer keeps as many neurons as the selection gave it, but *which* ones is decided
  again by the least-squares problem itself, then ``refit``. Starting from all ``N`` neurons, the one
  whose removal raises ``||H W' + b - H_full W_full||^2`` least (once the others are refitted:
  ``||w_i||^2 / [G^-1]_ii`` with ``G`` the centred, damped ``H^T H``) is dropped, the others' rows are
  updated, and so on (the structured Optimal Brain Surgeon step of ZipLM and SlimGPT). Local target
  only: the greedy cost is exact for it. The method's score still decides how many neurons each layer
  keeps (the allocation), so the FLOPs are the selection's to the neuron.

The target ``T`` is either the **teacher** (the unpruned model's FFN output on the unpruned model's own
inputs, so each layer also tries to undo earlier layers' damage; the paper's and Kwon's choice) or
**local** (the unpruned layer's output on the pruned model's inputs: ``T = H_full W_full``, each layer
made as close as it can be to what it was, given what now reaches it). Layers are fitted in order and
each layer sees the already-repaired layers in front of it.

Only ``H^T H`` (k x k), ``H^T T`` (k x d) and the token sums are accumulated; a tokens x k x d tensor
is never built. ``scales`` against the teacher is ``kcm_core.scaling.fit_scales`` (the paper's step),
``bias`` against the teacher is ``kcm_core.compensation.compensate`` (FLAP's, from the unpruned
model's mean activations); every other combination runs ``fit_repair`` here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .arch import FFNBlock, ffn_blocks, transformer_layers
from .compensation import can_carry_bias, check_compensable
from .distributed import SINGLE, Group
from .layer_replay import StopForward, record_layer_output, run_layer
from .plan import KeepPlan
from .realise import mask_copy, shift_bias
from .runtime import Batch, Progress, model_device, tell, token_mask

REPAIRS = ("none", "bias", "scales", "scales+bias", "refit", "obs")
# the obs repair's removals per layer are spread over at most this many rounds (least_squares_keep)
OBS_STEPS = 64
TARGETS = ("teacher", "local")


@dataclass(frozen=True)
class RepairConfig:
    """How the kept neurons are repaired after selection.

    kind: one of ``REPAIRS``, or "auto": the method's own (its row in ``kcm_core.methods``).
    target: "teacher" (the unpruned model's output) or "local" (the unpruned layer on the pruned
        model's inputs); "auto": local for ``refit``, ``scales+bias`` and a re-targeted bias, teacher
        for ``scales`` (the paper's step) and FLAP's ``bias``.
    damp: ``refit``'s (and ``obs``'s) ridge toward the original rows, relative to the mean diagonal of ``H^T H``.
        SparseGPT and SlimGPT damp by 1% of it on hundreds of thousands of tokens; on the LM demo's 8,192
        calibration tokens 0.01 overfits (FLAP's score + refit at 0.9: perplexity 76.2 with 0.01, 74.3
        with 1, 74.7 with 4; 8 held-out blocks, benchmarks/results/repair_probe.log), so the default is 1.
    """

    kind: str = "auto"
    target: str = "auto"
    damp: float = 1.0

    def __post_init__(self):
        if self.kind not in ("auto",) + REPAIRS:
            raise ValueError(f"repair must be auto or one of {', '.join(REPAIRS)}, got {self.kind!r}")
        if self.target not in ("auto",) + TARGETS:
            raise ValueError(f"repair target must be auto, teacher or local, got {self.target!r}")
        if not (isinstance(self.damp, (int, float)) and self.damp > 0):
            raise ValueError(f"refit damp must be > 0, got {self.damp!r}")
        if self.kind == "obs" and self.target == "teacher":
            raise ValueError("the obs repair re-chooses neurons by the local least-squares error: its target "
                             "is local (use --repair-target local or auto)")

    def resolved(self, own_kind: str) -> "RepairConfig":
        """``auto`` fields made concrete; ``own_kind`` is the method's own repair."""
        kind = own_kind if self.kind == "auto" else self.kind
        target = self.target
        if target == "auto":
            target = "teacher" if kind in ("none", "bias", "scales") else "local"
        return RepairConfig(kind, target, self.damp)

    @property
    def label(self) -> str:
        if self.kind == "none":
            return "none"
        return f"{self.kind} ({self.target} target)"

    @property
    def step(self) -> str:
        """Which code runs this (resolved) repair, in memory (``kcm_core.pipeline.repair_plan``) and layer
        by layer (``kcm_core.streamed``) alike: "none"; "compensate", FLAP's bias against the teacher
        (``kcm_core.compensation``, from the unpruned model's mean inputs); "scales", the paper's scaling
        against the teacher (``kcm_core.scaling``); "fit", every other combination (``fit_repair``)."""
        if "auto" in (self.kind, self.target):
            raise ValueError(f"resolve the repair before running it, got {self}")
        if self.kind == "none":
            return "none"
        if self.target == "teacher" and self.kind in ("bias", "scales"):
            return "compensate" if self.kind == "bias" else "scales"
        return "fit"

    @property
    def needs_teacher(self) -> bool:
        """Whether the step fits on the unpruned model's FFN outputs (``scaling.teacher_targets``)."""
        return self.step in ("scales", "fit") and self.target == "teacher"

    def plan_info(self) -> dict[str, str | None]:
        """What a repaired plan records of its repair (``PlanInfo.repair``, ``repair_target``)."""
        return dict(repair=self.kind, repair_target=None if self.kind == "none" else self.target)


@dataclass
class _LayerSums:
    """Sufficient statistics of one layer's least-squares problem, summed over tokens (float64)."""

    gram: torch.Tensor        # (k, k)  H^T H
    cross: torch.Tensor       # (k, d)  H^T T
    h_sum: torch.Tensor       # (k,)
    t_sum: torch.Tensor       # (d,)
    t_sq: torch.Tensor        # ()      sum of T^2
    tokens: int = 0

    def restricted(self, keep: list[int]) -> "_LayerSums":
        """The sums of the problem over the ``keep`` neurons only, from every neuron's (local target:
        the target does not depend on which neurons are kept)."""
        idx = torch.tensor(keep, dtype=torch.long, device=self.gram.device)
        return _LayerSums(self.gram[idx][:, idx], self.cross[idx], self.h_sum[idx], self.t_sum, self.t_sq,
                          self.tokens)

    def error(self, rows: torch.Tensor, bias: torch.Tensor | None) -> float:
        """The relative error ``||H rows + bias - T|| / ||T||`` over the summed tokens, from the sums
        alone (what the layer leaves in its output; ``rows = W`` and no bias: before any repair)."""
        sq = self.t_sq - 2 * (rows * self.cross).sum() + (rows * (self.gram @ rows)).sum()
        if bias is not None:
            sq = sq + 2 * bias @ (self.h_sum @ rows) - 2 * bias @ self.t_sum + self.tokens * bias @ bias
        return float(sq.clamp_min(0).sqrt() / self.t_sq.clamp_min(1e-30).sqrt())


def fit_repair(model: nn.Module, plan: KeepPlan, batches: Sequence[Batch], config: RepairConfig,
               *, ridge: float = 1.0, bound: float = 10.0, progress: Progress | None = None,
               targets: list[torch.Tensor] | None = None, group: Group = SINGLE) -> KeepPlan:
    """``plan`` with each layer repaired by ``config`` (concrete: no ``auto``), fitted in layer order on
    ``batches``. ``targets`` (``kcm_core.scaling.teacher_targets``) are needed for the teacher target and
    computed when not given. ``ridge`` and ``bound`` are the scaling step's (``ScaleConfig``): a layer
    whose scales leave ``[-bound, bound]`` or whose solve fails keeps scales of 1 (recorded in
    ``plan.info.repair_failed_layers``). The caller's model is not modified."""
    if config.kind in ("auto", "none") or config.target == "auto":
        raise ValueError(f"fit_repair needs a concrete repair, got {config}")
    if config.kind in ("bias", "scales+bias"):
        check_compensable(model)                 # before any work
    batches = list(batches)
    if not batches:
        raise ValueError("the repair step needs unlabeled data: the sample is empty")
    if group.distributed:
        if targets is not None:
            raise ValueError("teacher targets cannot be passed in under torch.distributed")
        batches = list(group.share(batches))
    if config.target == "teacher" and targets is None:
        from .scaling import teacher_targets
        tell(progress, "repair: teacher outputs", 0.0)
        targets = teacher_targets(model, batches)
    # as on LLaMA, refit fits its intercept wherever stock code can load the bias: Mistral and Qwen2 are
    # then realised as LLaMA (kcm_core.bias_carrier); where no stock class can (a Mistral whose sliding
    # window is shorter than its positions) refit runs without it and the bias repairs are refused
    intercept = can_carry_bias(model)
    student = mask_copy(model, plan.without_repair())
    blocks = ffn_blocks(student)
    original_blocks = ffn_blocks(model)      # each layer's unpruned rows are read when it is fitted
    _, layers = transformer_layers(student)
    new_layers, failed, errors, keeps, swapped = [], [], [], [], []
    recorded: list | None = None
    for li, (block, layer) in enumerate(zip(blocks, plan.layers)):
        tell(progress, f"repair ({config.kind}): layer {li + 1}/{len(blocks)}", li / len(blocks))
        keep = list(layer.keep_idx)
        target = None if targets is None else targets[li]
        original = original_blocks[li].down_rows().detach().double()                # (N, d)
        if config.kind == "obs":            # every neuron's statistics, then the least-squares choice
            full = _summed(_accumulate(student, layers, li, block, list(range(original.shape[0])), original,
                                       batches, recorded, None), group)
            before = full.restricted(keep)
            chosen = least_squares_keep(full, original, len(keep), config.damp, intercept)
            swapped.append(len(set(keep) - set(chosen)))
            keep = chosen
            sums = full.restricted(keep)
        else:
            sums = before = _summed(_accumulate(student, layers, li, block, keep, original, batches, recorded,
                                                target), group)
        fitted, scales, bias, ok = solve_layer(config, sums, original[keep], ridge=ridge, bound=bound,
                                               intercept=intercept)
        if not ok:
            failed.append(li)
        errors.append([before.error(original[list(layer.keep_idx)].to(sums.gram.device), None),
                       sums.error(fitted.to(sums.gram.device), bias)])
        _write_layer(block, keep, fitted, bias)
        keeps.append(keep)
        new_layers.append((fitted.float().cpu() if config.kind in ("refit", "obs") else None,
                           None if scales is None else scales.cpu().tolist(),
                           None if bias is None else bias.cpu().tolist()))
        if li + 1 < len(blocks):
            recorded = record_layer_output(student, layers, li, batches, recorded)
    tell(progress, "repair: done", 1.0)
    if config.kind == "obs":
        plan = plan.with_keep(keeps)
    return plan.with_repair([r for r, _, _ in new_layers], [s for _, s, _ in new_layers],
                            [b for _, _, b in new_layers], repair=config.kind,
                            repair_target=config.target, repair_failed_layers=failed or None,
                            repair_intercept=intercept and config.kind != "scales", repair_errors=errors,
                            repair_swapped=swapped or None)


def _summed(sums: _LayerSums, group: Group) -> _LayerSums:
    """``sums`` added up over the ranks of ``group`` (unchanged on one process)."""
    count = torch.tensor([float(sums.tokens)], dtype=torch.float64, device=sums.gram.device)
    sq = sums.t_sq.reshape(1)
    group.sum_([sums.gram, sums.cross, sums.h_sum, sums.t_sum, sq, count])
    sums.t_sq, sums.tokens = sq[0], int(count[0])
    return sums


def least_squares_keep(sums: _LayerSums, w_full: torch.Tensor, k: int, damp: float, intercept: bool,
                       steps: int = OBS_STEPS) -> list[int]:
    """The ``k`` neurons (sorted) a layer keeps when neurons are dropped a few at a time, each time those
    whose removal (with the others' rows refitted) raises the local least-squares error least:
    ``cost_i = ||w_i||^2 / [G^-1]_ii``; the dropped set ``P`` then updates the rest,
    ``w -= G^-1[:, P] (G^-1[P, P])^-1 w_P``, and leaves ``G^-1`` (a rank-|P| update). ``sums`` are every
    neuron's (the local target's); ``G`` is their ``H^T H``, centred when the layer fits an intercept,
    damped like ``refit``. The ``N - k`` removals are spread over at most ``steps`` rounds (one neuron a
    round when there are fewer): removing one at a time is exact greedy but costs an ``N x N`` update
    per neuron. Ties go to the lower index."""
    n_neurons, n = w_full.shape[0], max(sums.tokens, 1)
    if k >= n_neurons:
        return list(range(n_neurons))
    gram = sums.gram.clone()
    if intercept:
        mean_h = sums.h_sum / n
        gram -= n * torch.outer(mean_h, mean_h)
    gram.diagonal().add_(damp * float(gram.diagonal().mean().clamp_min(1e-12)))
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(gram))
    w = w_full.to(gram.device, torch.float64).clone()
    alive = torch.ones(n_neurons, dtype=torch.bool, device=gram.device)
    left = n_neurons - k
    per_round = -(-left // max(1, steps))
    while left:
        take = min(per_round, left)
        cost = (w * w).sum(1) / inverse.diagonal().clamp_min(1e-30)
        cost[~alive] = float("inf")
        drop = torch.sort(torch.topk(cost, take, largest=False, sorted=True).indices).values
        columns = inverse[:, drop]                                                  # (N, |P|)
        block = torch.linalg.inv(columns[drop])                                     # (|P|, |P|)
        w -= columns @ (block @ w[drop])
        inverse -= columns @ block @ columns.t()
        alive[drop] = False
        left -= take
    return torch.nonzero(alive).flatten().tolist()


def _accumulate(student, layers, li: int, block: FFNBlock, keep: list[int], original: torch.Tensor,
                batches: list[Batch], recorded, target: torch.Tensor | None) -> _LayerSums:
    """Run the calibration tokens up to layer ``li``'s down-projection and sum its problem's statistics.
    ``target`` (tokens, d): the teacher's outputs; None: the local target ``H_full W_full``."""
    device = model_device(student)
    k, d = len(keep), original.shape[1]
    keep_t = torch.tensor(keep, dtype=torch.long, device=device)
    w_full = original.to(device=device, dtype=torch.float32)                     # (N, d)
    sums = _LayerSums(torch.zeros(k, k, dtype=torch.float64, device=device),
                      torch.zeros(k, d, dtype=torch.float64, device=device),
                      torch.zeros(k, dtype=torch.float64, device=device),
                      torch.zeros(d, dtype=torch.float64, device=device),
                      torch.zeros((), dtype=torch.float64, device=device))
    cursor = {"row": 0, "b": 0}

    def stop_hook(module):
        def hook(_module, args):
            h_all = args[0]                                                       # (B, T, N)
            mask = token_mask(batches[cursor["b"]], h_all.shape, h_all.device)
            cursor["b"] += 1
            h_all = h_all[mask].float()                                           # (tokens, N)
            if target is None:
                t = h_all @ w_full                                                # (tokens, d)
            else:
                t = target[cursor["row"]: cursor["row"] + h_all.shape[0]].to(device).float()
            cursor["row"] += h_all.shape[0]
            h = h_all[:, keep_t]                                                  # (tokens, k)
            sums.gram.add_((h.t() @ h).double())
            sums.cross.add_((h.t() @ t).double())
            sums.h_sum.add_(h.sum(0).double())
            sums.t_sum.add_(t.sum(0).double())
            sums.t_sq.add_(t.double().pow(2).sum())
            sums.tokens += h.shape[0]
            raise StopForward
        return module.register_forward_pre_hook(hook)

    run_layer(student, layers, li, batches, recorded, block.down, stop_hook)
    return sums


def solve_layer(config: RepairConfig, sums: _LayerSums, w_kept: torch.Tensor, *, ridge: float = 1.0,
                bound: float = 10.0, intercept: bool = True):
    """One layer's repair from its sums. ``w_kept``: the kept rows of the down-projection (k, d).
    Returns ``(rows, scales, bias, ok)``: the layer's new kept rows (k, d), its scales (k,) when the
    repair fits scales, the bias to add (d,) when it fits one, and whether the solve succeeded (else
    the rows stay as they were, with the bias fitted to them)."""
    kind, n = config.kind, max(sums.tokens, 1)
    w = w_kept.to(sums.gram.device, torch.float64)                               # (k, d)
    with_bias = kind in ("bias", "scales+bias") or (kind in ("refit", "obs") and intercept)
    gram, cross = sums.gram, sums.cross
    mean_h, mean_t = sums.h_sum / n, sums.t_sum / n
    if with_bias:       # centre: the intercept absorbs the means
        gram = gram - n * torch.outer(mean_h, mean_h)
        cross = cross - n * torch.outer(mean_h, mean_t)
    k = w.shape[0]
    scales = None
    ok = True
    if kind == "bias" or k == 0:
        fitted = w
    elif kind in ("scales", "scales+bias"):
        system = gram * (w @ w.t())                                               # (k, k)
        system.diagonal().add_(ridge)
        try:
            s = torch.linalg.solve(system, (cross * w).sum(1) + ridge)
        except RuntimeError:
            s = None
        if s is None or not torch.isfinite(s).all() or s.abs().max() > bound:
            s, ok = torch.ones(k, dtype=torch.float64, device=w.device), False
        scales = s
        fitted = w * s[:, None]
    else:               # refit, obs
        damp = config.damp * float(gram.diagonal().mean().clamp_min(1e-12))
        system = gram.clone()
        system.diagonal().add_(damp)
        try:
            fitted = torch.linalg.solve(system, cross + damp * w)
        except RuntimeError:
            fitted = None
        if fitted is None or not torch.isfinite(fitted).all():
            fitted, ok = w, False
    bias = (mean_t - mean_h @ fitted) if with_bias else None                      # (d,)
    return fitted, scales, bias, ok


def _write_layer(block: FFNBlock, keep: list[int], rows: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Put the repaired rows (k, d) and the bias shift into the student's down-projection, in place, so
    the next layers are fitted on this layer's repaired output; every other neuron's row is zero."""
    with torch.no_grad():
        w = block.down.weight
        idx = torch.tensor(keep, dtype=torch.long, device=w.device)
        dropped = torch.ones(w.shape[0] if block.transposed else w.shape[1], dtype=torch.bool, device=w.device)
        dropped[idx] = False
        if block.transposed:
            w[dropped] = 0
        else:
            w[:, dropped] = 0
        if len(keep):
            values = rows.to(device=w.device, dtype=w.dtype)
            if block.transposed:
                w[idx] = values                 # Conv1D weight: (N, d)
            else:
                w[:, idx] = values.t()          # Linear weight: (d, N)
        if bias is not None:
            shift_bias(block.down, bias.cpu())
