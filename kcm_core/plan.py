"""``KeepPlan``: which neurons each layer keeps, and with what scale. Plain data.

A plan is produced by a selector (``kcm_core.select``), refined by ``kcm_core.scaling``, and realised by
``kcm_core.realise`` either softly (masking a copy) or hard (slicing into smaller layers). It can be saved
as JSON beside an export and loaded back.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping, Sequence

import torch


@dataclass(frozen=True)
class LayerKeep:
    """One layer's decision. ``keep_idx`` are the neurons that stay, sorted ascending."""

    keep_idx: tuple[int, ...]
    width: int                                  # neurons before pruning
    scales: tuple[float, ...] | None = None     # one per kept neuron, same order as keep_idx
    # Added to the down-projection's bias (length d): the mean output of the dropped neurons (FLAP's
    # bias compensation). None: nothing added.
    bias_shift: tuple[float, ...] | None = None
    # The kept neurons' refitted down-projection rows (k, d), in keep_idx order (the ``refit`` repair of
    # ``kcm_core.repair``); they replace the rows and ``scales`` is then None. Not written to JSON (the
    # exported weights hold them); a plan read back from JSON says it had them (``PlanInfo.repair``).
    rows: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if list(self.keep_idx) != sorted(set(self.keep_idx)):
            raise ValueError("keep_idx must be sorted and unique")
        if self.keep_idx and not (0 <= self.keep_idx[0] and self.keep_idx[-1] < self.width):
            raise ValueError(f"keep_idx out of range for width {self.width}")
        if self.scales is not None and len(self.scales) != len(self.keep_idx):
            raise ValueError(
                f"{len(self.scales)} scales for {len(self.keep_idx)} kept neurons"
            )
        if self.rows is not None and self.rows.shape[0] != len(self.keep_idx):
            raise ValueError(f"{self.rows.shape[0]} refitted rows for {len(self.keep_idx)} kept neurons")

    @property
    def kept(self) -> int:
        return len(self.keep_idx)

    def keep_mask(self) -> torch.Tensor:
        """Boolean mask of length ``width``; True means keep."""
        mask = torch.zeros(self.width, dtype=torch.bool)
        mask[list(self.keep_idx)] = True
        return mask

    def drop_idx(self) -> tuple[int, ...]:
        kept = set(self.keep_idx)
        return tuple(i for i in range(self.width) if i not in kept)

    def scale_vector(self) -> torch.Tensor:
        """Per-neuron multiplier of length ``width``: the scale for kept neurons, 0 for dropped ones."""
        vec = torch.zeros(self.width, dtype=torch.float64)
        if self.keep_idx:
            idx = torch.tensor(self.keep_idx, dtype=torch.long)
            vec[idx] = 1.0 if self.scales is None else torch.tensor(self.scales, dtype=torch.float64)
        return vec


@dataclass(frozen=True)
class PlanInfo:
    """How a plan was made: the selector's inputs, the gradient refinement and the scaling fit.
    ``None`` means the stage did not record it (e.g. a method that does not scale)."""

    budget: float | None = None           # relative FLOPs asked for
    seq_len: float | None = None          # the sequence length the FLOPs are counted at
    k: int | None = None                  # neurons the budget keeps, pooled over layers
    multiple: int | None = None
    min_per_layer: int | None = None
    uniform: bool | None = None
    label_swaps: int | None = None        # greedy gradient swaps (kcm-labels)
    scaled_layers: int | None = None      # layers that got fitted scales
    scaling_stopped_at: int | None = None  # first layer whose solve failed or left the bound
    scale_ridge: float | None = None
    repair: str | None = None             # the repair step (kcm_core.repair): none, bias, scales, ...
    repair_target: str | None = None      # teacher or local
    repair_failed_layers: list[int] | None = None   # layers whose repair solve failed (left as they were)
    repair_intercept: bool | None = None  # whether the repair fitted a bias (not where stock code has none)
    # per layer [before, after]: the relative error the pruned layer leaves in its output against the
    # repair's target on the calibration tokens, before and after the repair (kcm_core.repair)
    repair_errors: list[list[float]] | None = None
    allocation: str | None = None         # how the budget was spread over layers (kcm_core.select)
    # per layer, how many of the selection's neurons the obs repair swapped for others (same count kept)
    repair_swapped: list[int] | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "PlanInfo":
        """Known fields only: a plan written by a later version still loads."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def updated(self, **values: Any) -> "PlanInfo":
        return replace(self, **values)


@dataclass(frozen=True)
class KeepPlan:
    """Per layer, which FFN neurons stay and their scales; plus how the plan was made."""

    layers: tuple[LayerKeep, ...]
    method: str = ""
    info: PlanInfo = field(default_factory=PlanInfo, compare=False)

    def __post_init__(self):
        if not isinstance(self.info, PlanInfo):        # a mapping, e.g. from JSON
            object.__setattr__(self, "info", PlanInfo.from_dict(self.info))

    @classmethod
    def keep_all(cls, widths: Sequence[int]) -> "KeepPlan":
        return cls(tuple(LayerKeep(tuple(range(w)), w) for w in widths), method="dense")

    @classmethod
    def from_masks(cls, masks: Sequence[torch.Tensor], method: str = "",
                   info: PlanInfo | Mapping[str, Any] | None = None) -> "KeepPlan":
        layers = tuple(
            LayerKeep(tuple(int(i) for i in torch.nonzero(m, as_tuple=False).flatten()), int(m.numel()))
            for m in masks
        )
        return cls(layers, method=method, info=info if isinstance(info, PlanInfo) else PlanInfo.from_dict(info))

    @property
    def kept_counts(self) -> list[int]:
        return [layer.kept for layer in self.layers]

    @property
    def widths(self) -> list[int]:
        return [layer.width for layer in self.layers]

    @property
    def total_kept(self) -> int:
        return sum(self.kept_counts)

    @property
    def has_scales(self) -> bool:
        return any(layer.scales is not None for layer in self.layers)

    def with_scales(self, scales: Sequence[Sequence[float] | None], **info) -> "KeepPlan":
        layers = tuple(
            replace(layer, scales=None if s is None else tuple(float(x) for x in s))
            for layer, s in zip(self.layers, scales)
        )
        return KeepPlan(layers, method=self.method, info=self.info.updated(**info))

    @property
    def has_bias_shift(self) -> bool:
        return any(layer.bias_shift is not None for layer in self.layers)

    def with_bias_shifts(self, shifts: Sequence[Sequence[float] | None]) -> "KeepPlan":
        layers = tuple(replace(layer, bias_shift=None if b is None else tuple(float(x) for x in b))
                       for layer, b in zip(self.layers, shifts))
        return KeepPlan(layers, method=self.method, info=self.info)

    def without_scales(self) -> "KeepPlan":
        return self.with_scales([None] * len(self.layers))

    @property
    def has_rows(self) -> bool:
        return any(layer.rows is not None for layer in self.layers)

    def with_repair(self, rows: Sequence[torch.Tensor | None], scales: Sequence[Sequence[float] | None],
                    shifts: Sequence[Sequence[float] | None], **info) -> "KeepPlan":
        """Each layer's repair (``kcm_core.repair``): refitted rows, scales and bias shift (None: none)."""
        layers = tuple(replace(layer, rows=r, scales=None if s is None else tuple(float(x) for x in s),
                               bias_shift=None if b is None else tuple(float(x) for x in b))
                       for layer, r, s, b in zip(self.layers, rows, scales, shifts))
        return KeepPlan(layers, method=self.method, info=self.info.updated(**info))

    def with_keep(self, keeps: Sequence[Sequence[int]]) -> "KeepPlan":
        """The same plan with each layer's kept neurons replaced (its repair cleared): the obs repair
        re-chooses which neurons a layer keeps, never how many."""
        layers = tuple(LayerKeep(tuple(sorted(int(i) for i in keep)), layer.width)
                       for layer, keep in zip(self.layers, keeps))
        return KeepPlan(layers, method=self.method, info=self.info)

    def without_repair(self) -> "KeepPlan":
        """The selection alone: no scales, no bias shifts, no refitted rows."""
        n = len(self.layers)
        return self.with_repair([None] * n, [None] * n, [None] * n)

    def check_realisable(self) -> None:
        """``ValueError`` for a refitted plan read back from JSON (its rows live in the exported weights)."""
        if self.info.repair in ("refit", "obs") and not self.has_rows and any(layer.kept for layer in self.layers):
            raise ValueError("this plan's down-projection rows were refitted, and a plan read back from "
                             "JSON does not hold them (the exported weights do); realise the plan that "
                             "prune returned, or load the exported model")

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "info": self.info.to_dict(),
            "layers": [
                {
                    "width": layer.width,
                    "keep_idx": list(layer.keep_idx),
                    "scales": None if layer.scales is None else list(layer.scales),
                    "bias_shift": None if layer.bias_shift is None else list(layer.bias_shift),
                }
                for layer in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KeepPlan":
        layers = tuple(
            LayerKeep(
                tuple(int(i) for i in layer["keep_idx"]),
                int(layer["width"]),
                None if layer.get("scales") is None else tuple(float(s) for s in layer["scales"]),
                None if layer.get("bias_shift") is None else tuple(float(b) for b in layer["bias_shift"]),
            )
            for layer in data["layers"]
        )
        return cls(layers, method=data.get("method", ""), info=PlanInfo.from_dict(data.get("info")))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "KeepPlan":
        return cls.from_dict(json.loads(text))
