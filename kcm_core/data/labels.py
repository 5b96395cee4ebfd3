"""Labels: a label column's values as class ids (and names), and those ids matched to a model's classes.

Non-negative integers are kept as they are (they are class ids); strings (and negative integers) are
numbered in sorted order and their values kept as ``label_names`` (``label_ids``). Before labels meet a
model, ``labels_for_model`` turns them into that model's class ids: names through its
``config.id2label``, integers as its own ids, and anything it cannot predict is refused.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Mapping, Sequence

from .readers import INT_CELL
from .text_data import TextData


# --------------------------------------------------------------------------- a label column

def label_ids(values: list, column: str, class_names: list[str] | None, source: str,
              explicit: bool) -> tuple[tuple[int, ...] | None, tuple[str, ...] | None]:
    """A label column's values (``column`` of ``source``, for messages) as labels plus names: integers
    >= 0 as they are (class ids, no names); strings and negative integers numbered in sorted order with
    their values as names; a hub ``ClassLabel``'s ids with its ``class_names`` (all -1: unlabeled, None;
    ``explicit``, the column was named by the caller, makes that an error)."""
    if class_names is not None:  # a hub ClassLabel: ints already index class_names; -1 means unlabeled
        if all(v == -1 for v in values):
            if explicit:
                raise ValueError(f"{source}: every label in column {column!r} is -1 (this split is "
                                 "unlabeled, e.g. a GLUE test split); use a labeled split")
            return None, None
        if any(v is None or v < 0 for v in values):
            raise ValueError(f"{source}: some rows of label column {column!r} are unlabeled (-1)")
        return tuple(int(v) for v in values), tuple(class_names)
    for row, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            raise ValueError(f"{source}: row {row} has no value in label column {column!r}; give every "
                             "row a label or remove the unlabeled rows")
    if all(isinstance(v, bool) for v in values):
        values = [int(v) for v in values]
    elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        fractional = next((v for v in values if not math.isfinite(v) or float(v) != int(v)), None)
        if fractional is not None:
            raise ValueError(f"{source}: label column {column!r} holds non-integer numbers (e.g. "
                             f"{fractional}); only classification labels (integers or names) are supported")
        values = [int(v) for v in values]
    elif not all(isinstance(v, str) for v in values):
        kinds = sorted({type(v).__name__ for v in values})
        raise ValueError(f"{source}: label column {column!r} mixes value types ({', '.join(kinds)}); "
                         "labels must be all integers or all strings")
    if all(isinstance(v, int) and v >= 0 for v in values):
        return tuple(values), None                   # class ids as they are: never renumbered
    unique = sorted(set(values))
    index = {v: i for i, v in enumerate(unique)}
    return tuple(index[v] for v in values), tuple(str(v) for v in unique)


# --------------------------------------------------------------------------- labels meet a model

def check_labels_for_model(data: TextData, num_labels: int) -> None:
    """Raise ``ValueError`` unless ``data`` has labels usable with a ``num_labels``-way classifier."""
    if not data.has_labels:
        raise ValueError(f"{data.source or 'the data'} has no labels; name the label column")
    present = len(set(data.labels))
    if present < 2:
        raise ValueError(f"{data.source or 'the data'} has only one class; a classifier needs at least "
                         "two classes")
    if data.num_classes > num_labels:
        raise ValueError(f"{data.source or 'the data'} has {data.num_classes} classes but the model "
                         f"predicts only {num_labels} labels")


def align_labels(data: TextData, label_names: Sequence[str] | None) -> TextData:
    """``data`` with its labels renumbered to follow ``label_names`` (e.g. a training set's order).

    Needed when two files were mapped separately: a test file holding only ``"pos"`` rows would map
    ``"pos"`` to 0 on its own. Unnamed labels are kept as they are.
    """
    if not data.has_labels or data.label_names is None or label_names is None:
        return data
    target = {name: i for i, name in enumerate(label_names)}
    unknown = [n for n in data.label_names if n not in target]
    if unknown:
        raise ValueError(f"{data.source or 'the data'} has label {unknown[0]!r}, which is not one of "
                         f"{', '.join(map(repr, label_names))}")
    labels = tuple(target[data.label_names[y]] for y in data.labels)
    return replace(data, labels=labels, label_names=tuple(label_names))


def labels_for_model(data: TextData, model_config: Any) -> TextData:
    """``data`` with its labels turned into the class ids of the model whose config is ``model_config``
    (its ``id2label``); see ``labels_for_classes``. Every caller that pairs labels with a model's
    predictions (the CLI's prune and evaluate, the app, fine-tuning's evaluation) goes through here."""
    if not data.has_labels:
        return data
    id2label = getattr(model_config, "id2label", None)
    if not id2label:
        raise ValueError(f"the model ({type(model_config).__name__}) has no id2label in its config, so "
                         "labels cannot be matched to its classes; use a sequence classifier")
    return labels_for_classes(data, id2label)


def labels_for_classes(data: TextData, id2label: Mapping[int, str]) -> TextData:
    """``data`` with every label replaced by the id of the class ``id2label`` gives it.

    A model has real class names unless they are the defaults ``LABEL_0, LABEL_1, ...``. Then:
    a named label (a string, a ClassLabel name) is matched to a class name (exactly, else ignoring
    case); an integer label (or a name spelling one) is the model's own class id, except that a model
    whose class names are themselves integers (fine-tuned here on labels ``-1``/``1`` it names its
    classes ``"-1"``, ``"1"``) is matched by name. A model without real names accepts only class ids
    (and ``LABEL_k`` names); a file's string labels cannot be matched to it. A label that matches no
    class raises ``ValueError`` naming it, the model's classes and what to do; nothing is renumbered.
    The result's ``label_names`` are the model's class names (None when it has none).
    """
    if not data.has_labels:
        return data
    classes = {int(i): str(name) for i, name in id2label.items()}
    named = any(name != f"LABEL_{i}" for i, name in classes.items())
    ids: dict[int, int] = {}
    for label in sorted(set(data.labels)):
        name = data.label_names[label] if data.label_names is not None else None
        found = _class_id(label, name, data.labels_by_name, classes, named)
        if found is None:
            raise ValueError(_unknown_label(data, label, name, classes, named))
        ids[label] = found
    in_order = sorted(classes) == list(range(len(classes)))
    names = tuple(classes[i] for i in range(len(classes))) if named and in_order else None
    return replace(data, labels=tuple(ids[y] for y in data.labels), label_names=names,
                   labels_by_name=False)


def _class_id(label: int, name: str | None, by_name: bool, classes: dict[int, str],
              named: bool) -> int | None:
    """The model class of one data label (its position ``label`` and its name, if any), or None."""
    number = label if name is None else _as_int(name)
    if named:
        found = _match_name(name, classes) if name is not None else None
        if found is None and number is not None:
            found = (_match_name(str(number), classes) if _integer_names(classes)
                     else number if number in classes else None)
        return found
    if name is not None and name in {f"LABEL_{i}": i for i in classes}:
        return int(name[len("LABEL_"):])
    if not by_name:              # ids given with the data (plain integers, a ClassLabel, the demo)
        number = label
    return number if number is not None and number in classes else None


def _match_name(name: str, classes: dict[int, str]) -> int | None:
    exact = [i for i, n in classes.items() if n == name]
    if exact:
        return exact[0]
    folded = [i for i, n in classes.items() if n.casefold() == name.casefold()]
    return folded[0] if len(folded) == 1 else None


def _as_int(text: str) -> int | None:
    return int(text) if INT_CELL.fullmatch(text.strip()) else None


def _integer_names(classes: dict[int, str]) -> bool:
    return all(_as_int(n) is not None for n in classes.values())


def _unknown_label(data: TextData, label: int, name: str | None, classes: dict[int, str],
                   named: bool) -> str:
    shown = label if name is None else (_as_int(name) if _as_int(name) is not None else name)
    listed = [f"{i}={n}" if named else str(i) for i, n in sorted(classes.items())]
    listed = listed[:10] + (["..."] if len(listed) > 10 else [])
    ids = f"0-{len(classes) - 1}"
    if not named and isinstance(shown, str):
        advice = (f"its classes have no names, so give the labels as its class ids {ids} (or add "
                  "id2label and label2id to its config.json)")
    else:
        advice = (f"use the labels the model was trained on (its class ids {ids}"
                  f"{' or names' if named else ''}), or a model trained for this data")
    return (f"{data.source or 'the data'}: label {shown!r} is not one of the model's {len(classes)} "
            f"{'classes' if named else 'unnamed classes'} "
            f"({', '.join(listed)}); {advice}")


def training_classes(train: TextData) -> TextData:
    """Training data whose labels define a fresh head's classes: integer labels that are not already
    ``0..C-1`` (e.g. ``1``/``2``) become classes named ``"1"``, ``"2"`` (so the saved model matches
    the same file by name later); named labels and ``0..C-1`` are kept as they are."""
    if not train.has_labels or train.label_names is not None or not train.labels:
        return train
    unique = sorted(set(train.labels))
    if unique == list(range(len(unique))):
        return train
    index = {v: i for i, v in enumerate(unique)}
    return replace(train, labels=tuple(index[y] for y in train.labels),
                   label_names=tuple(str(v) for v in unique), labels_by_name=True)
