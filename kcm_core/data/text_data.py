"""``TextData``: texts (and optional second texts and integer labels) as plain tuples, small enough to
hold in memory and hashable enough to cache on; ``TextData.sample`` / ``seeded_indices`` draw the
seeded subset every caller uses (the CLI, the app, the benchmarks).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch


@dataclass(frozen=True)
class TextData:
    """Texts with optional second texts (pair tasks) and optional integer labels (``>= 0``).

    ``label_names[i]`` is the original value (or class name) of label ``i``; ``None`` when the labels
    are integers without names (class ids as they are). ``labels_by_name`` is True when the labels
    only number ``label_names`` in sorted order (a file's string labels, or negative integers): then
    only the names mean anything to a model (``labels_for_model``), never the positions. ``source``
    says where the data came from, for reports.
    """

    texts: tuple[str, ...]
    text_pairs: tuple[str, ...] | None = None
    labels: tuple[int, ...] | None = None
    label_names: tuple[str, ...] | None = None
    source: str = ""
    labels_by_name: bool = False

    def __post_init__(self) -> None:
        n = len(self.texts)
        if self.text_pairs is not None and len(self.text_pairs) != n:
            raise ValueError(f"text_pairs has {len(self.text_pairs)} entries but texts has {n}")
        if self.labels is not None:
            if len(self.labels) != n:
                raise ValueError(f"labels has {len(self.labels)} entries but texts has {n}")
            bad = [y for y in self.labels if y < 0]
            if bad:
                raise ValueError(f"labels must be integers >= 0, got {bad[0]}")
            if self.label_names is not None and self.labels and max(self.labels) >= len(self.label_names):
                raise ValueError(f"label {max(self.labels)} has no name: label_names has only "
                                 f"{len(self.label_names)} entries")
        if self.labels_by_name and (self.labels is None or self.label_names is None):
            raise ValueError("labels_by_name needs labels and label_names")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    @property
    def num_classes(self) -> int:
        """Number of classes: ``len(label_names)`` when named, else ``max(label) + 1``; 0 unlabeled."""
        if self.labels is None:
            return 0
        if self.label_names is not None:
            return len(self.label_names)
        return max(self.labels) + 1 if self.labels else 0

    def subset(self, indices: Sequence[int]) -> TextData:
        """The rows at ``indices`` (in that order), keeping ``label_names`` and ``source``."""
        n = len(self)
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise ValueError(f"subset index {bad[0]} is out of range for {n} rows")

        def pick(values: tuple | None) -> tuple | None:
            return None if values is None else tuple(values[i] for i in idx)

        return replace(self, texts=pick(self.texts), text_pairs=pick(self.text_pairs),
                       labels=pick(self.labels))

    def sample(self, n: int | None, seed: int, *, shuffled: bool = False) -> TextData:
        """A seeded random subset of ``n`` rows (see ``seeded_indices``), in their original order, or
        with ``shuffled`` in the seeded draw's order (so that its first rows are a random subset too).

        ``self`` itself when ``n`` is None or at least ``len(self)`` and not ``shuffled``.
        ``label_names`` and ``source`` are kept as they are.
        """
        _check_sample_size(n)
        if (n is None or n >= len(self)) and not shuffled:
            return self
        return self.subset(seeded_indices(len(self), n, seed, shuffled=shuffled))


def seeded_indices(total: int, n: int | None, seed: int, *, shuffled: bool = False) -> list[int]:
    """Ascending indices of a seeded random subset of ``n`` of ``range(total)`` (with ``shuffled``:
    the same subset in the order it was drawn).

    The subset is the first ``n`` entries of ``torch.randperm(total)`` drawn with a
    ``torch.Generator`` seeded with ``seed``, sorted: the same ``(total, n, seed)`` always gives the
    same rows, and for one ``(total, seed)`` a smaller subset is contained in every larger one (so
    ``range(total)`` minus the subset is a held-out set that never overlaps it). ``n`` of None or at
    least ``total`` means every index.
    """
    _check_sample_size(n)
    if (n is None or n >= total) and not shuffled:
        return list(range(total))
    gen = torch.Generator().manual_seed(int(seed))
    drawn = torch.randperm(total, generator=gen)[:total if n is None else n]
    return drawn.tolist() if shuffled else drawn.sort().values.tolist()


def _check_sample_size(n: int | None) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"sample size must be a positive integer or None, got {n!r}")
