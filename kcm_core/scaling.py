"""Scaling: fit one real-valued scale per kept neuron so each pruned FFN reproduces the unpruned one.

Label-free, layer by layer (Kwon et al.'s mask tuning, as METHOD.md states it). For layer l, with ``H``
the kept activations (tokens x k) from the model whose earlier layers are already pruned and scaled,
``W`` the kept down-projection rows (k x d) and ``T`` the unpruned model's FFN output minus bias
(tokens x d; teacher = the unpruned model on its own inputs), solve the ridge problem

    min_s ||A s - vec(T)||^2 + ridge * ||s - 1||^2,   A[:, i] = vec(H[:, i] W[i, :])

through its k x k normal equations ``A^T A = (H^T H) * (W W^T)``, ``A^T b = sum_t H * (T W^T)``; ``A``
itself is never built. If a solve fails or a scale leaves [-bound, bound], scaling stops from that
layer on (those layers keep scale 1).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from .arch import ffn_blocks, transformer_layers
from .distributed import SINGLE, Group
from .plan import KeepPlan
from .layer_replay import StopForward, record_layer_output, run_layer
from .realise import mask_copy
from .runtime import Batch, Progress, eval_mode, hooks, model_device, model_inputs, tell, token_mask


@dataclass(frozen=True)
class ScaleConfig:
    ridge: float = 1.0      # pull toward s = 1 (Kwon: s = 1 + delta, damping 1)
    bound: float = 10.0     # a scale outside [-bound, bound] stops scaling from that layer on

    def __post_init__(self):
        if not self.ridge >= 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        if not self.bound > 0:
            raise ValueError(f"bound must be > 0, got {self.bound}")


def _down_bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)


def teacher_targets(model: nn.Module, batches: Sequence[Batch]) -> list[torch.Tensor]:
    """Each layer's FFN output minus bias on the real tokens, concatenated over batches: (tokens, d)."""
    blocks = ffn_blocks(model)
    device = model_device(model)
    out: list[list[torch.Tensor]] = [[] for _ in blocks]
    current: dict[str, Batch] = {}

    def make_hook(i: int):
        def hook(module, _args, y):
            bias = _down_bias(module)
            y = y - bias if bias is not None else y                       # (B, T, d)
            keep = token_mask(current["batch"], y.shape, y.device)
            out[i].append(y[keep].float().cpu())
        return hook

    handles = [b.down.register_forward_hook(make_hook(i)) for i, b in enumerate(blocks)]
    with hooks(handles), eval_mode(model), torch.no_grad():
        for batch in batches:
            current["batch"] = batch
            model(**model_inputs(batch, device))
    return [torch.cat(parts) if parts else torch.zeros(0) for parts in out]


def fit_scales(model: nn.Module, plan: KeepPlan, batches: Sequence[Batch],
               config: ScaleConfig = ScaleConfig(), progress: Progress | None = None,
               targets: list[torch.Tensor] | None = None, group: Group = SINGLE) -> KeepPlan:
    """Return ``plan`` with fitted scales; ``plan.info['scaled_layers']`` says how many got them.

    ``targets`` (from ``teacher_targets(model, batches)``) do not depend on the plan: pass them to fit
    several plans on the same data without recomputing the teacher. The student (a masked copy) is
    run one layer at a time: each layer's scaled output is recorded and replayed into the next fit,
    so fitting all layers costs about two forward passes, not one per layer.

    Under a distributed ``group`` each rank runs its share of ``batches`` (teacher, student and
    replay alike) and the normal equations are summed over ranks before every solve, so all ranks
    fit the same scales.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("scaling needs unlabeled data: the sample is empty")
    if group.distributed:
        if targets is not None:
            raise ValueError("teacher targets cannot be passed in under torch.distributed: each rank "
                             "computes those of its own share of the batches")
        batches = list(group.share(batches))
    with _forward_errors_as_value_errors():
        return _fit(model, plan, batches, config, progress, targets, group)


@contextlib.contextmanager
def _forward_errors_as_value_errors() -> Iterator[None]:
    """torch's errors from a calibration forward pass (a sequence longer than the model's positions,
    a token id outside its vocabulary) become one ``ValueError`` that says what to check."""
    try:
        yield
    except (RuntimeError, IndexError) as err:
        raise ValueError(f"scaling: the model fails on the calibration data ({str(err).splitlines()[0]}); "
                         "check the maximum length against the model's positions and that the "
                         "tokenizer belongs to the model") from err


def _fit(model: nn.Module, plan: KeepPlan, batches: list[Batch], config: ScaleConfig,
         progress: Progress | None, targets: list[torch.Tensor] | None, group: Group) -> KeepPlan:
    if targets is None:
        tell(progress, "scaling: teacher outputs", 0.0)
        targets = teacher_targets(model, batches)
    student = mask_copy(model, plan.without_scales())
    blocks = ffn_blocks(student)
    _, layers = transformer_layers(student)
    device = model_device(student)
    scales: list[list[float] | None] = [None] * len(blocks)
    stopped_at = None
    recorded: list | None = None          # output of layer li - 1 per batch, scales folded in
    for li, (block, layer) in enumerate(zip(blocks, plan.layers)):
        tell(progress, f"scaling: layer {li + 1}/{len(blocks)}", li / len(blocks))
        if layer.kept > 0:
            s = solve_layer(student, layers, li, block, layer.keep_idx, batches, recorded,
                            targets[li].to(device), config, group)
            if s is None:
                stopped_at = li
                break
            scales[li] = s.cpu().tolist()
            fold_scales(block, layer.keep_idx, s)   # later layers see scaled inputs
        else:
            scales[li] = []
        if li + 1 < len(blocks):
            recorded = record_layer_output(student, layers, li, batches, recorded)
    tell(progress, "scaling: done", 1.0)
    scaled = sum(1 for s in scales if s is not None)
    return plan.with_scales(scales, scaled_layers=scaled, scaling_stopped_at=stopped_at,
                            scale_ridge=config.ridge)


def fold_scales(block, keep_idx, s: torch.Tensor) -> None:
    """Multiply the kept neurons' down-projection weights by their scales ``s``, in place."""
    with torch.no_grad():
        w = block.down.weight
        keep = torch.tensor(keep_idx, dtype=torch.long, device=w.device)
        cols = s.to(w.dtype)
        if block.transposed:
            w[keep] *= cols[:, None]
        else:
            w[:, keep] *= cols[None, :]


def solve_layer(student, layers, li, block, keep_idx, batches, recorded, target,
                config: ScaleConfig, group: Group = SINGLE) -> torch.Tensor | None:
    """Accumulate the k x k normal equations of layer ``li`` over all batches (of every rank) and
    solve them."""
    device = model_device(student)
    keep = torch.tensor(keep_idx, dtype=torch.long, device=device)
    k = len(keep_idx)
    w_kept = block.down_rows().detach()[keep].double()                  # (k, d)
    gram_h = torch.zeros(k, k, dtype=torch.float64, device=device)
    rhs = torch.zeros(k, dtype=torch.float64, device=device)
    cursor = {"row": 0, "b": 0}

    def stop_hook(module):
        def hook(_module, args):
            h = args[0]                                                  # (B, T, N)
            mask = token_mask(batches[cursor["b"]], h.shape, h.device)
            cursor["b"] += 1
            h = h[mask][:, keep].double()                                # (tokens, k)
            t = target[cursor["row"]: cursor["row"] + h.shape[0]].double()  # (tokens, d)
            cursor["row"] += h.shape[0]
            gram_h.add_(h.t() @ h)
            rhs.add_((h * (t @ w_kept.t())).sum(0))
            raise StopForward
        return module.register_forward_pre_hook(hook)

    run_layer(student, layers, li, batches, recorded, block.down, stop_hook)
    group.sum_([gram_h, rhs])
    # In place: a layer keeping k = 4,000 neurons has 128 MB per k x k float64 matrix, and the streamed
    # mode's peak memory is set here (kcm_core.streamed).
    gram = gram_h.mul_(w_kept @ w_kept.t())                              # (k, k)
    gram.diagonal().add_(config.ridge)
    try:
        s = torch.linalg.solve(gram, rhs + config.ridge)
    except RuntimeError:
        return None
    if not torch.isfinite(s).all() or s.abs().max() > config.bound:
        return None
    return s
