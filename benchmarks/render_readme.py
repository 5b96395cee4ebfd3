"""Rewrite the READMEs' benchmark numbers from the results files, so the two cannot drift apart.

Every generated passage sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``; NAME is
one of ``BLOCKS`` below, each a function of the results folder. README.md holds the one headline table
(``PLACES``), benchmarks/README.md every other block. Text outside the markers (the reading of the
numbers) is left alone. ``tests/test_benchmark_evidence.py`` fails when either file differs from what
this script would write.

    python benchmarks/render_readme.py            # rewrite the marked blocks of both files
    python benchmarks/render_readme.py --check    # exit 1 and show the difference when they drift
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cell_label, goal_verdict, machine_state, perplexity_cell, ratio_interval, ratio_text  # noqa: E402
from quality_tables import HEADLINE, headline_table, p_cell, paired_cell, readme_caption, readme_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))          # kcm_core, when run as a script from anywhere
MARKER = re.compile(r"<!-- results:(?P<name>[a-z0-9_-]+) -->(?P<body>.*?)<!-- /results:(?P=name) -->", re.S)


def _load(results: Path, name: str) -> dict:
    path = results / name
    if not path.is_file():
        raise ValueError(f"{path} is missing: run the benchmark that writes it (see benchmarks/README.md)")
    return json.loads(path.read_text())


def _state(env: dict) -> str:
    """Machine and load from the file itself: "idle" only when the recorded load says so."""
    return f"{env.get('cpu', 'unrecorded CPU')}, {env.get('threads')} threads, {machine_state(env)}"


# --------------------------------------------------------------------------- blocks

def engine(results: Path) -> str:
    data = _load(results, "engine.json")
    goals = {"small": 60.0, "base": 7 * 60.0}
    rows = ["| model | R2 (s) | D2 (s) | scaling (s) | selection + slicing (s) | total (s) | goal |",
            "|---|---|---|---|---|---|---|"]
    for name, run in data["runs"].items():
        s, goal = run["stages_seconds"], goals.get(name)
        verdict = "" if goal is None else (f"under {goal / 60:g} min: " if goal >= 120 else f"under {goal:g} s: ") + (
            "met (one run)" if run["total_seconds"] < goal else "**not met**")
        rows.append(f"| {run['model']} | {s.get('r2', 0):.1f} | {s.get('d2', 0):.1f} | {s.get('scaling', 0):.1f} | "
                    f"{s.get('selection', 0) + s.get('slicing', 0):.2f} | {run['total_seconds']:.1f} | {verdict} |")
    base = data["runs"].get("base")
    if base:
        total = base["total_seconds_with_r2_at_65_iterations"]
        rows.append(f"| the same with R2 forced to 65 iterations per layer (extrapolated from one layer) | "
                    f"{base['r2_seconds_at_65_iterations_extrapolated']:.0f} | | | | {total:.0f} | under 7 min: "
                    + ("met (one run)" if total < 420 else f"**not met** ({total / 60:.0f} min)") + " |")
    envs = {name: run.get("environment", data.get("environment", {})) for name, run in data["runs"].items()}
    where = "; ".join(f"{name}: {_state(env)}" for name, env in envs.items())
    return "\n".join(rows) + f"\n\nOne run per model, no repeated rounds ({where}).\n"


def r2_options(results: Path) -> str:
    data = _load(results, "r2_options.json")
    dense = data["dense_accuracy"]
    budgets = sorted({r["budget"] for r in data["rows"]})
    first = budgets[0]
    labels = {("median", 1.0, "absolute"): "1 x median distance (default)",
              ("median", 0.5, "absolute"): "0.5 x median distance",
              ("fixed", 1.0, "absolute"): "1 (fixed, the paper)", ("median", 1.0, "signed"): "1 x median distance"}
    lines = [f"Unpruned {dense['value']:.3f} [{dense['ci95'][0]:.3f}, {dense['ci95'][1]:.3f}] on {dense['n']} "
             "test sentences.", "",
             f"| sigma | stop rule | R2 iterations per layer | accuracy at {first} [95% CI] | vs default at {first} "
             "(points, paired [95% CI], McNemar p) | " + " | ".join(f"accuracy at {b}" for b in budgets[1:])
             + f" | agreement at {first} |",
             "|---|---|---|---|---|" + "---|" * (len(budgets) - 1) + "---|"]
    options = list(dict.fromkeys((r["sigma_mode"], r["sigma"], r["stop_rule"]) for r in data["rows"]))
    for option in options:
        rows = {r["budget"]: r for r in data["rows"] if (r["sigma_mode"], r["sigma"], r["stop_rule"]) == option}
        r0 = rows[first]
        its = r0["r2_iterations"]
        its_text = f"{min(its)}" if min(its) == max(its) else f"{min(its)}-{max(its)}"
        a = r0["accuracy"]
        vs = r0.get("vs_default")
        if option == options[0]:
            vs_text = "(the default)"
        elif vs is None:
            vs_text = "not compared in this run"
        else:
            vs_text = (f"{100 * vs['value']:+.1f} [{100 * vs['ci95'][0]:+.1f}, {100 * vs['ci95'][1]:+.1f}], "
                       f"p {vs['mcnemar_p']:.3f}")
        lines.append(f"| {labels.get(option, option)} | {option[2]} | {its_text} | {a['value']:.3f} "
                     f"[{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] | {vs_text} | "
                     + " | ".join(f"{rows[b]['accuracy']['value']:.3f}" for b in budgets[1:])
                     + f" | {r0['agreement']['value']:.3f} |")
    env = data.get("environment")
    lines += ["", f"Measured on {_state(env)}." if env else
              "The run that wrote this file recorded neither the machine nor the load."]
    return "\n".join(lines) + "\n"


def _speed(row: dict, key: str = "speedup") -> str:
    if f"{key}_ci95" in row:
        return ratio_text({"median": row[key], "ci95": row[f"{key}_ci95"]})
    return f"{row[key]:.2f}x"


def speed(results: Path) -> str:
    data = _load(results, "speed.json")
    rows = data["pytorch"]

    def find(budget, seq, batch=32, multiple=1):
        return next((r for r in rows if r["budget"] == budget and r["seq"] == seq and r["batch"] == batch
                     and r["multiple"] == multiple), None)
    budgets = [1.0] + list(data["budgets"])
    lines = ["| relative FLOPs | seq 64: ms (speedup) | seq 128: ms (speedup) | ideal at seq 64 / 128 | "
             "widths rounded to 64, seq 64 |", "|---|---|---|---|---|"]
    for b in budgets:
        r64, r128, x64 = find(b, 64), find(b, 128), find(b, 64, multiple=64)
        label = "1.0 (dense)" if b == 1.0 else f"{b}"
        lines.append(f"| {label} | {r64['median_ms']:.0f} ({_speed(r64)}) | {r128['median_ms']:.0f} ({_speed(r128)}) | "
                     f"{r64['ideal_speedup']:.2f}x / {r128['ideal_speedup']:.2f}x | "
                     f"{_speed(x64) if x64 and b != 1.0 else ''} |")
    env = data["environment"]
    with_ci = "speedup_ci95" in rows[0]
    lines += ["", f"Batch 32, median of {data['repeats']} interleaved rounds, {_state(env)}. " + ("Speedups: median of the per-round ratios [95% bootstrap interval over rounds]."
                                    if with_ci else "This run kept no per-round times, so its speedups have no interval.")]
    goal = []
    for seq in (64, 128):
        r = find(0.6, seq)
        if r is None:
            continue
        verdict = goal_verdict({"ci95": r["speedup_ci95"]}, 1.4) if "speedup_ci95" in r else "not shown (no interval)"
        goal.append(f"seq {seq}: {_speed(r)}, **{verdict}**")
    b1 = [f"{_speed(find(0.6, seq, batch=1))} (seq {seq})" for seq in (64, 128) if find(0.6, seq, batch=1)]
    lines += ["", "Goal at 0.6, batch 32: at least 1.4x, met only when the interval's lower end clears it: "
              + "; ".join(goal) + ". At batch 1 the same plan gives " + " and ".join(b1) + "."]
    quick = results / "speed-quick.json"
    if quick.is_file():
        lines += ["", _quick_goal(json.loads(quick.read_text()))]
    onnx = data.get("onnxruntime") or []
    if onnx:
        def o(runtime, model, seq):
            return next(r for r in onnx if r["runtime"] == runtime and r["model"] == model and r["seq"] == seq)
        parts = []
        for seq in (64, 128):
            dense, pruned = o("onnxruntime", "dense", seq), o("onnxruntime", "kcm@0.6", seq)
            pt_dense, pt_pruned = o("pytorch", "dense", seq), o("pytorch", "kcm@0.6", seq)
            parts.append(f"seq {seq}: ONNX dense {dense['median_ms']:.0f} ms, ONNX pruned {pruned['median_ms']:.0f} ms "
                         f"({dense['median_ms'] / pruned['median_ms']:.2f}x), PyTorch dense "
                         f"{pt_dense['median_ms']:.0f} ms, PyTorch pruned {pt_pruned['median_ms']:.0f} ms")
        diff = max(r["onnx_max_abs_diff"] for r in onnx if r["runtime"] == "onnxruntime")
        lines += ["", f"ONNX Runtime (CPUExecutionProvider, batch 32, same process, medians; both exports reloaded "
                  f"in a fresh process, max abs difference {diff:.1e} from PyTorch): " + "; ".join(parts) + "."]
    return "\n".join(lines) + "\n"


def _quick_goal(data: dict) -> str:
    """The goal as the shorter ``--quick`` run measured it (budgets 0.8 and 0.6), when that file exists."""
    parts = []
    for r in data["pytorch"]:
        if r["budget"] == 0.6 and r["batch"] == 32 and r["multiple"] == 1:
            verdict = goal_verdict({"ci95": r["speedup_ci95"]}, 1.4) if "speedup_ci95" in r else "not shown (no interval)"
            parts.append(f"seq {r['seq']}: {_speed(r)}, **{verdict}**")
    env = data["environment"]
    return (f"The quick run (`{env.get('command', 'bench_speed.py --quick')}`, {data['repeats']} rounds, "
            f"{len(data['budgets'])} budgets, {_state(env)}; `benchmarks/results/speed-quick.md`) at 0.6, batch 32: "
            + "; ".join(parts) + ".")


def lm(results: Path) -> str:
    from kcm_core.methods import METHODS
    data = _load(results, "lm.json")
    budgets = sorted({r["budget"] for r in data["rows"]}, reverse=True)
    dense = data["unpruned"]["perplexity"]["value"]
    lines = ["| method | " + " | ".join(f"{b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets),
             "| unpruned | " + " | ".join(f"{dense:.1f}" for _ in budgets) + " |"]
    for name in [m for m in METHODS if any(r["method"] == m for r in data["rows"])]:
        cells = []
        for b in budgets:
            rows = [r for r in data["rows"] if r["method"] == name and r["budget"] == b]
            if len(rows) > 1:
                values = [r["perplexity"]["value"] for r in rows]
                cells.append(f"{sum(values) / len(values):,.1f} (seeds {min(values):,.1f}-{max(values):,.1f})")
            else:
                cells.append(perplexity_cell(rows[0]) if rows else "")
        seeds = len({r["seed"] for r in data["rows"] if r["method"] == name})
        label = METHODS[name].label + (f" ({seeds} seeds)" if seeds > 1 else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    env = data["environment"]
    runs = data["settings"]["command"].count(" && ") + 1
    lines += ["", (f"{runs} runs merged cell by cell (`--merge`; same calibration and held-out blocks), the last on "
                   if runs > 1 else "One run, ") + f"{_state(env)}; random's seed spread is shown beside its mean."]
    kcm = next((r for r in data["rows"] if r["method"] == "kcm"), None)
    run = data.get("kcm_run") or (kcm and {"budget": kcm["budget"], "seconds": kcm["seconds"]})
    if run:
        s = run["seconds"]
        total = s["scoring"] + s["prune"]
        where = f", {run['machine_state']}" if run.get("machine_state") else ""
        lines += ["", f"KCM's own wall time on the LM demo at {run['budget']}{where}: scoring {s['scoring']:.0f} s "
                  f"(R2 {s.get('stage_r2', 0):.0f} s, D2 {s.get('stage_d2', 0):.0f} s), then selection, scaling and "
                  f"slicing {s['prune']:.0f} s: **about {total / 60:.1f} minutes** for a whole run (goal: under "
                  "3 minutes; " + ("met in this run" if total < 180 else "**not met**") + ")."]
    return "\n".join(lines) + "\n"


def lm_speed(results: Path) -> str:
    data = _load(results, "lm_speed.json")
    s, env = data["settings"], data["environment"]
    lines = [f"KCM at {s['budget']} against dense, {s['rounds']} paired rounds, {_state(env)}. Raw timings: "
             "medians over rounds; speedups: median per-round ratio [95% bootstrap interval over rounds].", "",
             f"| batch | prefill of {s['prefill_tokens']} tokens, dense / pruned | prefill speedup | "
             "generation, dense / pruned | generation speedup |", "|---|---|---|---|---|"]
    generation = {}
    for batch, rounds in data["rounds"].items():
        def med(key):
            values = sorted(r[key] for r in rounds)
            n = len(values)
            return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2
        pre = ratio_interval([r["dense_prefill_s"] for r in rounds], [r["pruned_prefill_s"] for r in rounds])
        gen = ratio_interval([r["pruned_tokens_per_s"] for r in rounds], [r["dense_tokens_per_s"] for r in rounds])
        generation[int(batch)] = gen
        lines.append(f"| {batch} | {med('dense_prefill_s') * 1e3:,.0f} / {med('pruned_prefill_s') * 1e3:,.0f} ms | "
                     f"{ratio_text(pre)} | {med('dense_tokens_per_s'):.1f} / {med('pruned_tokens_per_s'):.1f} "
                     f"tokens/s | {ratio_text(gen)} |")
    if 1 in generation:
        lines += ["", "Goal: at least 1.15x more tokens per second at batch 1, met only when the interval's lower "
                  f"end clears it: **{goal_verdict(generation[1], 1.15)}** ({ratio_text(generation[1])})."]
    return "\n".join(lines) + "\n"


def _quality(name: str, compared_at: tuple[float, ...]) -> Callable[[Path], str]:
    """The accuracy table of one quality results file (``bench_quality.py``), paired against KCM."""
    def block(results: Path) -> str:
        data = _load(results, f"{name}.json")
        return readme_caption(data, name) + "\n\n" + readme_table(data, compared_at) + "\n"
    return block


def vision(results: Path) -> str:
    """The vision demo's accuracy table (``bench_vision.py``), paired against KCM at 0.7 and below."""
    data = _load(results, "vision.json")
    s, dense = data["settings"], data["unpruned"]["accuracy"]
    seeds = sorted({r["seed"] for r in data["rows"]})
    caption = (f"`benchmarks/results/vision.md`: {s['task']}; {s['test']} test images, {s['samples']} unlabeled "
               f"training images per seed; seeds {', '.join(map(str, seeds))} (the table's seed spread says which "
               f"cells have more than seed 0); unpruned {100 * dense['value']:.1f}% "
               f"[{100 * dense['ci95'][0]:.1f}, {100 * dense['ci95'][1]:.1f}].")
    return caption + "\n\n" + readme_table(data, (0.7, 0.6, 0.5)) + "\n"


def headline(results: Path) -> str:
    """README.md's one results table: the demo's quality at 0.6 per method, paired with KCM, and the
    sliced model's measured speedup at 0.6 (``quality.json``, ``speed.json``)."""
    data, timing = _load(results, "quality.json"), _load(results, "speed.json")
    row = next(r for r in timing["pytorch"] if r["budget"] == HEADLINE and r["seq"] == 128 and r["batch"] == 32
               and r["multiple"] == 1)
    return (readme_caption(data, "quality") + " Speedup: KCM's sliced model against the unpruned one, batch 32, "
            f"128 tokens, {_state(timing['environment'])} (`benchmarks/results/speed.md`).\n\n"
            + headline_table(data, _speed(row)) + "\n")


def r2_lm(results: Path) -> str:
    """The LM demo's perplexity with each R2 option (``bench_r2_scale.py --parts downstream``)."""
    import bench_r2_scale
    down = _load(results, "r2_scale.json")["demos"]["lm"]["downstream_runs"]
    return "\n".join(bench_r2_scale.lm_downstream_lines(down)) + "\n"


def r2_memory(results: Path) -> str:
    """One R2 fit at N = 11008 (``bench_r2_scale.py --parts memory``)."""
    import bench_r2_scale
    data = _load(results, "r2_scale.json")
    return "\n".join(bench_r2_scale.memory_lines(data["memory"], bench_r2_scale.exact_iterations(data))) + "\n"


def _paired(paired: dict | None) -> str:
    """``-1.2 [-2.5, +0.1], p 0.08``: one seed's paired difference in points (bench_quality's summary)."""
    return f"{paired_cell(paired)}, p {p_cell(paired)}" if paired else ""


def mpnet(results: Path) -> str:
    data = _load(results, "mpnet.json")
    s, ft, dense = data["settings"], data["model"]["finetune"], data["unpruned"]["accuracy"]
    paper = data["paper_bert_base_sst2_at_0.6"]
    budgets = sorted({r["budget"] for r in data["summary"]}, reverse=True)
    seeds = sorted({r["seed"] for r in data["rows"]})
    head = "".join(f" accuracy at {b} | minus unpruned at {b} | minus KCM at {b} |" for b in budgets)
    prepared = (_load(results, "mpnet_prepare.json").get("finetune") or {}) if (results / "mpnet_prepare.json").is_file() else {}
    how = f" ({prepared['subset_rule']})" if prepared.get("subset") else ""
    steps = (f" ({prepared['train_examples'] // prepared['batch_size']} steps of batch {prepared['batch_size']}, "
             f"median {prepared['step_seconds_median']:.1f} s per step)" if prepared.get("step_seconds_median") else "")
    lines = [f"Fine-tuned on {ft['train_examples']} polarity train sentences{how}, {ft['config']['epochs']} epoch at "
             f"max length {ft['config']['max_len']}{steps}. Unpruned accuracy {100 * dense['value']:.1f} "
             f"[{100 * dense['ci95'][0]:.1f}, {100 * dense['ci95'][1]:.1f}] on {s['test']} test sentences. "
             + ("Accuracy in percent; differences in points, paired on the same sentences [95% paired bootstrap "
                "interval], McNemar's exact p; one seed." if len(seeds) == 1 else
                f"Accuracy in percent, mean over seeds {', '.join(map(str, seeds))} (lowest to highest seed in "
                "brackets); differences in points, the mean over seeds paired on the same sentences (and seed) "
                "[95% paired bootstrap interval of the seed-averaged difference], McNemar's exact p per seed."),
             "",
             "| method |" + head + " paper: BERT-base SST-2 at 0.6 |",
             "|---|" + "---|---|---|" * len(budgets) + "---|"]
    labels = list(dict.fromkeys(r["method"] for r in data["summary"]))
    for name in labels:
        cells, label = [], name
        for b in budgets:
            r = next((x for x in data["summary"] if x["method"] == name and x["budget"] == b), None)
            if r is None:
                cells += ["not measured", "", ""]
                continue
            label = r["label"]
            spread = f" ({100 * r['accuracy_min']:.1f}-{100 * r['accuracy_max']:.1f})" if len(r["seeds"]) > 1 else ""
            cells += [f"{100 * r['accuracy_mean']:.1f}{spread}", _paired(r["vs_unpruned"]),
                      "(reference)" if name == "kcm" else _paired(r["vs_kcm"])]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {paper.get(name, '')} |")
    lines.append("| unpruned |" + f" {100 * dense['value']:.1f} | | |" * len(budgets) + f" {paper['unpruned']} |")
    run, sp = data.get("kcm_run"), data.get("speed")
    if run:
        st = run["stage_seconds"]
        lines += ["", f"KCM's whole run at {s['speed_budget']} on these CPU threads: "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in st.items())
                  + f"; **{run['total_seconds'] / 60:.1f} min** in all, against the talk's at most "
                  f"{run['talk_pruning_seconds_gpu'] / 60:.0f} min per task on one GPU (other hardware)."]
    if sp:
        lines += ["", f"Sliced KCM model at {s['speed_budget']}, batch {sp['batch']} x {sp['seq_len']} tokens, "
                  f"{sp['rounds']} paired rounds: **{ratio_text(sp['speedup'])}** (ideal {sp['ideal_speedup']:.2f}x; "
                  f"the paper {sp['paper_speedup_v100'][0]}x to {sp['paper_speedup_v100'][1]}x on a V100)."]
    if data.get("not_measured"):
        lines += ["", "Not measured in this run: " + ", ".join(data["not_measured"]) + "."]
    lines += ["", f"Measured on {_state(data['environment'])}."]
    return "\n".join(lines) + "\n"


def app_browser(results: Path) -> str:
    """The real-browser table: every timing of bench_app_browser, each pass of the "before" and the
    "after" file a column (a timing the version did not have: "not measured")."""
    from bench_app_browser import COLUMNS
    runs = [(label, _load(results, f"app_browser_{label}.json")) for label in ("before", "after")]
    passes = [(label, p) for label, data in runs for p in data["passes"]]

    def cell(p: dict, key: str) -> str:
        if key not in p:
            return "not measured"
        text = f"{p[key]:.1f} s"
        if key == "burst_settle_s" and "burst_evaluations_logged" in p:
            n = p["burst_evaluations_logged"]
            text += f" ({n} evaluation{'s' if n != 1 else ''} finished)"
        return text

    lines = ["| seconds | " + " | ".join(f"{label}, {p['pass']}" for label, p in passes) + " |",
             "|---|" + "---|" * len(passes)]
    names = {"scores_first_s": "first view: Neuron scores", "hull_pca_first_s": "first view: Kernel hull (PCA)",
             "prune_first_s": "first view: Prune (accuracy)", "cost_first_s": "first view: Cost",
             "export_first_s": "first view: Export", "model_first_s": "Model and data, revisited",
             "landing_s": "landing page drawn (title and introduction)", "loaded_s": "model loaded (sidebar)"}
    for key, label in COLUMNS:
        if key == "idle_after_load_s":
            continue
        lines.append(f"| {names.get(key, label)} | " + " | ".join(cell(p, key) for _, p in passes) + " |")
    def state(data: dict) -> str:      # the loads sit beside the environment in these files
        return _state({**data["environment"], **{k: data[k] for k in ("load_average_before", "load_average_after")
                                                 if data.get(k)}})
    lines += ["", " ".join(f"{label.capitalize()}: `{data['command']}`, {state(data)}." for label, data in runs)]
    return "\n".join(lines) + "\n"


def chart_draw(results: Path) -> str:
    """One sentence: each Neuron scores chart's median draw time before and now, and the paired ratio."""
    import statistics
    data = _load(results, "chart_draw.json")
    parts = [f"the {chart} {statistics.median(ms['before']):.0f} -> {statistics.median(ms['now']):.0f} ms "
             f"({ratio_text(data['speedup'][chart])})" for chart, ms in data["milliseconds"].items()]
    return (f"Median draw times over {data['settings']['rounds']} paired rounds: " + ", ".join(parts)
            + f"; {_state(data['environment'])}.\n")


def _grid_label(cell: str) -> str:
    return cell_label(cell) + ("" if "/" in cell else f" (`{cell}`)")


def _grid_row(data: dict, cell: str, budget: float) -> dict | None:
    return next((r for r in data["rows"] if r["cell"] == cell and r["budget"] == budget), None)


def lm_grid(results: Path) -> str:
    data = _load(results, "lm_grid.json")
    s, ref = data["settings"], data["settings"]["reference"]
    budgets = sorted({r["budget"] for r in data["rows"]}, reverse=True)
    cells = [ref] + [c for c in dict.fromkeys(r["cell"] for r in data["rows"]) if c != ref]
    dense = data["unpruned"]["perplexity"]
    lines = [f"SmolLM2-135M on held-out movie reviews: {s['eval_blocks']} blocks of {s['block']} tokens "
             f"calibration never saw; {s['calibration_blocks']} calibration blocks; unpruned perplexity "
             f"{dense['value']:.1f} [{dense['ci95'][0]:.1f}, {dense['ci95'][1]:.1f}]. Each entry: perplexity, then "
             f"its ratio to `{ref}` on the same blocks [paired 95% bootstrap interval] (below 1: better than "
             f"`{ref}`); `{ref}`'s own entries give its ratio to the unpruned model.", "",
             "| which neurons, how repaired | " + " | ".join(str(b) for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for cell in cells:
        entries = []
        for b in budgets:
            row = _grid_row(data, cell, b)
            if row is None:
                entries.append("")
                continue
            paired = row.get("vs_reference") if cell != ref else row["vs_unpruned"]
            what = "" if paired is None else (f" (x{paired['ratio']:.2f} [{paired['ci95'][0]:.2f}, "
                                              f"{paired['ci95'][1]:.2f}]" + (" of unpruned)" if cell == ref else ")"))
            entries.append(f"{row['perplexity']['value']:,.1f}{what}")
        lines.append(f"| {_grid_label(cell)} | " + " | ".join(entries) + " |")
    errors = [(r["cell"], r["budget"], r["layer_errors"]) for r in data["rows"] if r.get("layer_errors")]
    if errors:
        lines += ["", "Relative error each pruned layer leaves in its output on the calibration tokens, mean over "
                  "layers, before -> after the repair: " + "; ".join(
                      f"`{c}` at {b}: {sum(e[0] for e in errs) / len(errs):.3f} -> {sum(e[1] for e in errs) / len(errs):.3f}"
                      for c, b, errs in errors) + "."]
    own = [r for r in data["rows"] if r["cell"] == ref and not r.get("reused")]
    if own:
        first = own[-1]          # the last run's (the environment recorded is that run's)
        total = first["seconds"]["scoring"] + first["seconds"]["prune"]
        lines += ["", f"`{ref}`'s whole run at {first['budget']} (activation statistics, selection, refit, "
                  f"slicing): {total:.0f} s, {_state(data['environment'])} (goal: under 3 minutes on two idle "
                  "cores; " + ("met in this run" if total < 180 else "not met in this run") + ")."]
    lines += ["", f"Command: `{s['command']}`."]
    return "\n".join(lines) + "\n"


def lm_default(results: Path) -> str:
    data = _load(results, "lm_grid.json")
    ref = data["settings"]["reference"]
    parts = []
    for b in sorted({r["budget"] for r in data["rows"]}, reverse=True):
        mine, flap = _grid_row(data, ref, b), _grid_row(data, "flap", b)
        if mine and flap and flap.get("vs_reference"):
            p = flap["vs_reference"]
            parts.append(f"{b}: {mine['perplexity']['value']:.1f} against FLAP's {flap['perplexity']['value']:.1f} "
                         f"(FLAP / ours x{p['ratio']:.2f} [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}])")
    dense = data["unpruned"]["perplexity"]["value"]
    return (f"Held-out perplexity on the LM demo (unpruned {dense:.1f}, {data['settings']['eval_blocks']} blocks, "
            "paired over the same blocks) at relative FLOPs " + "; ".join(parts) + ".\n")


def classifier_default(results: Path) -> str:
    """Per candidate for the classifier default, each task's verdict against every other label-free row
    at 0.9 and 0.6 (accuracy, paired), and the issue's two goals (``classifier_default.py``)."""
    data = _load(results, "classifier_default.json")
    lines = ["| candidate | task | behind (accuracy, paired) | at 0.6: ahead of | at 0.6: not shown different from |",
             "|---|---|---|---|---|"]
    for cand in data["candidates"]:
        for task, t in data["tasks"].items():
            per_budget = t["candidates"].get(cand)
            if per_budget is None:
                continue
            behind = [f"{o} at {b}" for b, others in per_budget.items() for o, c in others.items()
                      if c and c["ci95"][1] < 0]
            at = {o: c for o, c in per_budget.get("0.6", {}).items() if c}
            ahead = [o for o, c in at.items() if c["ci95"][0] > 0]
            same = [o for o, c in at.items() if c["ci95"][0] <= 0 <= c["ci95"][1]]
            lines.append(f"| `{cand}` | {task} | {', '.join(behind) or 'none'} | {', '.join(ahead) or 'none'} | "
                         f"{', '.join(same) or 'none'} |")
    goals = "; ".join(f"`{c}`: behind random or KCM on {sum(bool(x['behind_anchor']) for x in g['never_behind_random_or_kcm'])} "
                      f"of {len(g['never_behind_random_or_kcm'])} tasks, ahead of every other row at 0.6 on "
                      f"{g['tasks_ahead_of_all_at_0.6']} of {len(g['ahead_at_0.6'])}"
                      for c, g in data["goals"].items())
    return "\n".join(lines) + f"\n\nGoals (`benchmarks/results/classifier_default.md`): {goals}.\n"


def vision_default(results: Path) -> str:
    """The image default against the paper's KCM and FLAP on the vision demo, accuracy, paired
    (``bench_vision.py``'s summary, ``classifier_default.py --family image``'s differences)."""
    vision, paired = _load(results, "vision.json"), _load(results, "vision_default.json")
    cand = paired["candidates"][0]
    per_budget = paired["tasks"]["vision demo"]["candidates"][cand]
    acc = {(r["method"], r["budget"]): r for r in vision["summary"]}

    def vs(other: str, b: str) -> str:
        c = per_budget[b].get(other)
        return "" if c is None else (f" ({100 * c['difference']:+.1f} [{100 * c['ci95'][0]:+.1f}, "
                                     f"{100 * c['ci95'][1]:+.1f}] points, {len(c['seeds'])} seed"
                                     f"{'s' if len(c['seeds']) > 1 else ''})")
    parts = []
    for b in per_budget:
        mine, kcm, flap = (acc.get((m, float(b))) for m in (cand, "kcm", "flap"))
        if mine and kcm and flap:
            parts.append(f"{b}: {100 * mine['accuracy_mean']:.1f}% against the paper's KCM's "
                         f"{100 * kcm['accuracy_mean']:.1f}%{vs('kcm', b)} and FLAP's {100 * flap['accuracy_mean']:.1f}%"
                         f"{vs('flap', b)}")
    dense = vision["unpruned"]["accuracy"]["value"]
    return (f"Test accuracy of `{cand}` on the vision demo (unpruned {100 * dense:.1f}%, "
            f"{vision['settings']['test']} test images, paired on the same images) at relative FLOPs "
            + "; ".join(parts) + ".\n")


BLOCKS: dict[str, Callable[[Path], str]] = {
    "classifier_default": classifier_default, "vision_default": vision_default, "vision": vision,
    "engine": engine, "r2_options": r2_options, "speed": speed, "lm": lm, "lm_speed": lm_speed,
    "r2_lm": r2_lm, "r2_memory": r2_memory, "mpnet": mpnet, "app_browser": app_browser,
    "chart_draw": chart_draw, "headline": headline, "lm_grid": lm_grid, "lm_default": lm_default,
    "quality": _quality("quality", (0.6,)),
    "quality-fine-foods": _quality("quality-fine-foods", (0.6, 0.5)),
    "quality-hedge": _quality("quality-hedge", (0.6, 0.5)),
}


# Which file holds which blocks: README.md the headline and the LM and image defaults' sentences,
# benchmarks/README.md all the others.
PLACES = {"README.md": ("headline", "lm_default", "vision_default"),
          "benchmarks/README.md": tuple(name for name in BLOCKS
                                        if name not in ("headline", "lm_default", "vision_default"))}


# --------------------------------------------------------------------------- rewriting

def render(text: str, results: Path = RESULTS) -> str:
    """``text`` with every marked block replaced by what its results file says now."""
    unknown = sorted({m["name"] for m in MARKER.finditer(text)} - set(BLOCKS))
    if unknown:
        raise ValueError(f"README marks results block(s) {unknown} that render_readme.py does not know; "
                         f"known: {sorted(BLOCKS)}")
    opened = re.findall(r"<!-- results:([a-z0-9_-]+) -->", text)
    closed = [m["name"] for m in MARKER.finditer(text)]
    if sorted(opened) != sorted(closed):
        raise ValueError(f"README opens results block(s) {sorted(set(opened) - set(closed))} without a "
                         "matching <!-- /results:NAME --> line")
    return MARKER.sub(lambda m: f"<!-- results:{m['name']} -->\n{BLOCKS[m['name']](results)}"
                                f"<!-- /results:{m['name']} -->", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a file drifted")
    parser.add_argument("--readme", help="only this file (default: README.md and benchmarks/README.md)")
    args = parser.parse_args(argv)
    paths = [Path(args.readme)] if args.readme else [ROOT / name for name in PLACES]
    drifted = False
    for path in paths:
        text = path.read_text()
        new = render(text)
        if new == text:
            continue
        if args.check:
            drifted = True
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True),
                                                       path.name, f"{path.name} (from results)"))
            print(f"{path} differs from benchmarks/results: run python benchmarks/render_readme.py",
                  file=sys.stderr)
        else:
            path.write_text(new)
            print(f"rewrote the results blocks of {path}", file=sys.stderr)
    return 1 if drifted else 0


if __name__ == "__main__":
    sys.exit(main())
