"""The ``curve`` allocation: how many neurons each layer keeps, from what the refit can win back there.

For one FFN layer, with ``H`` its down-projection inputs on the calibration tokens and ``W`` its rows,
keeping the first ``k`` neurons of the layer's order (its standardised score, best first) and refitting
their rows as ``kcm_core.repair``'s ``refit`` does leaves the ridge least-squares error

    F(k) = min_{W', b} sum_t a_t ||h_t,S W' + b - h_t W||^2 + lam ||W' - W_S||^2 + lam ||W_dropped||^2

(the augmented form: the last term is what the dropped rows took with them, so ``F`` is nested in
``k``). Every ``k`` comes from one Cholesky of the layer's centred, damped ``H^T H`` in that order:
``F(k) = F(0) - sum_{j<k} ||(L^-1 C)_j||^2`` with ``C`` the augmented cross term. Each token is weighted
by ``a_t = 1 / ||x_t||^2``, ``x_t`` what the next norm divides by: in a pre-LN model (LLaMA, GPT-2, ViT)
the residual stream after the layer, in a post-LN one (BERT) the centred input of the layer's own
LayerNorm (the FFN's output plus the residual). That is the share of a token's error the rest of the
model sees, and a handful of tokens with massive activations no longer outweigh the rest. ``lam`` is the
refit's damping.

The allocation then takes, for the same total, the counts that minimise ``sum_l F_l(k_l)`` and
averages them with the standardised allocation's counts (FLAP's per-layer z-scores ranked together).
On the LM demo either alone is worse than the average (``benchmarks/results/lm_allocation_error.md``).

The curves depend on the model, the data and the layer's order, never on the budget: computed once
with the scores (``MethodScores.curves``), every budget's counts are a cheap search.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .arch import ffn_blocks, post_norms, transformer_layers
from .distributed import SINGLE, Group
from .runtime import Batch, Progress, eval_mode, hooks, model_device, model_inputs, tell, token_mask

# float64 H^T H of at most this many bytes are held at once: more layers take more passes over the data
CHUNK_BYTES = 1 << 30


def layer_order(score: torch.Tensor) -> torch.Tensor:
    """Neuron indices from best to worst; a stable sort sends ties to the lower index (as ``select``)."""
    return torch.sort(-score.double(), stable=True).indices


def error_curves(model: nn.Module, scores: Sequence[torch.Tensor], batches: Sequence[Batch], damp: float,
                 progress: Progress | None = None, group: Group = SINGLE) -> list[torch.Tensor]:
    """Per layer, ``F(k)`` for ``k = 0 .. N`` (float64, length N + 1, non-increasing up to rounding) for the
    order of ``scores`` (see the module doc). The model is not modified; hooks are always removed."""
    batches = list(group.share(batches)) if group.distributed else list(batches)
    blocks = ffn_blocks(model)
    if len(scores) != len(blocks):
        raise ValueError(f"{len(scores)} score vectors for {len(blocks)} FFN layers")
    chunks, current, size = [], [], 0
    for i, b in enumerate(blocks):
        need = 8 * b.width * b.width
        if current and size + need > CHUNK_BYTES:
            chunks.append(current)
            current, size = [], 0
        current.append(i)
        size += need
    if current:
        chunks.append(current)
    curves: list[torch.Tensor] = []
    for c, chunk in enumerate(chunks):
        sums = _weighted_sums(model, blocks, chunk, batches, progress, c, len(chunks))
        for i in chunk:
            gram, h_sum, weight = sums[i]
            group.sum_([gram, h_sum, weight])
            tell(progress, f"curves: layer {i + 1}/{len(blocks)}", (i + 1) / len(blocks))
            curves.append(curve(gram, h_sum, float(weight), blocks[i].down_rows().detach(),
                                layer_order(scores[i]), damp))
    tell(progress, "curves: done", 1.0)
    return curves


def _weighted_sums(model, blocks, chunk: list[int], batches, progress, c: int, n_chunks: int) -> dict:
    """One pass over ``batches``: for each layer in ``chunk``, the token-weighted ``H^T H``, ``H`` summed,
    and the weights summed (float64 on the CPU)."""
    _, layers = transformer_layers(model)
    device = model_device(model)
    sums = {i: [torch.zeros(blocks[i].width, blocks[i].width, dtype=torch.float64),
                torch.zeros(blocks[i].width, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]
            for i in chunk}
    held: dict[int, torch.Tensor] = {}
    current: dict[str, Batch] = {}

    def ffn_hook(i: int):
        def hook(_module, args):
            h = args[0]
            held[i] = h[token_mask(current["batch"], h.shape, h.device)].float()          # (tokens, N)
        return hook

    def add(i: int, x: torch.Tensor) -> None:
        x = x[token_mask(current["batch"], x.shape, x.device)].float()
        h = held.pop(i)
        a = 1.0 / (x * x).sum(1).clamp_min(1e-12)                                          # (tokens,)
        ha = h * a[:, None]
        sums[i][0].add_((ha.t() @ h).double().cpu())
        sums[i][1].add_(ha.sum(0).double().cpu())
        sums[i][2].add_(a.double().sum().cpu())

    def layer_hook(i: int):              # pre-LN: the residual stream after the layer, as the next norm sees it
        def hook(_module, _args, out):
            add(i, out[0] if isinstance(out, tuple) else out)
        return hook

    def norm_hook(i: int):               # post-LN: the layer's own LayerNorm input, centred as it centres it
        def hook(_module, args):
            u = args[0]
            add(i, u - u.mean(-1, keepdim=True))
        return hook

    norms = post_norms(model)
    handles = [blocks[i].down.register_forward_pre_hook(ffn_hook(i)) for i in chunk]
    handles += ([norms[i].register_forward_pre_hook(norm_hook(i)) for i in chunk] if norms is not None else
                [layers[i].register_forward_hook(layer_hook(i)) for i in chunk])
    with hooks(handles), eval_mode(model), torch.no_grad():
        for step, batch in enumerate(batches):
            current["batch"] = batch
            model(**model_inputs(batch, device))
            tell(progress, f"curves: batch {step + 1}/{len(batches)}" + (f" (pass {c + 1}/{n_chunks})"
                                                                         if n_chunks > 1 else ""),
                 (step + 1) / max(1, len(batches)))
    return sums


def curve(gram: torch.Tensor, h_sum: torch.Tensor, weight: float, rows: torch.Tensor, order: torch.Tensor,
          damp: float) -> torch.Tensor:
    """``F(k)`` for ``k = 0 .. N`` from one layer's weighted sums; ``rows``: its down-projection rows (N, d)."""
    n_neurons = rows.shape[0]
    if weight <= 0:                               # no tokens: nothing to tell the neurons apart
        return torch.zeros(n_neurons + 1, dtype=torch.float64)
    mean = h_sum / weight
    g = gram - weight * torch.outer(mean, mean)                  # centred: the refit's intercept
    lam = damp * float(g.diagonal().mean().clamp_min(1e-12))
    w = rows.double().cpu()
    gw = g @ w
    total = float((w * gw).sum()) + lam * float((w * w).sum())
    system = g[order][:, order]
    system.diagonal().add_(lam)
    chol = torch.linalg.cholesky(system)
    m = torch.linalg.solve_triangular(chol, (gw + lam * w)[order], upper=False)          # (N, d)
    gains = torch.cat([torch.zeros(1, dtype=torch.float64), (m * m).sum(1).cumsum(0)])
    return (total - gains).clamp_min(0)


def curve_counts(curves: Sequence[torch.Tensor], k: int, floors: Sequence[int]) -> list[int]:
    """Counts with total ``k`` (each at least its floor) that minimise ``sum_l curves_l[k_l]``: the price
    of a neuron is searched by bisection (each layer keeps the count that minimises its error plus
    price times count), then the remainder goes where one neuron changes the error most."""
    widths = [c.numel() - 1 for c in curves]
    if not sum(floors) <= k <= sum(widths):
        raise ValueError(f"cannot keep {k} neurons in layers of {widths} with at least {list(floors)} each")

    steps = torch.arange(max(widths, default=0) + 1, dtype=torch.float64)

    def counts_at(price: float) -> list[int]:
        return [f + int(torch.argmin((c + price * steps[:c.numel()])[f:])) for c, f in zip(curves, floors)]

    lo, hi = 0.0, max((float(c[0]) for c in curves), default=0.0) + 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if sum(counts_at(mid)) > k:
            lo = mid
        else:
            hi = mid
    out = counts_at(hi)
    while sum(out) < k:      # one more neuron where it lowers the error most (ties: the lower layer)
        j = max((j for j in range(len(out)) if out[j] < widths[j]),
                key=lambda j: (float(curves[j][out[j]] - curves[j][out[j] + 1]), -j))
        out[j] += 1
    while sum(out) > k:      # one fewer where it raises the error least
        j = min((j for j in range(len(out)) if out[j] > floors[j]),
                key=lambda j: (float(curves[j][out[j] - 1] - curves[j][out[j]]), j))
        out[j] -= 1
    return out


def halfway(a: Sequence[int], b: Sequence[int]) -> list[int]:
    """The mean of two allocations with the same total, rounded so the total stays (the odd halves go
    up in the lower layers first)."""
    if sum(a) != sum(b):
        raise ValueError(f"allocations of {sum(a)} and {sum(b)} neurons cannot be averaged")
    out = [(x + y) // 2 for x, y in zip(a, b)]
    odd = [j for j, (x, y) in enumerate(zip(a, b)) if (x + y) % 2]
    for j in odd[: sum(a) - sum(out)]:
        out[j] += 1
    return out
