"""Which label-free recipe should a classifier get by default? Every candidate paired against every
other label-free row, on the classifier tasks' stored results (``--family text``, the default) or on
the vision demo's (``--family image``: ``bench_vision.py``'s ``vision.json``).

Reads the quality benchmark's results files (``bench_quality.py``: ``quality.json`` for the demo,
``quality-<task>.json``, and ``mpnet.json`` where it holds rows) and, for each candidate (a method or a
cell ``score/allocation/repair/target``) at each budget, computes its difference in accuracy from
every other label-free row measured at that budget: the mean over the seeds both have of the per-seed
difference, and the paired 95% bootstrap interval over test texts of the seed-averaged per-text
difference (``kcm_core.evaluate.bootstrap_interval``), plus McNemar's exact p per seed
(``paired_difference``). Nothing is run: only stored per-text hits are read.

The issues' goals, checked per candidate:
- text: never behind random or the paper's KCM at any budget on any task (an interval entirely below
  0); ahead of every other label-free method at 0.6 (interval entirely above 0) on at least three tasks;
- image: ahead of every other label-free method (the plain methods, not the repair cells of one score)
  at 0.7 and below.

    python benchmarks/classifier_default.py --candidates kcm,kcm/pooled/refit/local,fluct-refit
    python benchmarks/classifier_default.py --family image --candidates fluct-refit,kcm

Writes benchmarks/results/classifier_default.json and .md (``--family image``: vision_default.*).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kcm_core.evaluate import bootstrap_interval, paired_difference  # noqa: E402
from kcm_core.methods import METHODS  # noqa: E402
from common import cell_label, cell_method, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FILES = {"demo (polarity)": "quality.json", "hedge": "quality-hedge.json", "fine foods": "quality-fine-foods.json",
         "MPNet polarity": "mpnet.json"}
IMAGE_FILES = {"vision demo": "vision.json"}
IMAGE_BUDGETS = 0.7                    # the image goal: ahead of every plain label-free method at this and below
ANCHORS = ("random", "kcm")
HEADLINE = 0.6


def label_free(cell: str) -> bool:
    return not METHODS[cell_method(cell)].uses_labels


def hits(row: dict, key: str = "hits") -> np.ndarray:
    return np.array([int(c) for c in row[key]], dtype=np.float64)


def compare(rows: list[dict], a: str, b: str, budget: float, key: str = "hits") -> dict | None:
    """``a`` minus ``b`` at ``budget`` over the seeds both were measured with; None if none. ``key``:
    "hits" (accuracy) or "agree" (agreement with the unpruned model's predictions)."""
    by_seed = {}
    for r in rows:
        if r["budget"] == budget and r["method"] in (a, b):
            by_seed.setdefault(r["seed"], {})[r["method"]] = r
    seeds = sorted(s for s, pair in by_seed.items() if a in pair and b in pair)
    if not seeds:
        return None
    per_seed = [paired_difference(hits(by_seed[s][a], key), hits(by_seed[s][b], key), seed=0) for s in seeds]
    diff = np.mean([hits(by_seed[s][a], key) - hits(by_seed[s][b], key) for s in seeds], axis=0)
    lo, hi = bootstrap_interval(diff, seed=0)
    return {"seeds": seeds, "difference": float(diff.mean()), "ci95": [lo, hi],
            "mcnemar_p": [p.p_value for p in per_seed]}


def versus_unpruned(rows: list[dict], unpruned_hits: str, method: str, budget: float) -> dict | None:
    """``method``'s accuracy minus the unpruned model's on the same test texts at ``budget`` (seed-averaged
    per-text difference, paired interval); None if the method was not measured there."""
    mine = [r for r in rows if r["method"] == method and r["budget"] == budget]
    if not mine:
        return None
    base = hits({"hits": unpruned_hits})
    diff = np.mean([hits(r) - base for r in mine], axis=0)
    lo, hi = bootstrap_interval(diff, seed=0)
    return {"seeds": sorted(r["seed"] for r in mine), "difference": float(diff.mean()), "ci95": [lo, hi]}


def verdict(c: dict | None) -> str:
    if c is None:
        return "not measured"
    lo, hi = c["ci95"]
    return "ahead" if lo > 0 else "behind" if hi < 0 else "not shown different"


def analyse(candidates: list[str], files: dict[str, str] = FILES) -> dict:
    tasks = {}
    for task, name in files.items():
        path = RESULTS / name
        if not path.is_file():
            continue
        rows = json.loads(path.read_text())["rows"]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        budgets = sorted({r["budget"] for r in rows}, reverse=True)
        out, agreement = {}, {}
        for cand in candidates:
            if cand not in methods:
                continue
            out[cand] = {str(b): {other: compare(rows, cand, other, b) for other in methods
                                  if other != cand and label_free(other)} for b in budgets}
            agreement[cand] = {str(b): {other: compare(rows, cand, other, b, "agree") for other in methods
                                        if other != cand and label_free(other)} for b in budgets}
        base = json.loads(path.read_text()).get("unpruned", {}).get("hits")
        unpruned = {} if base is None else {m: {str(b): versus_unpruned(rows, base, m, b) for b in budgets}
                                            for m in dict.fromkeys([*ANCHORS, *out]) if m in methods}
        tasks[task] = {"file": name, "candidates": out, "agreement": agreement, "vs_unpruned": unpruned}
    goals = {}
    for cand in candidates:
        never_behind, ahead_at_06 = [], []
        for task, t in tasks.items():
            per_budget = t["candidates"].get(cand)
            if per_budget is None:
                continue
            behind = [f"{b} vs {o}{_above_unpruned(t, o, b)}" for b, others in per_budget.items()
                      for o, c in others.items() if o in ANCHORS and verdict(c) == "behind"]
            never_behind.append({"task": task, "behind_anchor": behind})
            at = per_budget.get(str(HEADLINE), {})
            measured = {o: verdict(c) for o, c in at.items() if c is not None}
            ahead_at_06.append({"task": task, "ahead_of_all": bool(measured) and all(v == "ahead" for v in measured.values()),
                                "verdicts": measured})
        goals[cand] = {"never_behind_random_or_kcm": never_behind, "ahead_at_0.6": ahead_at_06,
                       "tasks_ahead_of_all_at_0.6": sum(x["ahead_of_all"] for x in ahead_at_06)}
    return {"candidates": candidates, "tasks": tasks, "goals": goals}


def _above_unpruned(task: dict, method: str, budget: str) -> str:
    """A note when ``method`` at ``budget`` is itself more accurate than the unpruned model (interval
    above 0): being behind it then means being less lucky than it, not pruning worse."""
    c = task.get("vs_unpruned", {}).get(method, {}).get(budget)
    if c is None or verdict(c) != "ahead":
        return ""
    return (f", which is itself {100 * c['difference']:+.1f} [{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}]"
            " points above the unpruned model")


def image_goal(data: dict) -> dict:
    """Per candidate and task: the budgets at or below ``IMAGE_BUDGETS`` where it is not ahead of every
    plain label-free method (a method row, not a ``score/allocation/repair/target`` cell)."""
    out = {}
    for cand in data["candidates"]:
        for task, t in data["tasks"].items():
            per_budget = t["candidates"].get(cand)
            if per_budget is None:
                continue
            misses = [f"{b} vs {o} ({verdict(c)})" for b, others in per_budget.items() if float(b) <= IMAGE_BUDGETS
                      for o, c in others.items() if "/" not in o and c is not None and verdict(c) != "ahead"]
            out.setdefault(cand, []).append({"task": task, "not_ahead": misses})
    return out


def _table(task: str, file: str, title: str, per_budget: dict, first: str = "vs") -> list[str]:
    budgets = list(per_budget)
    others = list(dict.fromkeys(o for b in budgets for o in per_budget[b]))
    lines = [f"**{task}**, {title} (`{file}`)", "", f"| {first} | " + " | ".join(budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for o in others:
        cells = []
        for b in budgets:
            c = per_budget[b].get(o)
            if c is None:
                cells.append("")
                continue
            text = (f"{100 * c['difference']:+.1f} [{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}]"
                    f" ({len(c['seeds'])} seed{'s' if len(c['seeds']) > 1 else ''})")
            cells.append(f"**{text}**" if verdict(c) in ("ahead", "behind") else text)
        lines.append(f"| {cell_label(o)} | " + " | ".join(cells) + " |")
    return lines + [""]


def _by_budget(per_method: dict) -> dict:
    """{method: {budget: c}} turned into {budget: {method: c}} for ``_table``."""
    budgets = list(dict.fromkeys(b for per in per_method.values() for b in per))
    return {b: {m: per.get(b) for m, per in per_method.items()} for b in budgets}


def markdown(data: dict) -> str:
    image = data.get("family") == "image"
    lines = [f"# The {'image' if image else 'classifier'} default: each candidate paired against every other "
             "label-free row", "",
             "Difference (points, candidate minus row) in accuracy, and in agreement with the unpruned "
             "model's predictions, over the seeds both were measured with [paired 95% bootstrap interval over "
             "test texts of the seed-averaged per-text difference]; read from the quality benchmark's stored "
             "per-text hits (`benchmarks/classifier_default.py`). **bold**: the interval excludes 0.", ""]
    for cand in data["candidates"]:
        g = data["goals"][cand]
        lines += [f"## {cell_label(cand)} (`{cand}`)", ""]
        for task, t in data["tasks"].items():
            for metric, title in (("candidates", "accuracy"), ("agreement", "agreement with the unpruned model")):
                if cand in t[metric]:
                    lines += _table(task, t["file"], title, t[metric][cand])
        if not image:
            for task, t in data["tasks"].items():
                shown = {m: per for m, per in t.get("vs_unpruned", {}).items() if m in (*ANCHORS, cand)}
                if cand in shown:
                    lines += _table(task, t["file"], "accuracy minus the unpruned model's on the same texts",
                                    _by_budget(shown), first="method")
        if image:
            for x in data["image_goal"].get(cand, []):
                lines += [f"Goal ({x['task']}), ahead of every plain label-free method at {IMAGE_BUDGETS} and below: "
                          + ("met." if not x["not_ahead"] else "not met: " + "; ".join(x["not_ahead"]) + "."), ""]
            continue
        behind = [f"{x['task']}: {', '.join(x['behind_anchor'])}" for x in g["never_behind_random_or_kcm"]
                  if x["behind_anchor"]]
        lines += [f"Goal 1, never behind random or the paper's KCM in accuracy: "
                  f"{'met' if not behind else 'not met (' + '; '.join(behind) + ')'} "
                  f"on the {len(g['never_behind_random_or_kcm'])} task(s) where it was measured.",
                  f"Goal 2, ahead of every other label-free row in accuracy at {HEADLINE}: on "
                  f"{g['tasks_ahead_of_all_at_0.6']} of {len(g['ahead_at_0.6'])} task(s) (three needed).", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", default="kcm")
    parser.add_argument("--family", choices=("text", "image"), default="text",
                        help="text: the four text-classifier tasks; image: the vision demo")
    args = parser.parse_args()
    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    data = analyse(candidates, IMAGE_FILES if args.family == "image" else FILES)
    data["family"] = args.family
    if args.family == "image":
        data["image_goal"] = image_goal(data)
    data["command"] = " ".join(["python", "benchmarks/classifier_default.py", *sys.argv[1:]])
    print(write_results("vision_default" if args.family == "image" else "classifier_default", data, markdown(data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
