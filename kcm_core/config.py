"""``PruneConfig``: everything that decides a plan, validated here, once (frozen; every option has a
default, and a bad value raises ``ValueError`` naming it)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

from . import scores as S
from .hull import HullConfig
from .methods import DEFAULT_METHOD, Method, method
from .repair import RepairConfig
from .runtime import take_sequences
from .scaling import ScaleConfig
from .select import ALLOCATIONS


@dataclass(frozen=True)
class PruneConfig:
    """Everything that decides a plan. Validated here, once.

    seq_len: the sequence length the FLOPs budget is counted at; None means the average real length
        of the unlabeled sample (the paper uses each task's average length).
    scale_samples: how many of the unlabeled sequences the scaling step (and every repair but refit) uses.
    refit_samples: how many the refit repair uses (None: all of them); it fits k x d numbers per layer,
        so it needs more tokens than one scale per neuron (see ``repair_sample``).
    repair: how the kept neurons make up for the dropped ones (``kcm_core.repair``); "auto" kinds
        mean the method's own.
    allocation: how the budget is spread over layers (``kcm_core.select``).
    label_samples: how many labeled sequences the label-using methods use (None: all given).
    """

    method: str = DEFAULT_METHOD
    budget: float = 0.6
    seq_len: float | None = None
    seed: int = 0
    hull: HullConfig = HullConfig()
    d2: S.D2Config = S.D2Config()
    scale: ScaleConfig = ScaleConfig()
    scale_samples: int = 512
    refit_samples: int | None = None
    label_samples: int | None = 512
    multiple: int = 1
    min_per_layer: int = 0
    uniform: bool = False
    repair: RepairConfig = RepairConfig()
    allocation: str = "auto"

    def __post_init__(self):
        self.spec                                  # an unknown method name raises here, naming the known ones
        if self.allocation not in ("auto",) + ALLOCATIONS:
            raise ValueError(f"allocation must be auto or one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if not isinstance(self.budget, (int, float)) or not (0 < self.budget <= 1):
            raise ValueError(f"flops budget must be in (0, 1] (fraction of FLOPs to keep), got {self.budget}")
        if self.seq_len is not None and not self.seq_len > 0:
            raise ValueError(f"seq_len must be > 0, got {self.seq_len}")
        if not (isinstance(self.scale_samples, int) and self.scale_samples >= 1):
            raise ValueError(f"scale_samples must be a positive integer, got {self.scale_samples!r}")
        if self.refit_samples is not None and not (isinstance(self.refit_samples, int) and self.refit_samples >= 1):
            raise ValueError(f"refit_samples must be a positive integer or None, got {self.refit_samples!r}")
        if self.label_samples is not None and not self.label_samples >= 1:
            raise ValueError(f"label_samples must be a positive integer, got {self.label_samples!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @cached_property
    def spec(self) -> Method:
        """The method's row (``kcm_core.methods``), looked up once and carried with the configuration
        (not a field: it is no option, and stays out of ``to_dict``, equality and hashing)."""
        return method(self.method)

    @property
    def resolved_allocation(self) -> str:
        """The allocation actually used: ``auto`` is the method's own."""
        return self.spec.allocation if self.allocation == "auto" else self.allocation

    @property
    def resolved_repair(self) -> RepairConfig:
        """The repair actually run: ``auto`` replaced by the method's own."""
        return self.repair.resolved(self.spec.own_repair)

    @property
    def repair_samples(self) -> int | None:
        """How many unlabeled sequences the repair step fits on: ``refit_samples`` (None: all) for refit
        and obs, ``scale_samples`` for the others."""
        return self.refit_samples if self.resolved_repair.kind in ("refit", "obs") else self.scale_samples

    def repair_sample(self, unlabeled):
        """The unlabeled batches the repair step fits on (the first ``repair_samples`` sequences)."""
        return take_sequences(unlabeled, self.repair_samples)
