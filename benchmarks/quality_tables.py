"""How the quality benchmark's numbers are written: cells for ``bench_quality.py``'s results file and
the README's quality tables (``render_readme.py``). Pure formatting of a results file's ``summary``;
no torch, so the README check stays cheap.

A summary row (``bench_quality.summarise``) holds one (method, budget): the accuracy over seeds and the
paired comparison with KCM (``vs_kcm``; for KCM's own rows ``unpruned_vs_kcm``), each a dict with the
mean over seeds of the per-seed difference, the paired interval of the seed-averaged per-text
difference, the spread between seeds and McNemar's p per seed.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

HEADLINE = 0.6
REFERENCE = "kcm"


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def points(x: float) -> str:
    return f"{100 * x:+.1f}"


def p_text(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.0e}"


def paired_cell(paired: Mapping[str, Any] | None) -> str:
    """``-4.5 [-6.9, -2.1]``: the mean over seeds of the paired difference, in points, with the paired
    interval of the seed-averaged per-text difference."""
    if paired is None:
        return ""
    lo, hi = paired["ci95_seed_averaged"]
    return f"{points(paired['difference_mean'])} [{points(lo)}, {points(hi)}]"


def spread_cell(paired: Mapping[str, Any] | None) -> str:
    if paired is None or len(paired["seeds"]) < 2:
        return ""
    return f"{points(paired['difference_min'])} to {points(paired['difference_max'])}"


def p_cell(paired: Mapping[str, Any] | None) -> str:
    return "" if paired is None else ", ".join(p_text(p) for p in paired["mcnemar_p"])


def _row(summary: Sequence[Mapping[str, Any]], method: str, budget: float) -> Mapping[str, Any] | None:
    return next((r for r in summary if r["method"] == method and r["budget"] == budget), None)


def _vs_cell(row: Mapping[str, Any] | None) -> str:
    """The paired comparison of a row with KCM (KCM's own row: unpruned minus KCM), then p per seed."""
    if row is None:
        return ""
    if row["method"] == REFERENCE:
        paired = row["unpruned_vs_kcm"]
        return "" if paired is None else f"unpruned minus KCM {paired_cell(paired)}; {p_cell(paired)}"
    paired = row["vs_kcm"]
    return "" if paired is None else f"{paired_cell(paired)}; {p_cell(paired)}"


def accuracy_cell(r: Mapping[str, Any] | None) -> str:
    """One summary row's accuracy: mean over seeds [interval of the seed-averaged accuracy], and the
    seeds' min-max when there are several; "" when not measured."""
    if r is None:
        return ""
    lo, hi = r["accuracy_ci95"]
    spread = f" ({pct(r['accuracy_min'])}-{pct(r['accuracy_max'])})" if len(r["seeds"]) > 1 else ""
    return f"{pct(r['accuracy_mean'])} [{pct(lo)}, {pct(hi)}]{spread}"


def readme_table(data: Mapping[str, Any], compared_at: Sequence[float] = (HEADLINE,)) -> str:
    """The README's table of one quality results file: accuracy per method and budget (mean over seeds;
    at the headline budget with its interval and the seeds' spread), the paired comparison with KCM at
    each budget of ``compared_at``, and the paper's BERT-base column when the file has one."""
    summary = data["summary"]
    budgets = sorted({r["budget"] for r in summary}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in summary))
    labels = {r["method"]: r["label"] for r in summary}
    paper = data.get("paper_bert_base_sst2_at_0.6")
    compared = [b for b in compared_at if b in budgets]
    head = ["method"] + [f"{b} [95% CI] (seeds min-max)" if b == HEADLINE else str(b) for b in budgets]
    head += [f"vs KCM at {b} [paired CI]; McNemar p per seed" for b in compared]
    if paper:
        head.append(f"paper, BERT-base SST-2 at {HEADLINE}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        cells = [labels[m]]
        for b in budgets:
            r = _row(summary, m, b)
            if r is None:
                cells.append("")
            elif b == HEADLINE:
                lo, hi = r["accuracy_ci95"]
                value = pct(r["accuracy_mean"])
                cells.append((f"**{value}**" if m == REFERENCE else value) + f" [{pct(lo)}, {pct(hi)}]"
                             + (f" ({pct(r['accuracy_min'])}-{pct(r['accuracy_max'])})" if len(r["seeds"]) > 1 else ""))
            else:
                cells.append(pct(r["accuracy_mean"]))
        cells += [_vs_cell(_row(summary, m, b)) for b in compared]
        if paper:
            cells.append("" if paper.get(m) is None else f"{paper[m]}"
                         + (f" (unpruned {paper['unpruned']})" if m == REFERENCE and "unpruned" in paper else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline_table(data: Mapping[str, Any], speedup: str, budget: float = HEADLINE) -> str:
    """The README's one table: every method at ``budget`` (accuracy over seeds with its interval) beside
    its paired difference to KCM, and on KCM's row the measured ``speedup`` of its sliced model (the
    speed benchmark times KCM's plan; another method's widths per layer differ, so its speed may too)."""
    summary = data["summary"]
    lines = [f"| method at {budget} relative FLOPs | accuracy [95% CI] | minus KCM, points [paired 95% CI]; "
             "McNemar p per seed | speedup of the sliced model |", "|---|---|---|---|"]
    dense = data["unpruned"]["accuracy"]
    lines.append(f"| unpruned | {pct(dense['value'])} [{pct(dense['ci95'][0])}, {pct(dense['ci95'][1])}] | | 1.00x |")
    for m in dict.fromkeys(r["method"] for r in summary):
        r = _row(summary, m, budget)
        if r is None:
            continue
        lo, hi = r["accuracy_ci95"]
        value = f"**{pct(r['accuracy_mean'])}**" if m == REFERENCE else pct(r["accuracy_mean"])
        vs = _vs_cell(r).replace("unpruned minus KCM ", "unpruned: ") if m == REFERENCE else _vs_cell(r)
        lines.append(f"| {r['label']} | {value} [{pct(lo)}, {pct(hi)}] | {vs} | {speedup if m == REFERENCE else ''} |")
    return "\n".join(lines)


def readme_caption(data: Mapping[str, Any], name: str) -> str:
    """One line on what the table rests on, from the results file itself."""
    s, env, dense = data["settings"], data["environment"], data["unpruned"]["accuracy"]
    by_seeds: dict[tuple, list[float]] = {}          # which budgets ran with which seeds
    for budget in sorted({r["budget"] for r in data["rows"]}, reverse=True):
        seeds = tuple(sorted({r["seed"] for r in data["rows"] if r["budget"] == budget}))
        by_seeds.setdefault(seeds, []).append(budget)
    seeds_text = "; ".join(
        f"seed{'s' if len(k) > 1 else ''} {', '.join(str(x) for x in k)}"
        + ("" if len(by_seeds) == 1 else f" at {', '.join(str(b) for b in v)}") for k, v in by_seeds.items())
    lo, hi = dense["ci95"]
    before = env.get("load_average_before") or env.get("load_average_1_5_15_before")
    load = f"; load average {before[0]:.0f} at the start of its last run" if before else ""
    return (f"`benchmarks/results/{name}.md`: {s['task_description']}; {s['test']} test texts, "
            f"{s['samples']} unlabeled train texts ({s['labeled']} labeled), {seeds_text}; unpruned "
            f"{pct(dense['value'])} [{pct(lo)}, {pct(hi)}]{load}.")
