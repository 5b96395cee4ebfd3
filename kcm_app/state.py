"""The session-state schema and the URL: which values a view is made of, and how a link restores them.

Persistent keys (``budget``, ``method``, ``multiple``) live in ``st.session_state`` under their own names; widgets
use ``w_``-prefixed keys and copy into them on change, because Streamlit forgets a widget's key on a
page that does not draw the widget. The page itself is the URL path (``st.navigation``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from kcm_core.pipeline import METHODS


@dataclass(frozen=True)
class ViewState:
    """What a shared link reproduces. Defaults are the paper's setting (60% of FLOPs, KCM)."""

    budget: float = 0.6
    method: str = "kcm"
    multiple: int = 1          # kept widths rounded to a multiple of this


MULTIPLES = (1, 8, 16, 64)

DEFAULTS = ViewState()
URL_KEYS = tuple(f.name for f in fields(ViewState))


def parse_budget(text: Any) -> float | None:
    """A budget from the URL, or None when it is not a number in (0, 1]."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(value) or not 0 < value <= 1:
        return None
    return round(value, 3)


def parse_query(params: Mapping[str, Any]) -> dict[str, Any]:
    """The valid view values found in query parameters; anything invalid is ignored."""
    out: dict[str, Any] = {}
    budget = parse_budget(_last(params.get("budget")))
    if budget is not None:
        out["budget"] = budget
    name = _last(params.get("method"))
    if isinstance(name, str) and name in METHODS:
        out["method"] = name
    multiple = _last(params.get("multiple"))
    if isinstance(multiple, str) and multiple.isdigit() and int(multiple) in MULTIPLES:
        out["multiple"] = int(multiple)
    return out


def query_for(values: Mapping[str, Any]) -> dict[str, str]:
    """Query parameters for the current view (budget to 2 decimals, as the slider steps)."""
    return {"budget": f"{float(values['budget']):.2f}", "method": str(values["method"]),
            "multiple": str(int(values.get("multiple", 1)))}


def clamp_budget(budget: float, floor: float) -> float:
    """A budget that the model can reach: at least the FFN-only floor (rounded up to 0.01), at most 1."""
    low = math.ceil(floor * 100 - 1e-9) / 100
    return min(1.0, max(low, round(float(budget), 2)))


def _last(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return value[-1] if value else None
    return value
