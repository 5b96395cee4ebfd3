"""The session-state schema and the URL: which values a view is made of, and how a link restores them.

Every read and write of ``st.session_state`` in the app goes through this module, so the keys, their
types and their defaults are written down once. The parsing functions (``parse_query``, ``query_for``,
``clamp_budget``) are plain Python; the accessors below them import Streamlit only when called, so
importing this module needs no running app.

Persistent keys (``budget``, ``method``, ``multiple``) live in ``st.session_state`` under their own
names; widgets use ``w_``-prefixed keys and copy into them on change, because Streamlit forgets a
widget's key on a page that does not draw the widget. The sidebar's widgets are drawn on every page,
so they keep their own keys. The page itself is the URL path (``st.navigation``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Iterable, Mapping, MutableMapping

from kcm_core.methods import DEFAULT_METHOD, METHODS
from kcm_core.repair import REPAIRS

from . import navigation

if TYPE_CHECKING:
    from .engine import Workspace
    from .sources import DataChoice, ModelChoice


@dataclass(frozen=True)
class ViewState:
    """What a shared link reproduces. Defaults are the paper's setting (60% of FLOPs, KCM)."""

    budget: float = 0.6
    method: str = DEFAULT_METHOD
    multiple: int = 1          # kept widths rounded to a multiple of this
    repair: str = "auto"       # how the kept neurons are repaired (kcm_core.repair); auto: the method's own


MULTIPLES = (1, 8, 16, 64)
# A language model's readouts mean something near the top of the range (on the LM demo every method's
# perplexity grows fastest below 0.8), so an LM opens at 0.9 unless a link or the user chose a budget.
LM_DEFAULT_BUDGET = 0.9

DEFAULTS = ViewState()


def default_budget(is_lm: bool) -> float:
    """The budget a session opens on for this kind of model."""
    return LM_DEFAULT_BUDGET if is_lm else DEFAULTS.budget


URL_KEYS = tuple(f.name for f in fields(ViewState))

# Keys of values that are not widgets: the view's (URL_KEYS) ...
BUDGET, METHOD, MULTIPLE, REPAIR = URL_KEYS
REPAIR_OPTIONS = ("auto", *REPAIRS)
# ... and the session's.
WORKSPACE = navigation.WORKSPACE  # the loaded Workspace, or None while nothing is loaded
INITIALISED = "_initialised"     # defaults and the link's values were written (once per session)
ENTRY = "_entry"                 # app.py set this for the page it is about to run (one run only)
EVALUATOR = "_evaluator"         # the session's latest-only evaluation runner (kcm_app.live)
SHOWN = "_shown"                 # the last evaluated budget the Prune page drew (shown while a newer one runs)
NOTICE = "_notice"               # a one-time notice for the page (e.g. a shared link that was corrected)
PAGE = "_page"                   # the script of the page this session is on (kcm_app.ui.PAGES)
SCATTER_ROUND = "_scatter_round"  # bumped to clear the Scores page's scatter selection (a new widget key)
LOAD_ERROR = "_load_error"       # why the sidebar's model or data did not load (shown in the main area)
STOPPED = "_stopped"             # the budget key whose evaluation the user stopped (not started again by itself)
EXPORTED = "_exported"           # the last export this session wrote: (folder, files, what to say), kept across reruns
BUDGET_CHOSEN = "_budget_chosen"  # a link or the user set the budget (else it follows the model kind's default)
METHOD_CHOSEN = "_method_chosen"  # a link or the user set the method (else it follows the model kind's default)

# Widget keys: the view's widgets, each copied into its persistent value on change ...
W_BUDGET, W_METHOD, W_MULTIPLE, W_REPAIR = "w_budget", "w_method", "w_multiple", "w_repair"
PERSISTENT = {W_BUDGET: BUDGET, W_METHOD: METHOD, W_MULTIPLE: MULTIPLE, W_REPAIR: REPAIR}
# ... and the generation panel's prompt, kept the same way (not in the URL): the Prune page keys its
# background job by it before the panel's text field is drawn, and it survives a visit to another page.
PROMPT, W_PROMPT = "_prompt", "gen_prompt"
PERSISTENT[W_PROMPT] = PROMPT
# ... and the sidebar's, which keep their own keys (drawn on every page; see ``sidebar_defaults``).
SAMPLE_SIZE, MAX_LEN, SEED = "sample_size", "max_len", "seed"
# ... a language model's sample: calibration blocks and tokens per block (its own keys, so switching
# between a classifier and an LM keeps each one's settings).
LM_BLOCKS, BLOCK_SIZE = "lm_blocks", "block_size"
MODEL_KIND, DATA_KIND = "model_kind", "data_kind"
MODEL_STREAM = "model_stream"     # the sidebar's "Layer by layer" box (a local folder larger than memory)
LAYERWISE_TOLD = "layerwise_told"  # the folder last opened layer by layer by itself (its notice is shown once)


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
    repair = _last(params.get("repair"))
    if isinstance(repair, str) and repair in REPAIR_OPTIONS:
        out["repair"] = repair
    return out


def link_problems(params: Mapping[str, Any]) -> list[str]:
    """What a shared link asked for that this app cannot show, each with what is shown instead."""
    problems = []
    found = parse_query(params)
    for key, shown in (("budget", f"{DEFAULTS.budget:.2f}"), ("method", METHODS[DEFAULTS.method].label),
                       ("multiple", str(DEFAULTS.multiple)), ("repair", DEFAULTS.repair)):
        asked = _last(params.get(key))
        if asked is not None and key not in found:
            rule = {"budget": "a number in (0, 1]", "method": "one of " + ", ".join(METHODS),
                    "multiple": "one of " + ", ".join(map(str, MULTIPLES)),
                    "repair": "one of " + ", ".join(REPAIR_OPTIONS)}[key]
            problems.append(f"The link's {key} {asked!r} is not valid here ({rule}); showing {shown}.")
    return problems


def query_for(values: Mapping[str, Any]) -> dict[str, str]:
    """Query parameters for the current view (budget to 2 decimals, as the slider steps)."""
    return {"budget": f"{float(values['budget']):.2f}", "method": str(values["method"]),
            "multiple": str(int(values.get("multiple", 1))), "repair": str(values.get("repair", "auto"))}


def clamp_budget(budget: float, floor: float) -> float:
    """A budget that the model can reach: at least the FFN-only floor (rounded up to 0.01), at most 1."""
    low = math.ceil(floor * 100 - 1e-9) / 100
    return min(1.0, max(low, round(float(budget), 2)))


def initial_values(params: Mapping[str, Any]) -> dict[str, Any]:
    """A new session's view: the defaults, overridden by what a shared link carries."""
    return {**vars(DEFAULTS), **parse_query(params)}


def sidebar_defaults(model: ModelChoice, data: DataChoice, block_size: int = 256,
                     lm_blocks: int = 16) -> dict[str, Any]:
    """The sidebar widgets' start values: the start-up model and data (``sources.env_defaults``) and
    the sample settings (a classifier's sequences, a language model's blocks)."""
    return {MODEL_KIND: model.kind, "model_ref": model.ref, MODEL_STREAM: model.stream, DATA_KIND: data.kind,
            "data_ref": data.ref, "text_column": data.text_column or "", "text_pair_column": "",
            "label_column": data.label_column or "", "data_split": "", "data_config": "",
            SAMPLE_SIZE: 512, MAX_LEN: 128, SEED: 0, LM_BLOCKS: lm_blocks, BLOCK_SIZE: block_size}


def demo_data_for(model_kind: str, data_kind: str) -> str:
    """The data kind that goes with a newly chosen model: a demo's own data follows the demo (the LM
    demo reads reviews, the classifier demo its sentences); any other data choice stays."""
    demos = ("demo", "demo-lm", "demo-vision")
    if model_kind in demos and data_kind in demos:
        return model_kind
    return data_kind


def _last(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return value[-1] if value else None
    return value


# --------------------------------------------------------------------------- accessors (need a run)

def _session() -> MutableMapping[str, Any]:
    import streamlit as st          # here, not at the top: the parsing above stays Streamlit-free
    return st.session_state


def initialise(values: Mapping[str, Any], notices: list[str] | tuple = (), chosen: Iterable[str] = ()) -> None:
    """Write ``values`` where the session has none yet, once per session (a link counts on arrival;
    afterwards the widgets own the values), with the ``notices`` about what the link got wrong."""
    session = _session()
    if session.get(INITIALISED):
        return
    for key, value in values.items():
        session.setdefault(key, value)
    chosen = set(chosen)             # what the link named: kept, whatever model loads
    if BUDGET in chosen or values.get(BUDGET, DEFAULTS.budget) != DEFAULTS.budget:
        session[BUDGET_CHOSEN] = True
    if METHOD in chosen or values.get(METHOD, DEFAULTS.method) != DEFAULTS.method:
        session[METHOD_CHOSEN] = True
    for notice in notices:
        add_notice(notice)
    session[INITIALISED] = True


def set_defaults(values: Mapping[str, Any]) -> None:
    """Fill in keys the session lacks (widget keys Streamlit dropped come back at their default)."""
    session = _session()
    for key, value in values.items():
        session.setdefault(key, value)


def budget() -> float:
    return float(_session().get(BUDGET, DEFAULTS.budget))


def set_budget(value: float) -> None:
    _session()[BUDGET] = float(value)


def method() -> str:
    return str(_session().get(METHOD, DEFAULTS.method))


def set_method(name: str) -> None:
    _session()[METHOD] = name


def multiple() -> int:
    return int(_session().get(MULTIPLE, DEFAULTS.multiple))


def repair() -> str:
    return str(_session().get(REPAIR, DEFAULTS.repair))


def prompt(default: str) -> str:
    """The generation panel's prompt (``default`` until the user types one)."""
    return str(_session().setdefault(PROMPT, default))


def seed() -> int:
    return int(_session().get(SEED, 0))


def view() -> dict[str, Any]:
    """The values a link reproduces (``URL_KEYS``)."""
    return {BUDGET: budget(), METHOD: method(), MULTIPLE: multiple(), REPAIR: repair()}


def follow_model_kind() -> None:
    """on_change of the model source: the data follows a demo model to its own demo data."""
    session = _session()
    session[DATA_KIND] = demo_data_for(session[MODEL_KIND], session.get(DATA_KIND, "demo"))


def workspace() -> Workspace | None:
    return _session().get(WORKSPACE)


def set_workspace(ws: Workspace | None) -> None:
    """The loaded model; a budget or method nobody chose follows the model kind's default
    (``default_budget``, ``Workspace.default_method``)."""
    session = _session()
    session[WORKSPACE] = ws
    if ws is not None and not session.get(BUDGET_CHOSEN):
        session[BUDGET] = default_budget(ws.is_lm)
    if ws is not None and not session.get(METHOD_CHOSEN):
        session[METHOD] = ws.default_method


def evaluator():
    """The session's ``kcm_app.live.LatestOnly`` runner (made on first use)."""
    from .live import LatestOnly
    session = _session()
    if EVALUATOR not in session:
        session[EVALUATOR] = LatestOnly()
    return session[EVALUATOR]


def shown() -> Any:
    return _session().get(SHOWN)


def set_shown(result: Any) -> None:
    _session()[SHOWN] = result


def stopped() -> Any:
    return _session().get(STOPPED)


def set_stopped(key: Any) -> None:
    _session()[STOPPED] = key


def exported() -> Any:
    return _session().get(EXPORTED)


def set_exported(record: Any) -> None:
    _session()[EXPORTED] = record


def load_error() -> str | None:
    return _session().get(LOAD_ERROR)


def set_load_error(message: str | None) -> None:
    _session()[LOAD_ERROR] = message


def notices() -> list[str]:
    return list(_session().get(NOTICE, []))


def add_notice(message: str) -> None:
    _session()[NOTICE] = notices() + [message]


def take_notices() -> list[str]:
    return list(_session().pop(NOTICE, []))


def page() -> str | None:
    return _session().get(PAGE)


def set_page(script: str) -> None:
    _session()[PAGE] = script


def scatter_key() -> str:
    """The Scores page scatter's widget key. A Plotly selection belongs to its widget, so clearing it
    means drawing the chart under a new key (``clear_scatter_selection``)."""
    return f"scores_scatter_{int(_session().get(SCATTER_ROUND, 0))}"


def clear_scatter_selection() -> None:
    """on_click of 'Clear selection'."""
    session = _session()
    session[SCATTER_ROUND] = int(session.get(SCATTER_ROUND, 0)) + 1


def text(key: str) -> str | None:
    """A sidebar text field's value, stripped; None when empty."""
    return (_session().get(key) or "").strip() or None


def integer(key: str) -> int:
    return int(_session()[key])


def persistent_widget(widget_key: str) -> dict[str, Any]:
    """Keyword arguments for one of the view's widgets (``W_BUDGET``, ...), called right before drawing
    it: the widget shows the persistent value (it may have changed on another page or through a link,
    and Streamlit dropped the widget's key on pages that did not draw it), and a change is copied back.

    The widget's key is written only when it differs: a value written through session state is sent
    to the browser, which then replaces what the user may have changed meanwhile (a slider press made
    while the previous press's rerun was drawing was lost that way, the burst stuck on the budget
    before the last)."""
    key = PERSISTENT[widget_key]
    session = _session()
    if widget_key not in session or session[widget_key] != session[key]:
        session[widget_key] = session[key]
    return dict(key=widget_key, on_change=copy_widget, args=(widget_key, key))


def copy_widget(widget_key: str, key: str) -> None:
    """on_change callback: a widget's value becomes the persistent session value."""
    session = _session()
    session[key] = session[widget_key]
    if key in (BUDGET, METHOD):
        session[BUDGET_CHOSEN if key == BUDGET else METHOD_CHOSEN] = True


def mark_entry() -> None:
    """app.py, right before ``page.run()``: this run came through the entry point."""
    _session()[ENTRY] = True


def take_entry_mark() -> bool:
    """A page, first thing: did app.py run before it in this run? Consumes the mark, so the next
    run has to set it again."""
    return bool(_session().pop(ENTRY, False))
