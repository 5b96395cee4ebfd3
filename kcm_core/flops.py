"""The analytic cost model of docs/method.md, per block, in multiply-accumulates (MACs).

FLOPs = 2 x MACs. The paper's count covers the encoder layers only: attention projections, the two
attention matrix products, and the FFN. Embeddings, LayerNorm, softmax, activations, pooler and task
head are left out of it; ``CostReport`` still shows the head's MACs and the embedding parameters, marked
as outside the count. ``tests/test_flops.py`` checks these formulas against
``torch.utils.flop_counter.FlopCounterMode``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from torch import nn

from .arch import ModelShape, base_model, transformer_layers

BLOCKS = ("qkv", "attn_out", "attn_matmul", "ffn_up", "ffn_down")
BLOCK_LABELS = {
    "qkv": "Q, K, V projections",
    "attn_out": "attention output projection",
    "attn_matmul": "attention matrix products (QK^T, AV)",
    "ffn_up": "FFN up (and gate) projection",
    "ffn_down": "FFN down projection",
}


def mac_per_head(shape: ModelShape, seq_len: float) -> float:
    """MACs of one attention head: its share of Q, K, V, output projections plus QK^T and AV.

    For multi-head attention this is docs/method.md's ``4 s d d_h + 2 s^2 d_h``; with grouped K/V heads
    the K and V projections are shared, so each query head carries ``kv_heads / heads`` of them.
    """
    s, d, dh = seq_len, shape.hidden, shape.head_dim
    kv_share = shape.kv_heads / shape.heads
    return (2 + 2 * kv_share) * s * d * dh + 2 * s * s * dh


def mac_per_neuron(shape: ModelShape, seq_len: float) -> float:
    """MACs of one FFN neuron: ``2 s d`` (up and down), ``3 s d`` with a gate."""
    return (3 if shape.gated else 2) * seq_len * shape.hidden


@dataclass(frozen=True)
class LayerCost:
    index: int
    heads: int
    neurons: int
    qkv: float
    attn_out: float
    attn_matmul: float
    ffn_up: float
    ffn_down: float

    @property
    def attention(self) -> float:
        return self.qkv + self.attn_out + self.attn_matmul

    @property
    def ffn(self) -> float:
        return self.ffn_up + self.ffn_down

    @property
    def total(self) -> float:
        return self.attention + self.ffn

    def as_dict(self) -> dict:
        return {"layer": self.index, "heads": self.heads, "neurons": self.neurons,
                **{b: getattr(self, b) for b in BLOCKS}, "total": self.total}


def layer_costs(shape: ModelShape, seq_len: float, kept: Sequence[int] | None = None) -> list[LayerCost]:
    """Per-layer MACs for one sequence of ``seq_len`` tokens, with ``kept`` neurons per layer."""
    _check_seq_len(seq_len)
    s, d, dh = seq_len, shape.hidden, shape.head_dim
    kept = list(shape.ffn_width if kept is None else kept)
    if len(kept) != shape.layers:
        raise ValueError(f"kept has {len(kept)} layers, the model has {shape.layers}")
    up_factor = 2 if shape.gated else 1
    rows = []
    for i, n in enumerate(kept):
        rows.append(
            LayerCost(
                index=i,
                heads=shape.heads,
                neurons=int(n),
                qkv=s * d * (shape.heads * dh + 2 * shape.kv_heads * dh),
                attn_out=s * shape.heads * dh * d,     # heads x head_dim may differ from d (head_dim set)
                attn_matmul=2 * s * s * shape.heads * dh,
                ffn_up=up_factor * s * d * n,
                ffn_down=s * d * n,
            )
        )
    return rows


def encoder_macs(shape: ModelShape, seq_len: float, kept: Sequence[int] | None = None) -> float:
    """Total MACs of the paper's count (all encoder layers) for one sequence."""
    return sum(row.total for row in layer_costs(shape, seq_len, kept))


def relative_flops(shape: ModelShape, seq_len: float, kept: Sequence[int]) -> float:
    """FLOPs of a model keeping ``kept`` neurons per layer, relative to ``shape``'s own widths."""
    return encoder_macs(shape, seq_len, kept) / encoder_macs(shape, seq_len)


def flops_floor(shape: ModelShape, seq_len: float) -> float:
    """The smallest relative FLOPs that FFN-only pruning can reach: every neuron removed."""
    return relative_flops(shape, seq_len, [0] * shape.layers)


def keep_count(shape: ModelShape, seq_len: float, budget: float) -> int:
    """Largest number of neurons (pooled over layers) whose model fits ``budget`` relative FLOPs.

    ``k = floor((C * MAC_full - MAC_attention) / MAC_neuron)``; raises ``ValueError`` for a budget outside
    (floor, 1], naming the floor.
    """
    check_budget(shape, seq_len, budget)
    full = encoder_macs(shape, seq_len)
    attention = sum(row.attention for row in layer_costs(shape, seq_len))
    k = (budget * full - attention) / mac_per_neuron(shape, seq_len)
    # A relative tolerance keeps exact budgets (k = 14624.0) from falling to 14623 on rounding noise.
    k = math.floor(k + 1e-9 * max(1.0, abs(k)))
    return max(0, min(k, sum(shape.ffn_width)))


def check_budget(shape: ModelShape, seq_len: float, budget: float) -> None:
    if not isinstance(budget, (int, float)) or math.isnan(budget):
        raise ValueError(f"flops budget must be a number in (0, 1], got {budget!r}")
    floor = flops_floor(shape, seq_len)
    if not (0 < budget <= 1):
        raise ValueError(f"flops budget must be in (0, 1] (fraction of FLOPs to keep), got {budget}")
    if budget < floor - 1e-12:
        raise ValueError(
            f"flops budget {budget} is below what FFN-only pruning can reach: with every FFN neuron "
            f"removed the model still needs {floor:.3f} of its FLOPs at sequence length {seq_len:g} "
            f"(attention is not pruned). Choose a budget of at least {math.ceil(floor * 1000) / 1000}."
        )


def _check_seq_len(seq_len: float) -> None:
    if not (isinstance(seq_len, (int, float)) and seq_len > 0 and math.isfinite(seq_len)):
        raise ValueError(f"sequence length must be a positive number, got {seq_len!r}")


@dataclass(frozen=True)
class CostReport:
    """What a model costs for one sequence, per block, and what the paper's count leaves out."""

    seq_len: float
    layers: tuple[LayerCost, ...]
    dense_encoder_macs: float         # the same model with every neuron kept
    head_macs: float                  # task head / pooler: outside the paper's count
    layer_params: tuple[int, ...]
    embedding_params: int             # outside the paper's count (incl. final norms, pooler)
    head_params: int                  # outside the paper's count

    @property
    def encoder_macs(self) -> float:
        return sum(row.total for row in self.layers)

    @property
    def relative_flops(self) -> float:
        return self.encoder_macs / self.dense_encoder_macs

    @property
    def ffn_share(self) -> float:
        return sum(row.ffn for row in self.layers) / self.encoder_macs

    @property
    def total_params(self) -> int:
        return sum(self.layer_params) + self.embedding_params + self.head_params

    def to_dict(self) -> dict:
        return {
            "seq_len": self.seq_len,
            "unit": "MACs per sequence (FLOPs = 2 x MACs)",
            "layers": [row.as_dict() for row in self.layers],
            "encoder_macs": self.encoder_macs,
            "encoder_flops": 2 * self.encoder_macs,
            "relative_flops": self.relative_flops,
            "ffn_share": self.ffn_share,
            "outside_paper_count": {"head_macs": self.head_macs,
                                    "embedding_params": self.embedding_params,
                                    "head_params": self.head_params},
            "params": {"layers": list(self.layer_params), "embeddings": self.embedding_params,
                       "head": self.head_params, "total": self.total_params},
        }


def estimate_layer_params(shape: ModelShape, neurons: int) -> int:
    """Parameters of one layer from the config alone, following the family's bias layout."""
    d, dh = shape.hidden, shape.head_dim
    q_out, kv_out = shape.heads * dh, shape.kv_heads * dh
    up_rows = (2 if shape.gated else 1) * neurons
    weights = d * (q_out + 2 * kv_out) + q_out * d + up_rows * d + neurons * d
    biases = (q_out + 2 * kv_out) if shape.qkv_bias else 0
    if shape.dense_bias:       # output projection, FFN up and down, and the two LayerNorms' biases
        biases += d + up_rows + d + 2 * d
    else:
        if shape.mlp_bias:     # LLaMA with mlp_bias: FFN gate, up and down
            biases += up_rows + d
        if shape.out_bias:     # LLaMA with attention_bias: the output projection too
            biases += d
    norms = 2 * d              # two norm weights (LayerNorm or RMSNorm)
    scales = 2 * d if shape.layer_scales else 0      # DINOv2's layer_scale1 and layer_scale2
    return weights + biases + norms + scales


def cost_report(shape: ModelShape, seq_len: float, kept: Sequence[int] | None = None,
                params: "ParamCount | None" = None) -> CostReport:
    """The full breakdown. With ``params`` (measured from a model), parameter counts are exact;
    without, they are estimated from the config."""
    rows = tuple(layer_costs(shape, seq_len, kept))
    d = shape.hidden
    head_macs = {
        "lm": seq_len * d * shape.vocab_size,                   # logits for every position
        "pooled-classifier": d * d + d * shape.num_labels,      # pooler + classifier on one token
        "classifier": shape.head_inputs * d * shape.num_labels,   # DINOv2: class token and patch mean
    }.get(shape.head, 0.0)
    if params is None:
        layer_params = tuple(estimate_layer_params(shape, row.neurons) for row in rows)
        embedding_params = (shape.vocab_size + shape.max_positions) * d
        head_params = shape.head_inputs * d * max(shape.num_labels, 0)
    else:
        layer_params, embedding_params, head_params = params.layers, params.embeddings, params.head
    return CostReport(
        seq_len=seq_len,
        layers=rows,
        dense_encoder_macs=encoder_macs(shape, seq_len),
        head_macs=head_macs,
        layer_params=tuple(layer_params),
        embedding_params=int(embedding_params),
        head_params=int(head_params),
    )


@dataclass(frozen=True)
class ParamCount:
    """Parameters counted from a real model: per layer, backbone outside the layers, and task head."""

    layers: tuple[int, ...]
    embeddings: int
    head: int

    @property
    def total(self) -> int:
        return sum(self.layers) + self.embeddings + self.head


def count_params(model: nn.Module) -> ParamCount:
    """Count ``model``'s parameters: per transformer layer, the rest of the backbone, the task head."""
    _, layers = transformer_layers(model)
    per_layer = tuple(sum(p.numel() for p in layer.parameters()) for layer in layers)
    backbone = sum(p.numel() for p in base_model(model).parameters())
    total = sum(p.numel() for p in model.parameters())
    return ParamCount(layers=per_layer, embeddings=backbone - sum(per_layer), head=total - backbone)
